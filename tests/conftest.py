"""Shared fixtures: the real models in ../shared/models (or $LLAMA_MODELS) and a built stories260K."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Absolute, so tests that start commands in other folders find it from a relative LLAMA_MODELS too.
MODELS = Path(os.environ.get("LLAMA_MODELS", REPO.parent / "shared" / "models")).resolve()


# fp32 noise floor on stories260K logits (which reach ~17): the same sums in another order move
# them by up to 2.5e-5 (MKL blocks a GEMM by its row count: cached vs full forward, measured) and
# 1.2e-5 (a model-parallel reduce of two halves, measured). Twice the larger; a wrong cache, mask,
# position or shard moves logits by ~1 or more.
FP32_ORDER = dict(atol=5e-5, rtol=0)


def models_path(*parts: str) -> str:
    """Path under the shared models folder; a missing folder fails the test run (CI needs it)."""
    path = MODELS.joinpath(*parts)
    if not path.exists():
        message = (f"{path} is missing: the tests need the shared models; set LLAMA_MODELS "
                   "to the folder that holds stories260K-meta/ etc.")
        if os.environ.get("LLAMA_ALLOW_MISSING_MODELS") == "1":
            pytest.skip(message)
        pytest.fail(message)
    return str(path)


@pytest.fixture(scope="session")
def reference_text() -> str:
    """The greedy 200-token stories260K story given in models/README.md."""
    readme = Path(models_path("README.md")).read_text()
    match = re.search(r"## Reference output.*?```\n(.*?)\n```", readme, re.S)
    assert match, "reference block not found in models/README.md"
    return match.group(1)


@pytest.fixture(scope="session")
def stories_tokenizer() -> str:
    return models_path("stories260K", "tok512.model")


@pytest.fixture(scope="session")
def llama2_tokenizer() -> str:
    return models_path("llama2-tokenizer", "tokenizer.model")


@pytest.fixture(scope="session")
def stories(stories_tokenizer):
    """stories260K (Meta layout) on CPU in fp32, batch 8, 512 positions."""
    from llama import Llama

    return Llama.build(models_path("stories260K-meta"), stories_tokenizer, max_seq_len=512,
                       max_batch_size=8, device="cpu", dtype="float32")


# Every shared form of stories260K; the torchrun fixture runs them all in one launch.
STORIES_FORMS = ["stories260K-meta", "stories260K-meta-mp2", "stories260K-hf", "stories260K/stories260K.bin",
                 "tiny-gguf/stories260K-f32.gguf"]


@pytest.fixture(scope="session")
def torchrun_results(tmp_path_factory, stories_tokenizer) -> dict:
    """tests/mp_worker.py on 2 processes (gloo, CPU) for every form: {form: {tokens, logits, text}}."""
    import torch

    out = tmp_path_factory.mktemp("torchrun") / "results.pt"
    paths = [models_path(*form.split("/")) for form in STORIES_FORMS]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "mp_worker.py"), str(out), stories_tokenizer, *paths]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(out, weights_only=True)
    return {form: results[path] for form, path in zip(STORIES_FORMS, paths)}


def write_random_checkpoint(path, args) -> int:
    """A Meta-layout fp16 checkpoint with random weights; returns the file size in bytes."""
    import torch

    from llama.model import Transformer

    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    sd = {k: (torch.randn(shape) * 0.02).half() for k, shape in shapes.items()}
    path.mkdir()
    params = {k: v for k, v in vars(args).items() if k not in ("max_batch_size", "max_seq_len", "hidden_dim")}
    (path / "params.json").write_text(json.dumps(params))
    torch.save(sd, path / "consolidated.00.pth")
    return os.path.getsize(path / "consolidated.00.pth")


# ---------------------------------------------------------------------------- Llama 3

# A random Llama 3.1-style model in Meta's layout: real head dim (128), GQA (2 query heads per kv
# head), ffn_dim_multiplier, the 128,256-word vocabulary and scaled RoPE, on a tiny width.
LLAMA3_PARAMS = {"dim": 256, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_dim_multiplier": 1.5,
                 "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                 "vocab_size": 128256}
# A random Llama 3.2-style Hugging Face config: head dim 64 as 3.2-1B's, tied embeddings, RoPE
# scaling factor 32, Meta's special-token ids.
LLAMA32_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
                  "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 131072,
                  "rms_norm_eps": 1e-05, "tie_word_embeddings": True, "vocab_size": 128256,
                  "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
                  "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}}


@pytest.fixture(scope="session")
def llama3_tokenizer() -> str:
    """Meta's real Llama 3 tokenizer.model, shipped inside the llama-models package."""
    import llama_models

    return str(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")


@pytest.fixture(scope="session")
def llama3_reference_tokenizer(llama3_tokenizer):
    """Meta's own Llama 3 Tokenizer (llama-models) over that file: the independent reference."""
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(Path(llama3_tokenizer))


@pytest.fixture(scope="session")
def llama3_tokenizer_json(tmp_path_factory, llama3_tokenizer, llama3_reference_tokenizer) -> str:
    """A tokenizer.json made from the Llama 3 tokenizer.model by transformers' own converter, with
    Meta's pattern and special tokens taken from Meta's reference tokenizer."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ref = llama3_reference_tokenizer
    specials = sorted(ref.special_tokens, key=ref.special_tokens.get)
    converted = TikTokenConverter(vocab_file=llama3_tokenizer, pattern=ref.pat_str,
                                  extra_special_tokens=specials).converted()
    path = tmp_path_factory.mktemp("llama3-json") / "tokenizer.json"
    converted.save(str(path))
    return str(path)


def random_llama_weights(shapes: dict, seed: int = 0) -> dict:
    """Weights whose activations and logits stay near unit size: matrices (the embeddings too,
    which may be the output layer) N(0, 1/fan_in), norms near 1; rounded to bf16 values (what
    Meta ships), kept in fp32."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        sd[key] = t.bfloat16().float()
    return sd


@pytest.fixture(scope="session")
def llama3_meta_ckpt(tmp_path_factory, llama3_tokenizer) -> str:
    """LLAMA3_PARAMS in Meta's layout (bf16 consolidated.00.pth, params.json, tokenizer.model)."""
    import torch

    from llama.model import ModelArgs, Transformer

    path = tmp_path_factory.mktemp("llama3") / "Llama3.1-tiny"
    path.mkdir()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(ModelArgs(**LLAMA3_PARAMS)).state_dict().items()}
    torch.save({k: v.bfloat16() for k, v in random_llama_weights(shapes).items()}, path / "consolidated.00.pth")
    (path / "params.json").write_text(json.dumps(LLAMA3_PARAMS))
    os.symlink(llama3_tokenizer, path / "tokenizer.model")
    return str(path)


