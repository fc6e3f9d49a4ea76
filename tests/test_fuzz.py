"""Random and mutated configurations and call arguments: every failure is a documented exception
whose one-line message names the file, key or argument (README, "What happens when...").

Fixed budgets (derandomize=True, a stated max_examples) keep this under a minute.
"""

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import models_path
from llama import Llama

DOCUMENTED = (ValueError, TypeError, OSError, FloatingPointError)  # no raw torch RuntimeError
SETTINGS = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])

VALUES = st.one_of(
    st.integers(-5, 5), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.booleans(), st.none(), st.lists(st.integers(0, 4), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(0, 4), max_size=2),
)


def build(path: str, tokenizer: str | None = None):
    return Llama.build(path, tokenizer or models_path("stories260K", "tok512.model"), max_seq_len=32,
                       max_batch_size=1, device="cpu", dtype="float32")


def check_failure(error: BaseException, *names: str) -> None:
    """A documented type, one line, naming one of `names` (a file, a key, an argument)."""
    assert isinstance(error, DOCUMENTED), f"{type(error).__name__}: {error}"
    message = str(error)
    assert message and "\n" not in message, message
    assert any(n in message for n in names), f"{message!r} names none of {names}"


def mutate(base: dict, data) -> dict:
    config = dict(base)
    for key in data.draw(st.lists(st.sampled_from(sorted(base)), max_size=3, unique=True), label="changed"):
        config[key] = data.draw(VALUES, label=key)
    if data.draw(st.booleans(), label="drop a key") and config:
        config.pop(data.draw(st.sampled_from(sorted(config)), label="dropped"))
    return config


def load_with(folder_name: str, config_name: str, config: dict) -> None:
    """Build a copy of a shared checkpoint whose config file is `config` (weights symlinked)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(models_path(folder_name))
        for f in os.listdir(src):
            if f != config_name:
                os.symlink(src / f, Path(tmp) / f)
        (Path(tmp) / config_name).write_text(json.dumps(config))
        try:
            build(tmp)
        except BaseException as e:  # judged below
            check_failure(e, config_name, *[f"{k}" for k in config], tmp)


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_mutated_params_json(data):
    base = json.loads(Path(models_path("stories260K-meta", "params.json")).read_text())
    load_with("stories260K-meta", "params.json", mutate(base, data))


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_mutated_config_json(data):
    base = json.loads(Path(models_path("stories260K-hf", "config.json")).read_text())
    load_with("stories260K-hf", "config.json", mutate(base, data))


@settings(max_examples=40, **SETTINGS)
@given(header=st.lists(st.integers(-(2**31), 2**31 - 1) | st.integers(-3, 600), min_size=7, max_size=7))
def test_random_llama2c_headers(header):
    body = Path(models_path("stories260K", "stories260K.bin")).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.bin"
        path.write_bytes(struct.pack("<7i", *header) + body[28:])
        shutil.copy(models_path("stories260K", "tok512.model"), Path(tmp) / "tokenizer.model")
        try:
            build(str(path))
        except BaseException as e:  # judged below
            check_failure(e, str(path))


ARGS = {
    "temperature": VALUES, "top_p": VALUES, "max_gen_len": VALUES, "logprobs": VALUES, "echo": VALUES,
    "seed": VALUES, "stop": VALUES, "stop_token_ids": VALUES,
}


@pytest.fixture(scope="module")
def small(stories_tokenizer):
    return build(models_path("stories260K-meta"), stories_tokenizer)


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_random_call_arguments(small, data):
    kwargs = data.draw(st.fixed_dictionaries({}, optional=ARGS), label="kwargs")
    prompts = data.draw(st.one_of(st.lists(st.text(max_size=8), min_size=1, max_size=2), VALUES), label="prompts")
    if isinstance(kwargs.get("max_gen_len"), int) and not isinstance(kwargs["max_gen_len"], bool):
        kwargs["max_gen_len"] = min(kwargs["max_gen_len"], 8)  # keep each call short
    try:
        small.text_completion(prompts, **kwargs)
    except BaseException as e:  # judged below
        check_failure(e, "prompt", *kwargs)
