"""Decode speed with a busy neighbour: a busy loop on one core, against the quiet machine.

Prints tokens/s of greedy decoding (one row, 100 tokens after a 16-token prompt) for: the quiet
machine with 1 thread; the busy machine with the default threads (the cores other processes leave
idle, llama.threads); the busy machine with every core. Each figure is the median of 3 builds.

    python benchmarks/busy_neighbour.py [CKPT ...]    # default: stories260K and a 110M-shape GGUF
"""

import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.environ.get("LLAMA_MODELS", os.path.join(os.path.dirname(REPO), "shared", "models"))
DEFAULT = [os.path.join(MODELS, "stories260K-meta"),
           os.path.join(os.path.dirname(REPO), "benchtmp", "vs-llamacpp", "110M", "110M-f32.gguf")]

DECODE = """
import sys, time, torch
from llama import Llama
path, threads = sys.argv[1], (int(sys.argv[2]) or None)
tok = None if path.endswith(".gguf") else sys.argv[3]
llm = Llama.build(path, tok, max_seq_len=160, max_batch_size=1, device="cpu", dtype="float32", threads=threads)
m, x = llm.model, torch.tensor([[1]])
with torch.inference_mode():
    m(torch.tensor([[1] * 16]), 0)
    for p in range(16, 24):
        m(x, p)
    t = time.perf_counter()
    for p in range(24, 124):
        m(x, p)
print(100 / (time.perf_counter() - t), torch.get_num_threads())
"""


def decode(path: str, threads: int) -> tuple[float, int]:
    tokenizer = os.path.join(MODELS, "stories260K", "tok512.model")
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", DECODE, path, str(threads), tokenizer], check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO})
        speed, used = out.stdout.split()
        runs.append(float(speed))
    return statistics.median(runs), int(used)


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores; load average at start {os.getloadavg()[0]:.2f}")
    print("| checkpoint | quiet, 1 thread | busy, default threads | busy, all threads | default / quiet |")
    print("|---|---|---|---|---|")
    for path in sys.argv[1:] or DEFAULT:
        quiet, _ = decode(path, 1)
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            auto, used = decode(path, 0)
            every, _ = decode(path, cores)
        finally:
            spin.kill()
            spin.wait()
        print(f"| {os.path.basename(path)} | {quiet:.1f} | {auto:.1f} ({used} thread(s)) | {every:.1f} | "
              f"{auto / quiet:.2f} |", flush=True)


if __name__ == "__main__":
    main()
