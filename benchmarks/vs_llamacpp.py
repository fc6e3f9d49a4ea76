"""This package against llama.cpp itself: the same machine, the same GGUF files, one run.

llama.cpp is the copy vendored by the `llama-cpp-python` source package, built here with cmake
(llama-bench, llama-batched-bench, llama-quantize). Random weights of a real shape are written
as a Meta checkpoint (benchmarks/bench.py), converted to an f16 GGUF by this package's writer,
and `llama-quantize --pure` makes the f32, q8_0 and q4_0 files from it (every matrix one type,
the embedding and output too), so both engines read the very same files. The engines alternate;
figures are medians of --repeats runs. Not part of CI.

    python benchmarks/vs_llamacpp.py --build                 # once: download and build llama.cpp
    python benchmarks/vs_llamacpp.py --models 110M,1.1B --types f32,f16,q8_0,q4_0
"""

import argparse
import functools
import glob
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import SHAPES, log, write_random_checkpoint  # noqa: E402

WORK = os.environ.get("LLAMA_BENCH_DIR", os.path.join(os.path.dirname(REPO), "benchtmp", "vs-llamacpp"))
TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize")
# This package's builds of each GGUF type: (name, Llama.build options); the table shows the best.
OURS = {
    "f32": [("fp32", dict(dtype="float32"))],
    "f16": [("fp16", dict(dtype="float16")), ("bf16", dict(dtype="bfloat16"))],
    "q8_0": [("int8", dict(dtype="float32", quantize="int8")), ("q8_0 as fp32", dict(dtype="float32"))],
    "q4_0": [("int4 (the file's)", dict(dtype="float32"))],
}
QUANTIZE_NAMES = {"f32": "F32", "q8_0": "Q8_0", "q4_0": "Q4_0"}


# ---------------------------------------------------------------------------- llama.cpp


