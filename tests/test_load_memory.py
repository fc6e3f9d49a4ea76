"""Loading never holds two copies: peak RSS of a 110M-shape fp16 build stays under 1.5x the file."""

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO, write_random_checkpoint
from llama.model import ModelArgs

MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    from llama import Llama

    def rss_kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    ckpt, tokenizer = sys.argv[1:3]
    before = rss_kb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    llama = Llama.build(ckpt, tokenizer, max_seq_len=64, max_batch_size=1, device="cpu", dtype="float16")
    built = rss_kb("VmHWM")
    tokens, _ = llama.generate([[1, 450, 4123]], max_gen_len=4, temperature=0)
    print(json.dumps({"before_kb": before, "build_peak_kb": built, "run_peak_kb": rss_kb("VmHWM"),
                      "dtype": str(llama.model.output.weight.dtype), "n": len(tokens[0])}))
""")


def test_fp16_build_peak_rss_below_one_and_a_half_checkpoints(tmp_path, llama2_tokenizer):
    args = ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=256)
    size = write_random_checkpoint(tmp_path / "ckpt", args)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "ckpt"), llama2_tokenizer],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["dtype"] == "torch.float16" and m["n"] == 4
    build_extra = (m["build_peak_kb"] - m["before_kb"]) * 1024
    run_extra = (m["run_peak_kb"] - m["before_kb"]) * 1024
    print(f"checkpoint {size / 2**20:.0f} MiB; build +{build_extra / 2**20:.0f} MiB; "
          f"build and 4 tokens +{run_extra / 2**20:.0f} MiB")
    assert build_extra < 1.5 * size
    assert run_extra < 1.5 * size  # every weight page touched by now
