"""Every checkpoint format loads to the same model: Meta (any shard count), Hugging Face, llama2.c."""

import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch

from conftest import STORIES_FORMS, models_path
from llama import Llama
from llama.checkpoint import load_checkpoint

FORMS = ["stories260K/stories260K.bin", "stories260K-hf", "stories260K-meta", "stories260K-meta-mp2"]
PROMPT = [1] + [(7 * i + 3) % 512 for i in range(31)]  # 32 tokens


def build(path: str, tokenizer: str | None = None) -> Llama:
    return Llama.build(path, tokenizer, max_seq_len=256, max_batch_size=1, device="cpu", dtype="float32")


def greedy_text(llama: Llama) -> str:
    tokens, _ = llama.generate([[llama.tokenizer.bos_id]], max_gen_len=200, temperature=0.0)
    return llama.tokenizer.decode(tokens[0])


def logits(llama: Llama, tokens: list[int] = PROMPT) -> torch.Tensor:
    with torch.inference_mode():
        return llama.model(torch.tensor([tokens]), 0)[0]  # (s, vocab)


@pytest.fixture(scope="module")
def reference_logits(stories_tokenizer) -> torch.Tensor:
    return logits(build(models_path("stories260K-meta"), stories_tokenizer))


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 400, message
    return message


# ---------------------------------------------------------------- the four shared forms


@pytest.mark.parametrize("form", FORMS)
def test_shared_forms_give_reference_text_and_logits(form, stories_tokenizer, reference_text, reference_logits):
    llama = build(models_path(form), stories_tokenizer)
    assert greedy_text(llama) == reference_text
    torch.testing.assert_close(logits(llama), reference_logits, atol=1e-5, rtol=0)


def test_tied_embeddings_stay_one_tensor_with_one_rank():
    for form in ("stories260K/stories260K.bin", "stories260K-hf"):
        _, sd = load_checkpoint(models_path(form))
        assert sd["output.weight"] is sd["tok_embeddings.weight"]


@pytest.mark.parametrize("form", ["stories260K/stories260K.bin", "stories260K-hf", "stories260K-meta"])
def test_rank_slices_match_the_mp2_checkpoint(form):
    """HF (q/k unpermuted per rank), llama2.c and Meta split for 2 ranks equal Meta's own mp2 shards."""
    for rank in range(2):
        _, expected = load_checkpoint(models_path("stories260K-meta-mp2"), rank, 2)
        _, got = load_checkpoint(models_path(form), rank, 2)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), (form, rank, key)


def test_rank_slices_are_views_of_the_mapped_files():
    """No reader copies weights it does not have to: rank slices are narrow views."""
    _, sd = load_checkpoint(models_path("stories260K", "stories260K.bin"), 1, 2)
    assert len({t.untyped_storage().data_ptr() for t in sd.values()}) == 1  # all in the one mapped file
    for form in ("stories260K-hf", "stories260K-meta"):
        _, sd = load_checkpoint(models_path(form), 1, 2)
        for key in ("layers.0.feed_forward.w1.weight", "layers.0.attention.wo.weight", "tok_embeddings.weight"):
            assert sd[key].untyped_storage().nbytes() == 2 * sd[key].nbytes, (form, key)


def test_torchrun_two_ranks_give_reference_text(torchrun_results, reference_text):
    """Meta (1 shard and 2), Hugging Face, llama2.c and GGUF checkpoints on 2 processes (gloo, CPU)."""
    assert {form: r["text"] for form, r in torchrun_results.items()} == {
        form: reference_text for form in STORIES_FORMS
    }


# ---------------------------------------------------------------- llama2.c version 1


