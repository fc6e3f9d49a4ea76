"""What a person sees: a progress bar on stderr that advances, and stdout with the generated text alone."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from conftest import REPO, models_path, write_random_checkpoint
from llama.model import ModelArgs


def test_quantizing_load_shows_an_advancing_bar_on_a_terminal(tmp_path, llama2_tokenizer):
    # About 700 MB of fp16 weights: quantizing them takes several seconds on a 2-core machine.
    args = ModelArgs(dim=1024, n_layers=24, n_heads=16, vocab_size=32000, multiple_of=256)
    write_random_checkpoint(tmp_path / "ckpt", args)
    master, slave = pty.openpty()
    # A new pty is 0 columns wide, where tqdm draws nothing; a terminal is wider.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    cmd = [sys.executable, "example_text_completion.py", "--ckpt_dir", str(tmp_path / "ckpt"),
           "--tokenizer_path", llama2_tokenizer, "--quantize", "int8", "--device", "cpu",
           "--prompts", "Hi", "--max_gen_len", "2", "--temperature", "0", "--max_seq_len", "16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        err += chunk
    out = proc.communicate(timeout=300)[0].decode()
    os.close(master)
    assert proc.returncode == 0, err.decode()[-2000:]
    shown = [int(p) for p in re.findall(r"quantizing to int8:\s+(\d+)%", err.decode())]
    assert len(set(shown)) >= 2 and shown == sorted(shown) and shown[-1] == 100, err.decode()[-2000:]
    assert "quantizing" not in out and out.startswith("Hi\n> ")  # the bar never reaches stdout


def complete_stdout(env_extra: dict, tmp_path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "llama.cli", "complete", "--ckpt_dir", models_path("stories260K-meta"),
           "--tokenizer_path", models_path("stories260K", "tok512.model"), "", "--temperature", "0",
           "--max_gen_len", "50", "--device", "cpu", "--quantize", "int8"]
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_extra}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_stdout_is_the_text_alone_with_and_without_a_compiler(tmp_path, reference_text):
    with_kernels = complete_stdout({}, tmp_path)
    # No compiler, and an empty extension cache so no earlier build is found: PyTorch ops.
    without = complete_stdout({"CXX": str(tmp_path / "no-such-compiler"),
                               "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}, tmp_path)
    assert with_kernels.returncode == without.returncode == 0, without.stderr[-2000:]
    assert "CPU kernels could not be built" in without.stderr
    assert with_kernels.stdout == without.stdout  # int8 through the kernels or through PyTorch
    text = with_kernels.stdout.removesuffix("\n")
    assert text and reference_text.startswith(text)  # int8 keeps the first 50 greedy tokens
