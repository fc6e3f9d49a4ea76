"""The warning when CPU decoding reads its weights far below the machine's memory speed."""

import logging

import pytest

from llama import bandwidth

PROMPT = [[1, 400, 500]]


@pytest.fixture
def fresh(monkeypatch):
    """A process that has not checked yet, with models of any size checked."""
    monkeypatch.setattr(bandwidth, "_checked", False)
    monkeypatch.setattr(bandwidth, "MIN_BYTES", 0)
    return monkeypatch


def test_step_bytes_are_the_weights_less_the_embedding(stories):
    model = stories.model
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    embedding = model.tok_embeddings.weight
    shared = embedding.data_ptr() == model.output.weight.data_ptr()
    expected = total if shared else total - embedding.numel() * embedding.element_size()
    assert bandwidth.step_bytes(model) == expected
    assert expected > 0


def test_slow_decoding_warns_once(stories, fresh, caplog):
    fresh.setattr(bandwidth, "one_core_read_speed", lambda: 1e15)  # a memory no step keeps up with
    with caplog.at_level(logging.WARNING, logger="llama.bandwidth"):
        stories.generate(PROMPT, bandwidth.WARM_UP + bandwidth.STEPS + 2, temperature=0)
        stories.generate(PROMPT, bandwidth.WARM_UP + bandwidth.STEPS + 2, temperature=0)
    warnings = [r for r in caplog.records if r.name == "llama.bandwidth"]
    assert len(warnings) == 1
    assert "GB/s" in warnings[0].getMessage() and "--threads" in warnings[0].getMessage()


def test_decoding_at_memory_speed_is_quiet(stories, fresh, caplog):
    fresh.setattr(bandwidth, "one_core_read_speed", lambda: 1.0)  # one byte a second: every step is faster
    with caplog.at_level(logging.WARNING, logger="llama.bandwidth"):
        stories.generate(PROMPT, bandwidth.WARM_UP + bandwidth.STEPS + 2, temperature=0)
    assert not [r for r in caplog.records if r.name == "llama.bandwidth"]
    assert bandwidth._checked


def test_short_decodes_and_small_models_measure_nothing(stories, fresh):
    def measured():
        raise AssertionError("the machine was measured")

    fresh.setattr(bandwidth, "one_core_read_speed", measured)
    stories.generate(PROMPT, bandwidth.WARM_UP + bandwidth.STEPS - 1, temperature=0)  # too few steps
    fresh.setattr(bandwidth, "MIN_BYTES", 64 << 20)  # stories260K is 1 MB: its steps are not memory-bound
    stories.generate(PROMPT, bandwidth.WARM_UP + bandwidth.STEPS + 2, temperature=0)
    assert not bandwidth._checked


def test_one_core_read_speed_is_plausible():
    speed = bandwidth.one_core_read_speed()
    assert 1e8 < speed < 1e13  # 0.1 GB/s to 10 TB/s