def legacy_to_v1(legacy: str, v1: str) -> None:
    """Rewrite a legacy llama2.c file with the version-1 header and tensor order (as export.py does)."""
    raw = open(legacy, "rb").read()
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack_from("<7i", raw)
    floats = np.frombuffer(raw, dtype=np.float32, offset=28)
    hd, kv = dim // n_heads, n_kv_heads * dim // n_heads
    sizes = [("emb", abs(vocab) * dim), ("att_norm", n_layers * dim), ("wq", n_layers * dim * dim),
             ("wk", n_layers * kv * dim), ("wv", n_layers * kv * dim), ("wo", n_layers * dim * dim),
             ("ffn_norm", n_layers * dim), ("w1", n_layers * hidden * dim), ("w2", n_layers * dim * hidden),
             ("w3", n_layers * hidden * dim), ("norm", dim), ("cos", seq_len * hd // 2), ("sin", seq_len * hd // 2)]
    blocks, offset = {}, 0
    for name, n in sizes:
        blocks[name] = floats[offset : offset + n]
        offset += n
    assert vocab > 0 and offset == floats.size  # stories260K shares its classifier
    header = struct.pack("<Ii7iB", 0x616B3432, 1, dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len, 1)
    order = ["att_norm", "ffn_norm", "norm", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    with open(v1, "wb") as f:
        f.write(header + b"\0" * (256 - len(header)))
        for name in order:
            f.write(blocks[name].tobytes())


def test_llama2c_version1_file_gives_identical_logits(tmp_path, stories_tokenizer, reference_logits):
    legacy = models_path("stories260K", "stories260K.bin")
    v1 = str(tmp_path / "model-v1.bin")
    legacy_to_v1(legacy, v1)
    assert open(v1, "rb").read(4) == b"24ka"  # "ak42" as a little-endian uint32
    assert torch.equal(logits(build(v1, stories_tokenizer)), logits(build(legacy, stories_tokenizer)))
    torch.testing.assert_close(logits(build(v1, stories_tokenizer)), reference_logits, atol=1e-5, rtol=0)


def test_llama2c_version2_is_refused(tmp_path):
    path = tmp_path / "q80.bin"
    path.write_bytes(struct.pack("<Ii7iBi", 0x616B3432, 2, 64, 172, 5, 8, 4, 512, 512, 1, 64).ljust(4096, b"\0"))
    with pytest.raises(ValueError, match="version 2") as e:
        load_checkpoint(str(path))
    assert "--version 1" in one_line_error(e)


# ---------------------------------------------------------------- tokenizer beside the checkpoint


def test_tokenizer_model_beside_checkpoint_is_used(tmp_path, stories_tokenizer, reference_logits):
    ckpt = tmp_path / "hf"
    shutil.copytree(models_path("stories260K-hf"), ckpt)
    shutil.copyfile(stories_tokenizer, ckpt / "tokenizer.model")
    llama = build(str(ckpt))
    assert llama.tokenizer.n_words == 512
    torch.testing.assert_close(logits(llama), reference_logits, atol=1e-5, rtol=0)
    binary = tmp_path / "stories260K.bin"
    shutil.copyfile(models_path("stories260K", "stories260K.bin"), binary)
    with pytest.raises(ValueError, match="pass --tokenizer_path"):
        build(str(binary))
    shutil.copyfile(stories_tokenizer, tmp_path / "tokenizer.model")
    torch.testing.assert_close(logits(build(str(binary))), reference_logits, atol=1e-5, rtol=0)


def test_tokenizer_model_in_the_folder_above_a_meta_directory(tmp_path, stories_tokenizer, reference_logits):
    """Meta's download puts tokenizer.model beside llama-2-7b/, not inside it."""
    shutil.copytree(models_path("stories260K-meta"), tmp_path / "stories260K")
    shutil.copyfile(stories_tokenizer, tmp_path / "tokenizer.model")
    torch.testing.assert_close(logits(build(str(tmp_path / "stories260K"))), reference_logits, atol=1e-5, rtol=0)


def test_missing_tokenizer_says_what_to_pass():
    with pytest.raises(ValueError, match="tokenizer_path") as e:
        build(models_path("stories260K-hf"))
    one_line_error(e)


# ---------------------------------------------------------------- bad input: one clear line each


def test_directory_with_no_known_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("weights are elsewhere")
    with pytest.raises(ValueError, match="no known checkpoint layout") as e:
        load_checkpoint(str(tmp_path))
    assert "notes.txt" in one_line_error(e)


def truncated_copy(src: str, dst, keep: float = 0.5) -> None:
    data = open(src, "rb").read()
    dst.write_bytes(data[: int(len(data) * keep)])


def test_truncated_pth(tmp_path):
    shutil.copyfile(models_path("stories260K-meta", "params.json"), tmp_path / "params.json")
    truncated_copy(models_path("stories260K-meta", "consolidated.00.pth"), tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match="truncated") as e:
        load_checkpoint(str(tmp_path))
    assert "consolidated.00.pth" in one_line_error(e)


def test_truncated_safetensors(tmp_path):
    shutil.copyfile(models_path("stories260K-hf", "config.json"), tmp_path / "config.json")
    truncated_copy(models_path("stories260K-hf", "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="truncated") as e:
        load_checkpoint(str(tmp_path))
    assert "model.safetensors" in one_line_error(e)


def test_truncated_llama2c_bin(tmp_path):
    path = tmp_path / "stories260K.bin"
    truncated_copy(models_path("stories260K", "stories260K.bin"), path, keep=0.9)
    with pytest.raises(ValueError, match="truncated") as e:
        load_checkpoint(str(path))
    assert "stories260K.bin" in one_line_error(e)


@pytest.mark.parametrize("model_type", ["mistral", "gpt2", None])
def test_config_with_other_model_type(tmp_path, model_type):
    config = json.loads(open(models_path("stories260K-hf", "config.json")).read())
    config["model_type"] = model_type
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copyfile(models_path("stories260K-hf", "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model_type") as e:
        load_checkpoint(str(tmp_path))
    assert repr(model_type) in one_line_error(e)


@pytest.mark.parametrize("form", FORMS)
def test_heads_not_divisible_by_model_parallel_size(form):
    with pytest.raises(ValueError, match="divisible by the model-parallel size 3") as e:
        load_checkpoint(models_path(form), 0, 3)
    assert "[1, 2, 4, 8]" in one_line_error(e)  # 8 ranks: each of the 4 kv heads copied to two


def test_single_weights_file_asks_for_its_directory():
    with pytest.raises(ValueError, match="pass the directory") as e:
        load_checkpoint(models_path("stories260K-hf", "model.safetensors"))
    one_line_error(e)
    with pytest.raises(ValueError, match="pass the directory"):
        load_checkpoint(models_path("stories260K-meta", "consolidated.00.pth"))


def test_file_that_is_no_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint") as e:
        load_checkpoint(models_path("stories260K", "tok512.bin"))
    one_line_error(e)


def test_index_naming_files_outside_the_folder_is_refused(tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(models_path("stories260K-hf", "model.safetensors"), outside)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(models_path("stories260K-hf", "config.json"), ckpt / "config.json")
    index = {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'../elsewhere.safetensors', which is not a file inside") as e:
        load_checkpoint(str(ckpt))
    one_line_error(e)


def test_tensor_in_two_weight_files_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(models_path("stories260K-hf", "config.json"), ckpt / "config.json")
    for name in ("a.safetensors", "b.safetensors"):
        shutil.copy(models_path("stories260K-hf", "model.safetensors"), ckpt / name)
    index = {"weight_map": {"model.norm.weight": "a.safetensors", "lm_head.weight": "b.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="is in two weight files .*a.safetensors and b.safetensors") as e:
        load_checkpoint(str(ckpt))
    one_line_error(e)


# ---------------------------------------------------------------- random checkpoints written by transformers

HF_SHAPES = {
    # Like open_llama_3b: no GQA, untied output, a feed-forward width off Meta's rule, eps 1e-6
    # (plus a non-default rope_theta, to check it is honoured).
    "open_llama_3b-like": dict(hidden_size=96, intermediate_size=280, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6,
                               rope_theta=50000.0, tie_word_embeddings=False),
    # Like TinyLlama: grouped-query attention (4 query heads per KV head), untied output.
    "TinyLlama-like": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                           num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
                           tie_word_embeddings=False),
}


HF_LAYOUTS = ("single", "sharded", "bin", "bin-sharded")


def random_hf_model(shape: str):
    """A transformers LlamaForCausalLM of a small shape with random weights large enough to matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, max_position_embeddings=128, **HF_SHAPES[shape])
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))  # norm weights
            else:
                p.copy_(torch.randn_like(p) / (1.0 if "embed" in name else p.shape[1] ** 0.5))
    return model


@pytest.fixture(scope="module", params=list(HF_SHAPES))
def hf_random(request, tmp_path_factory):
    """(transformers logits on PROMPT, {layout: checkpoint directory}) for one shape."""
    model = random_hf_model(request.param)
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    (root / "bin").mkdir()
    shutil.copyfile(root / "single" / "config.json", root / "bin" / "config.json")
    torch.save(model.state_dict(), root / "bin" / "pytorch_model.bin")
    # The older sharded .bin layout: pytorch_model-0000N-of-00002.bin with its index.
    (root / "bin-sharded").mkdir()
    shutil.copyfile(root / "single" / "config.json", root / "bin-sharded" / "config.json")
    keys = list(model.state_dict())
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: model.state_dict()[k] for k in part}, root / "bin-sharded" / name)
        weight_map.update({k: name for k in part})
    (root / "bin-sharded" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0]
    return expected, {layout: str(root / layout) for layout in HF_LAYOUTS}


@pytest.mark.parametrize("layout", HF_LAYOUTS)
def test_transformers_checkpoints_give_transformers_logits(hf_random, layout, stories_tokenizer):
    expected, dirs = hf_random
    if layout == "sharded":
        files = os.listdir(dirs[layout])
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    llama = build(dirs[layout], stories_tokenizer)
    torch.testing.assert_close(logits(llama), expected, atol=1e-4, rtol=0)
