"""Conversion: any supported checkpoint -> Meta layout (any model-parallel size) or Hugging Face."""

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_formats import build, legacy_to_v1, logits, random_hf_model, reference_logits  # noqa: F401 (fixture)

from conftest import REPO, models_path
from llama.checkpoint import load_checkpoint
from llama.convert import convert
from llama.formats.hf import write_hf

HF_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "model_type")


def assert_same_tensors(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


def hf_config(path) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("mp", [1, 2])
def test_hf_to_meta_to_hf_round_trip(tmp_path, mp, stories_tokenizer, reference_logits):
    src = models_path("stories260K-hf")
    meta, hf = str(tmp_path / "meta"), str(tmp_path / "hf")
    files = convert(src, meta, to="meta", model_parallel_size=mp, tokenizer_path=stories_tokenizer)
    assert files == ["params.json"] + [f"consolidated.{r:02d}.pth" for r in range(mp)] + ["tokenizer.model"]
    # The Meta shards are what Meta's fairscale layers hold: equal to the shared mp2 checkpoint.
    if mp == 2:
        for r in range(2):
            ours = torch.load(os.path.join(meta, f"consolidated.0{r}.pth"), weights_only=True)
            theirs = torch.load(models_path("stories260K-meta-mp2", f"consolidated.0{r}.pth"), weights_only=True)
            assert_same_tensors(ours, {k: v for k, v in theirs.items() if k != "rope.freqs"})
    # tokenizer.model was written beside it, so no tokenizer_path is needed.
    torch.testing.assert_close(logits(build(meta)), reference_logits, atol=1e-5, rtol=0)

    convert(meta, hf, to="hf")
    assert_same_tensors(load_file(os.path.join(hf, "model.safetensors")),
                        load_file(os.path.join(src, "model.safetensors")))
    assert {k: hf_config(hf)[k] for k in HF_CONFIG_KEYS} == {k: hf_config(src)[k] for k in HF_CONFIG_KEYS}


def test_converted_hf_runs_in_transformers(tmp_path, stories_tokenizer, reference_text):
    import sentencepiece
    from transformers import LlamaForCausalLM

    convert(models_path("stories260K-meta-mp2"), str(tmp_path / "hf"), to="hf")
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    out = model.generate(torch.tensor([[1]]), max_new_tokens=200, do_sample=False)  # (1, 201)
    text = sentencepiece.SentencePieceProcessor(model_file=stories_tokenizer).decode(out[0, 1:].tolist())
    assert text == reference_text


def test_llama2c_to_meta_mp2_matches_shared_split(tmp_path):
    convert(models_path("stories260K", "stories260K.bin"), str(tmp_path / "meta"), to="meta", model_parallel_size=2)
    for r in range(2):
        _, ours = load_checkpoint(str(tmp_path / "meta"), r, 2)
        _, theirs = load_checkpoint(models_path("stories260K-meta-mp2"), r, 2)
        assert_same_tensors(ours, theirs)
    assert json.loads((tmp_path / "meta" / "params.json").read_text()) == {
        "dim": 64, "n_layers": 5, "n_heads": 8, "n_kv_heads": 4, "multiple_of": 4, "norm_eps": 1e-5, "vocab_size": 512}


@pytest.mark.parametrize("src", ["stories260K-hf", "stories260K-meta-mp2"])
def test_to_llama2c_version1_file(tmp_path, src, stories_tokenizer, reference_logits):
    """Byte for byte what llama2.c's export.py --version 1 writes (here: rewritten from the legacy file)."""
    out = tmp_path / "out" / "model.bin"
    assert convert(models_path(src), str(out), to="llama2c", tokenizer_path=stories_tokenizer) == [
        "model.bin", "tokenizer.model"]
    legacy_to_v1(models_path("stories260K", "stories260K.bin"), str(tmp_path / "expected.bin"))
    got = out.read_bytes()
    seq_len = 512 if src == "stories260K-hf" else 4096  # Meta's params.json has no context length
    header = struct.pack("<Ii7iB", 0x616B3432, 1, 64, 172, 5, 8, 4, 512, seq_len, 1)
    assert got[:256] == header.ljust(256, b"\0")
    assert got[256:] == (tmp_path / "expected.bin").read_bytes()[256:]
    torch.testing.assert_close(logits(build(str(out))), reference_logits, atol=1e-5, rtol=0)


def test_untied_gqa_model_round_trips_with_sharded_output(tmp_path):
    """A transformers-written TinyLlama-like model -> Meta mp2 -> sharded safetensors with an index."""
    model = random_hf_model("TinyLlama-like")
    model.save_pretrained(tmp_path / "src")
    convert(str(tmp_path / "src"), str(tmp_path / "meta"), to="meta", model_parallel_size=2)
    args, state_dict = load_checkpoint(str(tmp_path / "meta"))
    names = write_hf(args, state_dict, str(tmp_path / "out"), max_shard_bytes=50_000)
    assert len(names) > 2 and os.path.isfile(tmp_path / "out" / "model.safetensors.index.json")
    got = {}
    for name in names:
        got.update(load_file(str(tmp_path / "out" / name)))
    assert_same_tensors(got, load_file(str(tmp_path / "src" / "model.safetensors")))
    assert hf_config(tmp_path / "out")["tie_word_embeddings"] is False


def test_dtype_cast_keeps_tied_output_out(tmp_path):
    convert(models_path("stories260K", "stories260K.bin"), str(tmp_path / "hf"), to="hf", dtype="bfloat16")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "lm_head.weight" not in tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert hf_config(tmp_path / "hf")["tie_word_embeddings"] is True


def test_convert_errors(tmp_path):
    src = models_path("stories260K-meta")
    with pytest.raises(ValueError, match="divisible by the model-parallel size 3"):
        convert(src, str(tmp_path / "a"), to="meta", model_parallel_size=3)
    with pytest.raises(ValueError, match="--to meta, hf, llama2c or gguf"):
        convert(src, str(tmp_path / "b"), to="onnx")
    with pytest.raises(ValueError, match="embeds its tokenizer, and there is none beside .*; pass --tokenizer_path"):
        convert(src, str(tmp_path / "b.gguf"), to="gguf")
    assert not (tmp_path / "b.gguf").exists() and not (tmp_path / "b.gguf.partial").exists()
    with pytest.raises(ValueError, match="--outtype"):
        convert(src, str(tmp_path / "b.gguf"), to="gguf", dtype="float16")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "old.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="not an empty folder"):
        convert(src, str(tmp_path / "c"), to="hf")


def test_command_line(tmp_path, stories_tokenizer):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "llama.convert", models_path("stories260K-hf"), str(tmp_path / "meta"),
           "--to", "meta", "--model_parallel_size", "2", "--tokenizer_path", stories_tokenizer]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(tmp_path / "meta")) == [
        "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    bad = subprocess.run(cmd[:4] + [str(tmp_path / "mp3"), "--to", "meta", "--model_parallel_size", "3",
                                    "--tokenizer_path", stories_tokenizer],
                         capture_output=True, text=True, timeout=120, env={**env, "PYTHONWARNINGS": "ignore"})
    assert bad.returncode == 1, bad.stderr
    assert bad.stderr.strip().startswith("error: ") and "model-parallel size 3" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_values_beyond_float16_are_an_error_not_inf(tmp_path):
    from llama.convert import cast

    sd = {"norm.weight": torch.tensor([1.0, 70000.0]), "output.weight": torch.ones(2, 2)}
    with pytest.raises(ValueError, match="norm.weight has values up to 7e\\+04, beyond torch.float16's range"):
        cast(sd, torch.float16)
    assert cast(sd, torch.bfloat16)["norm.weight"][1].item() == 70144.0  # bf16 holds it (rounded)
