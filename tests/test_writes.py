"""convert and quantize never leave a destination that looks valid but is not, and say why a write failed."""

import hashlib
import os
import random
import resource
import subprocess
import sys
import time

import pytest

from conftest import REPO, models_path, write_random_checkpoint
from llama import Llama
from llama.model import ModelArgs

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    """A 110M-shape fp16 checkpoint (about 250 MB): converting it takes seconds, time to be killed in."""
    path = tmp_path_factory.mktemp("src") / "ckpt"
    write_random_checkpoint(path, ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=256))
    return path


def digest(folder) -> dict:
    return {p: hashlib.md5((folder / p).read_bytes()).hexdigest() for p in sorted(os.listdir(folder))}


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_kill_9_anywhere_leaves_no_destination_that_is_partial(tmp_path, big_source, llama2_tokenizer, seed):
    """Killed at a seeded moment, convert leaves either nothing at DST or the whole checkpoint,
    and never changes its source."""
    before = digest(big_source)
    dst = tmp_path / "out"
    cmd = [sys.executable, "-m", "llama.convert", str(big_source), str(dst), "--to", "hf",
           "--tokenizer_path", llama2_tokenizer]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(1.0, 6.0))  # start-up takes 1-2 s, the writing a few more
    proc.kill()
    proc.wait()
    if dst.exists():
        assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors", "tokenizer.model"]
        Llama.build(str(dst), max_seq_len=32, max_batch_size=1, device="cpu")  # complete: it loads
    leftovers = [p for p in os.listdir(tmp_path) if p != "out"]
    assert all(p.startswith(".out.") and p.endswith(".partial") for p in leftovers)  # hidden, never loaded
    assert digest(big_source) == before


def test_file_size_limit_is_one_clear_line(tmp_path):
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    cmd = [sys.executable, "-m", "llama.quantize", models_path("stories260K-meta"), str(tmp_path / "q"),
           "--dtype", "float32"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, preexec_fn=small_files, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: file too large for") and "ulimit -f" in last, proc.stderr[-2000:]
    assert os.listdir(tmp_path) == []


def test_full_disk_is_one_clear_line(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], check=True)
    try:
        cmd = [sys.executable, "-m", "llama.convert", models_path("stories260K-meta"), str(disk / "hf"), "--to", "hf"]
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: no space left on the disk of"), proc.stderr[-2000:]
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)
