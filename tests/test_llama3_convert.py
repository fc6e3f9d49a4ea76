"""llama convert with Llama 3 checkpoints: Meta <-> Hugging Face round trips, bit for bit, keeping
the RoPE scaling (factor 8 as Meta's default, 32 as Llama 3.2's) and the tied embeddings."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import LLAMA3_PARAMS
from llama.checkpoint import load_checkpoint
from llama.convert import convert


def meta_tensors(path: str) -> dict:
    return torch.load(os.path.join(path, "consolidated.00.pth"), weights_only=True)


def test_meta_hf_meta_round_trip_is_bit_for_bit(tmp_path, llama3_meta_ckpt):
    hf, back = tmp_path / "hf", tmp_path / "meta"
    assert "tokenizer.model" in convert(llama3_meta_ckpt, str(hf), to="hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}
    assert config["rope_scaling"] == config["rope_parameters"]  # what transformers 4.x reads
    assert (config["max_position_embeddings"], config["num_key_value_heads"], config["tie_word_embeddings"]) == \
        (131072, 1, False)
    assert (config["bos_token_id"], config["eos_token_id"]) == (128000, [128001, 128008, 128009])
    convert(str(hf), str(back), to="meta")
    assert json.loads((back / "params.json").read_text()) == LLAMA3_PARAMS
    original, again = meta_tensors(llama3_meta_ckpt), meta_tensors(str(back))
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) and original[k].dtype == again[k].dtype for k in original)


def test_hf_meta_hf_keeps_factor_32_and_tied_embeddings(tmp_path, llama32_hf):
    folder, _ = llama32_hf
    meta, back = tmp_path / "meta", tmp_path / "hf"
    assert "tokenizer.json" in convert(folder, str(meta), to="meta")
    params = json.loads((meta / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_scaling_factor"] == 32.0
    assert not {"rope_high_freq_factor", "rope_low_freq_factor", "rope_original_context"} & params.keys()
    sd = meta_tensors(str(meta))
    assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])  # Meta's files hold both
    assert load_checkpoint(str(meta))[0].rope_scaling == (32.0, 1.0, 4.0, 8192)
    convert(str(meta), str(back), to="hf")
    config = json.loads((back / "config.json").read_text())
    assert config["rope_parameters"]["factor"] == 32.0 and config["tie_word_embeddings"] is True
    original, again = load_file(os.path.join(folder, "model.safetensors")), load_file(back / "model.safetensors")
    assert original.keys() == again.keys() and "lm_head.weight" not in again
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_llama3_to_llama2c_is_refused_not_silently_wrong(tmp_path, llama3_meta_ckpt):
    with pytest.raises(ValueError, match="no RoPE settings.*rope_theta=500000.0, scaled RoPE.*--to meta"):
        convert(llama3_meta_ckpt, str(tmp_path / "m.bin"), to="llama2c")
    assert not list(tmp_path.iterdir())