def build_llama_cpp(work: str) -> str:
    """Download the llama-cpp-python source package and build llama.cpp's tools; returns bin/."""
    src = os.path.join(work, "src")
    if not glob.glob(os.path.join(src, "llama_cpp_python-*", "vendor", "llama.cpp")):
        os.makedirs(src, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        "llama-cpp-python", "-d", src], check=True)
        with tarfile.open(glob.glob(os.path.join(src, "llama_cpp_python-*.tar.gz"))[0]) as tar:
            tar.extractall(src, filter="data")
    llama_cpp = glob.glob(os.path.join(src, "llama_cpp_python-*", "vendor", "llama.cpp"))[0]
    out = os.path.join(work, "build")
    subprocess.run(["cmake", "-S", llama_cpp, "-B", out, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"], check=True)
    subprocess.run(["cmake", "--build", out, "-j", str(os.cpu_count() or 2), "--target", *TOOLS], check=True)
    return os.path.join(out, "bin")


def llama_bench(bin_dir: str, path: str, threads: int, prompt: int, gen: int) -> float:
    """tokens/s of one llama-bench test (pp `prompt` or tg `gen`), one repetition."""
    out = subprocess.run([os.path.join(bin_dir, "llama-bench"), "-m", path, "-t", str(threads), "-p", str(prompt),
                          "-n", str(gen), "-r", "1", "-o", "json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)[0]["avg_ts"]


def llama_batched(bin_dir: str, path: str, threads: int, gen: int, batch: int) -> float:
    """Generated tokens/s of `batch` sequences at once (llama-batched-bench, 16-token prompts)."""
    out = subprocess.run([os.path.join(bin_dir, "llama-batched-bench"), "-m", path, "-t", str(threads),
                          "-c", str(batch * (16 + gen) + 64), "-npp", "16", "-ntg", str(gen), "-npl", str(batch),
                          "--output-format", "jsonl"], check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return rows[-1]["speed_tg"]


# ---------------------------------------------------------------------------- files


def gguf_files(model: str, types: list[str], bin_dir: str) -> dict[str, str]:
    """{type: path} of the GGUF files of a random `model`, written when missing."""
    from llama.convert import convert

    folder = os.path.join(WORK, model)
    f16 = os.path.join(folder, f"{model}-f16.gguf")
    if not os.path.exists(f16):
        meta = os.path.join(folder, "meta")
        if not os.path.exists(os.path.join(meta, "consolidated.00.pth")):
            write_random_checkpoint(meta, SHAPES[model])
        tokenizer = os.path.join(os.path.dirname(REPO), "shared", "models", "llama2-tokenizer", "tokenizer.model")
        convert(meta, f16, to="gguf", tokenizer_path=os.environ.get("LLAMA_TOKENIZER", tokenizer), outtype="f16")
    files = {"f16": f16}
    for t in types:
        path = os.path.join(folder, f"{model}-{t}.gguf")
        if t != "f16" and not os.path.exists(path):
            subprocess.run([os.path.join(bin_dir, "llama-quantize"), "--pure", f16, path, QUANTIZE_NAMES[t], "2"],
                           check=True, capture_output=True)
        files[t] = path
    return files


# ---------------------------------------------------------------------------- this package

OURS_SCRIPT = """
import json, sys, time, torch
from llama import Llama
from llama.bandwidth import WARM_UP, STEPS, step_bytes
path, options, threads, prompt, gen, batch = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:7])
torch.set_num_threads(threads)
llm = Llama.build(path, max_seq_len=max(prompt, 16) + gen + 1, max_batch_size=batch, device="cpu", threads=threads,
                  **options)
nbytes = step_bytes(llm.model)
g = torch.Generator().manual_seed(0)
rows = [[1] + torch.randint(3, llm.model.vocab_size, (max(prompt, 16) - 1,), generator=g).tolist()
        for _ in range(batch)]
def timed(rows, n):
    t = time.perf_counter()
    out, _ = llm.generate(rows, n, temperature=0)
    return time.perf_counter() - t, sum(len(o) for o in out)
timed(rows, WARM_UP + STEPS + 4)  # warm-up, compilation and the package's one-time bandwidth check
t1, _ = timed(rows, 1)  # prefill and one token
if gen:
    tn, n = timed(rows, gen)
    print(json.dumps({"tg": (n - len(rows)) / (tn - t1), "bytes": nbytes}))  # tokens after each row's first
else:
    print(json.dumps({"pp": prompt / t1, "bytes": nbytes}))
"""


def ours(path: str, options: dict, threads: int, prompt: int, gen: int, batch: int = 1) -> float:
    out = subprocess.run([sys.executable, "-c", OURS_SCRIPT, path, json.dumps(options), str(threads), str(prompt),
                          str(gen), str(batch)], check=True, capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    OUR_BYTES[path, json.dumps(options)] = result["bytes"]
    return result["tg" if gen else "pp"]


OUR_BYTES: dict[tuple[str, str], int] = {}  # (file, options): the bytes a decoding step reads


def file_bytes_per_token(path: str) -> int:
    """The bytes of a GGUF file that llama.cpp reads a decoding step: every tensor but the embedding
    table, of which it reads one row (unless the output layer is that table)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    tied = "output.weight" not in tensors
    return sum(n for name, n in tensors.items() if name != "token_embd.weight" or tied)


def cpu_idle(seconds: float = 1.0) -> float:
    """The share of all cores idle over `seconds` (/proc/stat): this VM's load average stays near 1
    even when nothing runs, so the benchmark prints both."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(total1 - total0, 1)


# ---------------------------------------------------------------------------- main


def measure(label: str, theirs, mine: dict, repeats: int) -> dict:
    """Alternate llama.cpp and each of our variants `repeats` times; medians."""
    runs = {"llama.cpp": [], **{name: [] for name in mine}}
    for _ in range(repeats):
        runs["llama.cpp"].append(theirs())
        for name, fn in mine.items():
            runs[name].append(fn())
    med = {name: statistics.median(v) for name, v in runs.items()}
    best = max((n for n in med if n != "llama.cpp"), key=med.get)
    log(f"{label}: llama.cpp {med['llama.cpp']:.1f}, " + ", ".join(f"{n} {med[n]:.1f}" for n in mine))
    return {"llama.cpp": med["llama.cpp"], "ours": med[best], "variant": best, "ratio": med[best] / med["llama.cpp"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", action="store_true", help="download and build llama.cpp, then stop")
    p.add_argument("--models", default="110M,1.1B")
    p.add_argument("--types", default="f32,f16,q8_0,q4_0")
    p.add_argument("--tests", default="tg1,pp128,pp512,tg8", help="decode batch 1/8 (128 tokens), prefill")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="build this package's models with compile=True")
    a = p.parse_args()
    bin_dir = os.path.join(WORK, "build", "bin")
    if a.build or not all(os.path.exists(os.path.join(bin_dir, t)) for t in TOOLS):
        bin_dir = build_llama_cpp(WORK)
        if a.build:
            return
    print(f"load average at start: {os.getloadavg()[0]:.2f} (1 min); CPU idle over 1 s: {cpu_idle():.0%}; "
          f"{a.threads} threads; {time.strftime('%Y-%m-%d %H:%M')}")
    print("| model | type | test | llama.cpp tok/s | this package tok/s (best variant) | ratio | MB a step read "
          "(llama.cpp / this package) |")
    print("|---|---|---|---|---|---|---|")
    for model in a.models.split(","):
        files = gguf_files(model, a.types.split(","), bin_dir)
        for t in a.types.split(","):
            for test in a.tests.split(","):
                kind, n = test[:2], int(test[2:])
                prompt, gen, batch = (n, 0, 1) if kind == "pp" else (0, 128, n)
                if batch == 1:
                    theirs = functools.partial(llama_bench, bin_dir, files[t], a.threads, prompt, gen)
                else:
                    theirs = functools.partial(llama_batched, bin_dir, files[t], a.threads, gen, batch)
                variants = {name: {**opts, "compile": a.compile} for name, opts in OURS[t]}
                mine = {name: functools.partial(ours, files[t], opts, a.threads, prompt, gen, batch)
                        for name, opts in variants.items()}
                r = measure(f"{model} {t} {test}", theirs, mine, a.repeats)
                mb = OUR_BYTES[files[t], json.dumps(variants[r["variant"]])] / 1e6
                print(f"| {model} | {t} | {test} | {r['llama.cpp']:.1f} | {r['ours']:.1f} ({r['variant']}) | "
                      f"{r['ratio']:.2f} | {file_bytes_per_token(files[t]) / 1e6:.1f} / {mb:.1f} |", flush=True)


if __name__ == "__main__":
    main()