@pytest.fixture(scope="session")
def llama32_hf(tmp_path_factory, llama3_tokenizer_json):
    """(folder, model): LLAMA32_CONFIG as a transformers LlamaForCausalLM with random weights, saved
    by transformers in bf16 with only tokenizer.json beside it; the model stays in fp32."""
    import copy
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in LLAMA32_CONFIG.items() if k not in ("architectures", "model_type")})
    model = LlamaForCausalLM(config).float().eval()
    shapes = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}
    model.load_state_dict(random_llama_weights(shapes, seed=1), strict=False)  # lm_head is tied
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    path = tmp_path_factory.mktemp("llama32") / "Llama-3.2-tiny-hf"
    # A bf16 copy is saved: converting the model itself would round its fp32 RoPE buffer too.
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)
    shutil.copyfile(llama3_tokenizer_json, path / "tokenizer.json")
    return str(path), model


@pytest.fixture(scope="session")
def tok(llama3_tokenizer):
    """The real Llama 3 tokenizer.model (tiktoken ranks), opened once."""
    from llama import Tokenizer

    return Tokenizer(llama3_tokenizer)


@pytest.fixture(scope="session")
def tok_json(llama3_tokenizer_json):
    """The same tokenizer as a Hugging Face tokenizer.json, opened once."""
    from llama import Tokenizer

    return Tokenizer(llama3_tokenizer_json)
