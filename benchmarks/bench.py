"""Speed and memory of Llama.build + generate on this machine, for real model shapes.

Random-weight checkpoints of real shapes are written on the fly in Meta's layout (fp16,
tensor by tensor, into a temporary directory), next to the real stories260K. Every
(model, variant) runs in its own process so its peak RSS is its own. In the same run the
machine's memory read bandwidth is measured, and decode speed is shown as a share of the
limit it sets: bandwidth / bytes of weights streamed per token.

    python benchmarks/bench.py                                  # everything but 7B
    python benchmarks/bench.py --models stories260K,110M --variants fp32,bf16
    python benchmarks/bench.py --models 7B --variants fp16,int8,int4 --batch8 False
"""

import argparse
import json
import logging
import math
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from llama.memory import estimate, weight_bytes  # noqa: E402
from llama.model import ModelArgs  # noqa: E402
from llama.quant import DEFAULT_GROUP_SIZE  # noqa: E402

MODELS_DIR = os.environ.get("LLAMA_MODELS", os.path.join(os.path.dirname(REPO), "shared", "models"))
# Meta params.json of each shape (vocab 32000: the Llama 2 tokenizer).
SHAPES = {
    "15M": dict(dim=288, n_layers=6, n_heads=6, multiple_of=32),
    "110M": dict(dim=768, n_layers=12, n_heads=12, multiple_of=32),
    "1.1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, multiple_of=256),
    "7B": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256),
}
ALL_MODELS = ["stories260K", "15M", "110M", "1.1B", "7B"]
# variant -> Llama.build kwargs
VARIANTS = {
    "fp32": dict(dtype="float32"),
    "fp16": dict(dtype="float16"),
    "bf16": dict(dtype="bfloat16"),
    "int8": dict(dtype="bfloat16", quantize="int8"),
    "int4": dict(dtype="bfloat16", quantize="int4"),
    "int4-g32": dict(dtype="bfloat16", quantize="int4", group_size=32),
}


def variant_kwargs(name: str) -> dict:
    """build() kwargs of a variant name; a "+compile" suffix adds compile=True."""
    base, plus, rest = name.partition("+")
    if base not in VARIANTS or (plus and rest != "compile"):
        raise ValueError(f"unknown variant {name!r}; use one of {sorted(VARIANTS)}, optionally with +compile")
    return {**VARIANTS[base], **({"compile": True} if plus else {})}


# ---------------------------------------------------------------------------- checkpoints


def write_random_checkpoint(path: str, params: dict, seed: int = 0) -> None:
    """Meta layout (params.json + consolidated.00.pth, fp16) with N(0, 1/fan_in) weights.

    The file is laid out first with no data (torch.serialization.skip_data), then filled one
    tensor at a time through a shared memory map, so no full copy is ever in memory.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    os.makedirs(path, exist_ok=True)
    args = ModelArgs(**params, vocab_size=32000)
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump({**params, "norm_eps": 1e-5, "vocab_size": -1}, f)
    with FakeTensorMode():
        shapes = {k: torch.empty(s, dtype=torch.float16) for k, s in meta_shapes(args).items()}
    pth = os.path.join(path, "consolidated.00.pth")
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(shapes, pth)
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        sd = torch.load(pth, mmap=True, weights_only=True)
    finally:
        torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
    gen = torch.Generator().manual_seed(seed)
    for key, t in sd.items():
        if key.endswith("norm.weight"):
            t.fill_(1.0)
            continue
        std = 1.0 / math.sqrt(t.shape[1]) if key != "tok_embeddings.weight" else 1.0
        for rows in t.split(max(1, (1 << 24) // t.shape[1])):
            rows.copy_(torch.randn(rows.shape, generator=gen).mul_(std))
    del sd


def meta_shapes(args: ModelArgs) -> dict:
    dim, hidden, kv = args.dim, args.ffn_hidden_dim, args.kv_heads * args.head_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes |= {p + "attention.wq.weight": (dim, dim), p + "attention.wk.weight": (kv, dim),
                   p + "attention.wv.weight": (kv, dim), p + "attention.wo.weight": (dim, dim),
                   p + "feed_forward.w1.weight": (hidden, dim), p + "feed_forward.w2.weight": (dim, hidden),
                   p + "feed_forward.w3.weight": (hidden, dim),
                   p + "attention_norm.weight": (dim,), p + "ffn_norm.weight": (dim,)}
    return shapes | {"norm.weight": (dim,), "output.weight": (args.vocab_size, dim)}


def model_paths(name: str, tmp: str) -> tuple[str, str]:
    """(ckpt_dir, tokenizer_path) of a model, writing a random checkpoint if needed."""
    if name == "stories260K":
        return os.path.join(MODELS_DIR, "stories260K-meta"), os.path.join(MODELS_DIR, "stories260K", "tok512.model")
    path = os.path.join(tmp, name)
    if not os.path.exists(os.path.join(path, "consolidated.00.pth")):
        t = time.time()
        write_random_checkpoint(path, SHAPES[name])
        log(f"wrote random {name} checkpoint in {time.time() - t:.0f} s")
    return path, os.path.join(MODELS_DIR, "llama2-tokenizer", "tokenizer.model")


# ---------------------------------------------------------------------------- measuring


def read_bandwidth(threads: int, gb: float = 1.0) -> float:
    """Bytes per second of the fastest full read of a `gb` GB fp32 tensor we know in PyTorch:
    the better of sum() and an fp32 matrix-vector product (median of 7 each)."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gb * 1e9 / 4) // 4096 * 4096)
    w, v = x.view(-1, 4096), torch.ones(1, 4096)  # (rows, 4096), (1, 4096)
    best = 0.0
    for fn in (x.sum, lambda: torch.nn.functional.linear(v, w)):
        fn()
        times = []
        for _ in range(7):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        best = max(best, x.nbytes / statistics.median(times))
    return best


