"""Safe loading: no pickle code runs; bad numerics and seeds behave."""

import json
import re

import pytest
import torch

from conftest import REPO, models_path
from llama import Llama
from llama.checkpoint import torch_load


class Payload:
    """Unpickling this object creates the marker file: code that must never run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def evil_checkpoint(tmp_path):
    ckpt = tmp_path / "evil"
    ckpt.mkdir()
    (ckpt / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": -1}))
    marker = tmp_path / "pwned"
    torch.save({"tok_embeddings.weight": torch.zeros(512, 64), "extra": Payload(str(marker))},
               ckpt / "consolidated.00.pth")
    return ckpt, marker


def test_pickle_code_never_runs(evil_checkpoint, stories_tokenizer):
    ckpt, marker = evil_checkpoint
    with pytest.raises(ValueError, match="weights-only"):
        torch_load(str(ckpt / "consolidated.00.pth"))
    with pytest.raises(ValueError, match="weights-only"):
        Llama.build(str(ckpt), stories_tokenizer, max_seq_len=32, max_batch_size=1, device="cpu")
    assert not marker.exists()
    # Sanity: the payload is real, plain torch.load(weights_only=False) would run it.
    torch.load(ckpt / "consolidated.00.pth", weights_only=False)
    assert marker.exists()


def test_every_torch_load_is_weights_only():
    for path in sorted((REPO / "llama").rglob("*.py")):
        source = path.read_text()
        for m in re.finditer(r"torch\.load\(", source):
            call = source[m.start() : source.find(")", m.start()) + 1]
            assert "weights_only=True" in call, f"{path.name}: {call}"


def test_nan_logits_name_their_likely_cause(stories_tokenizer):
    def build(dtype):
        return Llama.build(models_path("stories260K-meta"), stories_tokenizer, max_seq_len=32,
                           max_batch_size=1, device="cpu", dtype=dtype)

    llama = build("float32")
    llama.model.norm.weight.fill_(float("nan"))  # damaged weights: named, in any dtype
    with pytest.raises(FloatingPointError, match="NaN/inf values \\(first in norm.weight\\); the checkpoint"):
        llama.text_completion(["Once"], max_gen_len=4)
    llama = build("float16")
    llama.model.layers[0].attention_norm.weight.fill_(60000.0)  # finite weights that overflow fp16
    with pytest.raises(FloatingPointError, match="overflowed torch.float16; try --dtype float32"):
        llama.text_completion(["Once"], max_gen_len=4)
    llama = build("float32")
    llama.model.layers[0].attention_norm.eps = -1.0  # rsqrt of a negative: params at fault, not the dtype
    llama.model.layers[0].attention_norm.weight.zero_()
    with pytest.raises(FloatingPointError, match="check the checkpoint's params") as e:
        llama.text_completion(["Once"], max_gen_len=4)
    assert "dtype float32" not in str(e.value)


def test_seed_per_call(stories):
    def sample(seed):
        return stories.text_completion(["Once"], temperature=1.0, top_p=1.0, max_gen_len=20, seed=seed)

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert "".join(stories.stream_text_completion("Once", temperature=1.0, top_p=1.0, max_gen_len=20,
                                                  seed=7)) == sample(7)[0]["generation"]
