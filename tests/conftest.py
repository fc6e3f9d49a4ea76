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
STORIES_FORMS = ["stories260K-meta", "stories260K-meta-mp2", "stories260K-hf", "stories260K/stories260K.bin"]


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