def run_one(model: str, variant: str, ckpt: str, tok: str, threads: int, prompt_len: int, gen: int,
            batch8: bool) -> dict:
    """Build and time one configuration in this process; returns the figures."""
    from llama import Llama

    torch.set_num_threads(threads)
    bsz = 8 if batch8 else 1
    t = time.time()
    llm = Llama.build(ckpt, tok, max_seq_len=prompt_len + gen + 1, max_batch_size=bsz, device="cpu",
                      **variant_kwargs(variant))
    build_s = time.time() - t
    vocab = llm.model.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, vocab, (prompt_len - 1,), generator=g).tolist() for _ in range(bsz)]

    def timed(rows, n):
        t = time.perf_counter()
        out, _ = llm.generate(rows, n, temperature=0)
        return time.perf_counter() - t, sum(len(o) for o in out)

    timed(prompts[:1], 4)  # warm-up (and compilation)
    res = {"build_s": build_s}
    t1, _ = timed(prompts[:1], 1)
    res["prefill"] = prompt_len / t1
    runs = []
    for _ in range(3 if gen <= 64 and model != "7B" else 1):
        tn, n = timed(prompts[:1], gen)
        runs.append((n - 1) / max(tn - t1, 1e-9))
    res["decode1"] = statistics.median(runs)
    if batch8:
        timed(prompts, 4)  # warm-up of the batch-8 shapes (and their compilation)
        t1, _ = timed(prompts, 1)
        tn, n = timed(prompts, gen)
        res["decode8"] = (n - bsz) / max(tn - t1, 1e-9)
    with open("/proc/self/status") as f:
        res["peak_rss"] = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    res["dtype"] = str(llm.model.tok_embeddings.weight.dtype).replace("torch.", "")
    return res


def streamed_bytes(args: ModelArgs, dtype: torch.dtype, quantize: str | None, group_size: int) -> int:
    """Weights read per decoded token: all but the embedding table (one row of it is read)."""
    b = torch.finfo(dtype).bits // 8
    return weight_bytes(args, dtype, quantize, group_size) - args.vocab_size * args.dim * b


# ---------------------------------------------------------------------------- main


