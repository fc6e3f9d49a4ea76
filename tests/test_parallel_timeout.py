"""A frozen model-parallel rank ends every rank with one clear line, within the configured timeout."""

import os
import subprocess
import sys
import time

from conftest import REPO, models_path

WORKER = """
import os, signal, sys
from llama import Llama, flags
from llama.parallel import rank

def main(argv):
    llama = Llama.build(sys.argv[1], sys.argv[2], max_seq_len=64, max_batch_size=1, device="cpu")
    if rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen, as a rank stuck in a debugger or swapped out
    llama.text_completion(["Once"], max_gen_len=8)

flags.run(main)
"""


def test_stopped_rank_ends_both_within_the_timeout(tmp_path, stories_tokenizer):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), models_path("stories260K-meta-mp2"), stories_tokenizer]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "LLAMA_DIST_TIMEOUT": "15"}
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=15 + 90)
    took = time.time() - start
    assert proc.returncode != 0
    assert took < 15 + 60 + 15, took  # the timeout, torchrun's grace period, and the start-up
    assert "error: rank 0: another model-parallel rank did not answer within 15 s" in proc.stderr, proc.stderr[-3000:]
