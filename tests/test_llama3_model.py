"""Llama 3.1 / 3.2 models against the references: Meta's llama-models Transformer on a Meta-layout
checkpoint with use_scaled_rope, and transformers' LlamaForCausalLM on a tied, factor-32 HF one."""

import contextlib
import json
import os
import socket

import pytest
import torch

from conftest import LLAMA3_PARAMS
from llama import Llama
from llama.model import LLAMA3_ROPE_SCALING, ModelArgs, rope_tables

# fp32 logits (up to ~6 here) of two implementations of the same math differ only by summation
# order: 6e-6 at most, measured for both references. 1e-4 is the bound; ignoring the RoPE
# scaling moves them by ~1 at positions 700+ (measured 1.03), by 1e-2 already in the first 16.
TOL = dict(atol=1e-4, rtol=0)
N_POSITIONS = 768


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fairscale_one_process():
    """The model-parallel state Meta's reference layers need: one gloo process, torn down after."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    fs.initialize_model_parallel(1)
    try:
        yield
    finally:
        fs.destroy_model_parallel()
        dist.destroy_process_group()


def tokens_for_test(seed: int) -> torch.Tensor:
    return torch.randint(0, 128000, (1, N_POSITIONS), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def meta_logits(llama3_meta_ckpt):
    """Meta's reference Transformer (llama-models 0.3.0) on the checkpoint, fp32, all positions."""
    from llama_models.llama3.args import ModelArgs as MetaArgs
    from llama_models.llama3.model import Transformer as MetaTransformer

    state_dict = torch.load(f"{llama3_meta_ckpt}/consolidated.00.pth", weights_only=True)
    with fairscale_one_process():
        model = MetaTransformer(MetaArgs(**LLAMA3_PARAMS, max_seq_len=N_POSITIONS, max_batch_size=1))
        model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
        return model(tokens_for_test(0), 0)[0]  # (positions, vocab)


@pytest.fixture(scope="module")
def hf_logits(llama32_hf):
    """transformers' LlamaForCausalLM on the tied, factor-32 model, fp32, all positions."""
    with torch.inference_mode():
        return llama32_hf[1](tokens_for_test(1)).logits[0]  # (positions, vocab)


def test_meta_layout_llama31_equals_meta_reference(llama3_meta_ckpt, meta_logits):
    llama = Llama.build(llama3_meta_ckpt, max_seq_len=N_POSITIONS, max_batch_size=1, device="cpu", dtype="float32")
    assert llama.model.params.rope_scaling == LLAMA3_ROPE_SCALING
    with torch.inference_mode():
        ours = llama.model(tokens_for_test(0), 0)[0]
        torch.testing.assert_close(ours, meta_logits, **TOL)
        # Control: the same model with plain RoPE is far off at these positions.
        p = llama.model.params
        llama.model.rope = rope_tables(p.head_dim, N_POSITIONS, p.rope_theta)
        plain = llama.model(tokens_for_test(0), 0)[0]
    assert (plain - meta_logits)[700:].abs().max() > 100 * TOL["atol"]


def test_hf_llama32_tied_factor_32_equals_transformers(llama32_hf, hf_logits):
    folder = llama32_hf[0]
    files = set(os.listdir(folder))
    assert "tokenizer.json" in files and "tokenizer.model" not in files
    llama = Llama.build(folder, max_seq_len=N_POSITIONS, max_batch_size=1, device="cpu", dtype="float32")
    assert llama.tokenizer.kind == "tokenizer.json"
    params = llama.model.params
    assert params.tie_word_embeddings and params.rope_scaling == (32.0, 1.0, 4.0, 8192)
    assert llama.model.output.weight.data_ptr() == llama.model.tok_embeddings.weight.data_ptr()  # one copy
    with torch.inference_mode():
        torch.testing.assert_close(llama.model(tokens_for_test(1), 0)[0], hf_logits, **TOL)


def test_scaled_frequencies_equal_transformers():
    """The scaled frequencies themselves, against transformers' llama3 RoPE initialisation."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for factor, low, high, context in [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 2.0, 8.0, 4096)]:
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": context}
        config = LlamaConfig(hidden_size=1024, num_attention_heads=8, rope_parameters=rope)
        inv_freq, scale = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        ours = rope_tables(128, 4096, 500000.0, scaling=(factor, low, high, context))
        angles = torch.outer(torch.arange(4096).float(), inv_freq)  # (positions, 64)
        assert scale == 1.0
        torch.testing.assert_close(ours[0, :, ::2], angles.cos(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("params, match", [
    ({"use_scaled_rope": "yes"}, "use_scaled_rope is 'yes'; it must be true or false"),
    ({"rope_scaling_factor": 32.0}, "sets rope_scaling_factor but not use_scaled_rope"),
    ({"use_scaled_rope": True, "rope_scaling_factor": 0}, "rope_scaling_factor is 0; it must be a finite number > 0"),
    ({"use_scaled_rope": True, "rope_high_freq_factor": 0.5}, "low frequency factor .* must be below"),
    ({"n_heads": 4, "n_kv_heads": 3}, "n_kv_heads is 3; it must be a divisor of the number of heads"),
])
def test_bad_rope_params_name_the_key_and_file(params, match):
    from llama.config import validate

    with pytest.raises(ValueError, match=match) as e:
        validate(ModelArgs.from_params({"dim": 64, **params}), "x/params.json")
    assert str(e.value).startswith("x/params.json")


@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "yarn", "factor": 4.0}, "RoPE scaling 'yarn'; only plain RoPE and Llama 3's 'llama3'"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "has no 'high_freq_factor'"),
    ({"rope_type": "llama3", "factor": -1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
     "rope_parameters' factor is -1.0; it must be a finite number > 0"),
])
def test_bad_hf_rope_scaling_is_one_clear_line(tmp_path, rope, match):
    from conftest import LLAMA32_CONFIG
    from llama.checkpoint import load_checkpoint

    (tmp_path / "config.json").write_text(json.dumps({**LLAMA32_CONFIG, "rope_parameters": rope}))
    with pytest.raises(ValueError, match=match) as e:
        load_checkpoint(str(tmp_path))
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


def test_meta_checkpoint_converted_to_hf_runs_in_transformers(tmp_path, llama3_meta_ckpt, meta_logits):
    """The q/k permutation with GQA and the scaling written to config.json, as transformers reads them."""
    from transformers import LlamaForCausalLM

    from llama.convert import convert

    convert(llama3_meta_ckpt, str(tmp_path / "hf"), to="hf")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.inference_mode():
        torch.testing.assert_close(model(tokens_for_test(0)).logits[0], meta_logits, **TOL)


def test_hf_checkpoint_converted_to_meta_keeps_factor_32(tmp_path, llama32_hf, hf_logits):
    from llama.convert import convert

    convert(llama32_hf[0], str(tmp_path / "meta"), to="meta")
    llama = Llama.build(str(tmp_path / "meta"), max_seq_len=N_POSITIONS, max_batch_size=1, device="cpu",
                        dtype="float32")
    with torch.inference_mode():
        torch.testing.assert_close(llama.model(tokens_for_test(1), 0)[0], hf_logits, **TOL)