def _names(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(models: str = ",".join(ALL_MODELS[:-1]), variants: str = "fp32,fp16,bf16,int8,int4",
         threads: int = 2, prompt_len: int = 32, gen: int = 64, batch8: bool = True,
         tmp: str | None = None, keep: bool = False, out: str | None = None) -> None:
    """Print a markdown table; `out` also writes it (with the command) to a file."""
    cmd = "python benchmarks/bench.py " + " ".join(sys.argv[1:])
    models, variants = _names(models), _names(variants)
    load_start = _loadavg()
    bw = read_bandwidth(threads)
    log(f"memory read bandwidth: {bw / 1e9:.1f} GB/s ({threads} threads)")
    tmp_dir = tmp or tempfile.mkdtemp(prefix="llama-bench-")
    rows = []
    try:
        for model in models:
            ckpt, tok = model_paths(model, tmp_dir)
            from llama.checkpoint import read_params

            args = read_params(ckpt)
            args.vocab_size = 512 if model == "stories260K" else 32000
            n_gen = 256 if model == "stories260K" else (32 if model == "7B" else gen)
            for variant in variants:
                kw = variant_kwargs(variant)
                bench_dir = os.path.join(REPO, "benchmarks")
                code = (f"import json,sys; sys.path.insert(0, {bench_dir!r}); from bench import run_one; "
                        f"print(json.dumps(run_one({model!r}, {variant!r}, {ckpt!r}, {tok!r}, {threads}, "
                        f"{prompt_len}, {n_gen}, {batch8 and model != '7B'})))")
                log(f"{model} {variant} ...")
                p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
                if p.returncode:
                    log(f"  failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
                    rows.append((model, variant, None, None))
                    continue
                res = json.loads(p.stdout.strip().splitlines()[-1])
                dt = getattr(torch, res["dtype"])
                bsz = 8 if (batch8 and model != "7B") else 1
                gs = kw.get("group_size", DEFAULT_GROUP_SIZE)
                est = estimate(args, prompt_len + n_gen + 1, bsz, dt, kw.get("quantize"), gs)
                limit = bw / streamed_bytes(args, dt, kw.get("quantize"), gs)
                rows.append((model, variant, res, dict(est=est.total, limit=limit)))
                log("  " + format_row(rows[-1]))
    finally:
        if not keep and tmp is None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    table = format_table(rows, bw, threads, load_start)
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(f"Command: `{cmd}`\n\n{table}\n")


HEADER = ("| model | variant | build s | prefill tok/s | decode tok/s b1 | decode tok/s b8 | "
          "b1 limit tok/s | b1 % of limit | peak RSS GB | estimate GB |")


def format_row(row) -> str:
    model, variant, res, x = row
    if res is None:
        return f"| {model} | {variant} | failed | | | | | | | |"
    d8 = f"{res['decode8']:.0f}" if "decode8" in res else "-"
    return (f"| {model} | {variant} | {res['build_s']:.1f} | {res['prefill']:.0f} | {res['decode1']:.1f} | {d8} | "
            f"{x['limit']:.1f} | {100 * res['decode1'] / x['limit']:.0f}% | {res['peak_rss'] / 1e9:.2f} | "
            f"{x['est'] / 1e9:.2f} |")


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def format_table(rows, bw: float, threads: int, load_start: str) -> str:
    lines = [f"CPU, {threads} threads, torch {torch.__version__}; memory read bandwidth {bw / 1e9:.1f} GB/s; "
             "limit = bandwidth / bytes of weights read per token (batch 1). "
             f"1-minute load average at start / end: {load_start} / {_loadavg()} "
             "(other processes on the machine share its cores).", "", HEADER,
             "|" + "---|" * 10]
    return "\n".join(lines + [format_row(r) for r in rows])


def parse(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(ALL_MODELS[:-1]), help=f"comma-separated, of {ALL_MODELS}")
    p.add_argument("--variants", default="fp32,fp16,bf16,int8,int4",
                   help=f"comma-separated, of {sorted(VARIANTS)}, each optionally +compile")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--gen", type=int, default=64, help="tokens decoded per timed run")
    p.add_argument("--batch8", type=lambda v: v.strip().lower() not in ("false", "0", "no"), default=True,
                   help="also time batch 8 (True/False)")
    p.add_argument("--tmp", help="folder for the random checkpoints, kept (reused by later runs)")
    p.add_argument("--keep", action="store_true", help="keep the temporary checkpoints")
    p.add_argument("--out", help="also write the table (with the command) to this file")
    return vars(p.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(**parse())
