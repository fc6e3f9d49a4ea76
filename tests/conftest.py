"""Shared fixtures: the real models in ../shared/models (or $LLAMA_MODELS) and a built stories260K."""

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("LLAMA_MODELS", REPO.parent / "shared" / "models"))


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
