"""A build computes with the cores other processes leave idle, or the thread count it is given."""

import os
import subprocess
import sys
import time

import pytest
import torch

from llama.options import BuildOptions
from llama.threads import busy_elsewhere, pick_threads, usable_cores


@pytest.fixture
def restore_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_busy_loop_on_one_core_is_left_out(restore_threads):
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it take its core
        assert busy_elsewhere(0.3) > 0.6
        assert pick_threads(None) <= max(1, usable_cores() - 1)
    finally:
        spin.kill()
        spin.wait()


def test_given_threads_and_omp_num_threads_are_kept(restore_threads, monkeypatch):
    assert pick_threads(1) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    assert pick_threads(None) == 2  # OMP_NUM_THREADS set: no sampling, nothing changed


def test_threads_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="threads"):
        BuildOptions(ckpt_dir="x", threads=0)


def test_the_build_flag_reaches_the_build(restore_threads, stories_tokenizer):
    from conftest import models_path
    from llama import Llama

    Llama.build(models_path("stories260K-meta"), stories_tokenizer, max_seq_len=64, max_batch_size=1,
                device="cpu", threads=1)
    assert torch.get_num_threads() == 1
    assert os.environ.get("OMP_NUM_THREADS") is None
