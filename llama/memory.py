"""Memory preflight: how much a build will take, and whether it fits, before loading anything.

The estimate needs ModelArgs only (no weights):
  weights   the tensors of the model as the build makes it (on the meta device: sharded for
            model parallel, quantized), at the build's dtype
  KV cache  max_batch_size x max_seq_len x n_layers x 2 x kv_heads x head_dim x bytes
  working   activations of one prefill of max_batch_size x max_seq_len tokens, logits, the
            largest quantization temporary, and the runtime itself (PyTorch on CPU)
Print it from the shell with `python -m llama.memory --ckpt_dir DIR --max_seq_len N ...`.
"""

import dataclasses
import functools
import logging
import os
import re
import sys

import torch

from llama.model import ModelArgs, Transformer
from llama.parallel import can_split, local_kv_heads, shard_model
from llama.quant import DEFAULT_GROUP_SIZE
from llama.quant_layers import quantize_model

log = logging.getLogger(__name__)

GB = 1e9
# Resident memory of Python + PyTorch + the tokenizer on CPU before any tensor (measured: ~0.35 GB).
CPU_RUNTIME_BYTES = 0.4 * GB
# Rows x in_features of the fp32 chunk quantize.py works on, times the temporaries alive at once.
QUANT_TEMP_BYTES = 3 * 4 * (1 << 22)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes one rank needs; `total` is what is compared with the free memory."""

    weights: int
    kv_cache: int
    working: int
    dtype: torch.dtype
    quantize: str | None
    world_size: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.working

    def describe(self) -> str:
        what = self.quantize or str(self.dtype).replace("torch.", "")
        per = " per rank" if self.world_size > 1 else ""
        return (f"{fmt(self.total)}{per} (weights {fmt(self.weights)} {what}, KV cache {fmt(self.kv_cache)}, "
                f"working {fmt(self.working)})")


def fmt(n: float) -> str:
    return f"{n / GB:.2f} GB"


def parse_size(limit: str | int | float) -> int:
    """"12GB", "12 GiB", "800MB" or a number of bytes -> bytes."""
    if isinstance(limit, (int, float)):
        return int(limit)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(limit))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"memory_limit={limit!r} is not a size; write it like '12GB' or '800MiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def weight_bytes(args: ModelArgs, dtype: torch.dtype, quantize: str | None = None,
                 group_size: int = DEFAULT_GROUP_SIZE, world_size: int = 1) -> int:
    """Bytes of one rank's weights: the model built on the meta device with the build's own
    transforms (sharding, quantization), floating tensors counted at dtype."""
    return _weight_bytes(dataclasses.astuple(args), dtype, quantize, group_size, world_size)


@functools.lru_cache(maxsize=64)  # alternatives() asks for the same few builds many times
def _weight_bytes(fields: tuple, dtype: torch.dtype, quantize: str | None, group_size: int, world_size: int) -> int:
    args = ModelArgs(*fields)
    with torch.device("meta"):
        model = quantize_model(shard_model(Transformer(args), world_size), quantize, group_size, dtype)
    b = torch.finfo(dtype).bits // 8
    tensors = {id(t): t for t in model.state_dict(keep_vars=True).values()}  # a tied tensor once
    return sum(t.numel() * (b if t.is_floating_point() else t.element_size()) for t in tensors.values())


def param_count(args: ModelArgs, vocab_size: int) -> int:
    """Parameters of the whole model (vocab_size where args leave it to the tokenizer)."""
    if args.vocab_size == -1:
        args = dataclasses.replace(args, vocab_size=vocab_size)
    return weight_bytes(args, torch.float32) // 4


def estimate(args: ModelArgs, max_seq_len: int, max_batch_size: int, dtype: torch.dtype,
             quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE, world_size: int = 1,
             device_type: str = "cpu") -> MemoryEstimate:
    """Estimate one rank's memory for a build with these settings (see the module docstring)."""
    b = torch.finfo(dtype).bits // 8
    kv_dim = local_kv_heads(args.kv_heads, world_size) * args.head_dim
    kv_cache = 2 * args.n_layers * max_batch_size * max_seq_len * kv_dim * b
    tokens = max_batch_size * max_seq_len
    # Prefill temporaries: hidden state, q/k/v, rotary fp32 copies, the feed-forward's three
    # hidden-wide tensors and the attention mask; plus fp32 logits of every row.
    acts = tokens * (6 * args.dim * 4 + 3 * args.ffn_hidden_dim // world_size * b + max_seq_len)
    logits = 2 * max_batch_size * args.vocab_size * 4
    working = acts + logits + (QUANT_TEMP_BYTES if quantize else 0)
    if device_type == "cpu":
        working += int(CPU_RUNTIME_BYTES)
    return MemoryEstimate(weight_bytes(args, dtype, quantize, group_size, world_size), kv_cache,
                          int(working), dtype, quantize, world_size)


def available_bytes(device: torch.device) -> tuple[int | None, str]:
    """Free memory of the device, and where the number came from; (None, why) if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {device}"
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
                        return int(line.split()[1]) * 1024 // ranks, "available RAM (/proc/meminfo)"
        except OSError:
            pass
        return None, "available RAM is unknown on this system"
    return None, f"free memory of {device.type} is unknown"


def alternatives(args: ModelArgs, max_seq_len: int, max_batch_size: int, dtype: torch.dtype,
                 quantize: str | None, group_size: int, world_size: int, device_type: str,
                 limit: int) -> list[str]:
    """Settings that bring the estimate under limit: each quantization (with a smaller cache if
    needed), a smaller cache alone, and (CUDA) more GPUs."""
    def fits(**kw):
        cfg = dict(max_seq_len=max_seq_len, max_batch_size=max_batch_size, dtype=dtype, quantize=quantize,
                   group_size=group_size, world_size=world_size, device_type=device_type) | kw
        e = estimate(args, **cfg)
        return e if e.total <= limit else None

    found = []
    # Quantization first (alone, else with a smaller batch and cache), then cache sizes alone.
    for q in ("int8", "int4"):
        if q == quantize or (q == "int8" and quantize == "int4"):
            continue
        for bsz, seq in _smaller_caches(max_batch_size, max_seq_len):
            if e := fits(quantize=q, max_batch_size=bsz, max_seq_len=seq):
                extra = "".join([f", max_batch_size={bsz}" if bsz != max_batch_size else "",
                                 f", max_seq_len={seq}" if seq != max_seq_len else ""])
                found.append(f"quantize='{q}'{extra} ({fmt(e.total)})")
                break
    for bsz, seq in _smaller_caches(max_batch_size, max_seq_len)[1:]:
        if e := fits(max_batch_size=bsz, max_seq_len=seq):
            extra = ", ".join(([f"max_batch_size={bsz}"] if bsz != max_batch_size else [])
                              + ([f"max_seq_len={seq}"] if seq != max_seq_len else []))
            found.append(f"{extra} ({fmt(e.total)})")
            break
    if device_type == "cuda":
        for mp in (2, 4, 8):
            if mp > world_size and can_split(args.n_heads, args.kv_heads, mp) and (e := fits(world_size=mp)):
                found.append(f"torchrun --nproc_per_node {mp} ({fmt(e.total)} per GPU)")
                break
    return found


def _smaller_caches(max_batch_size: int, max_seq_len: int) -> list[tuple[int, int]]:
    """(batch, seq) to try, biggest first: as given, batch 1, then halving seq down to 128."""
    sizes = [(max_batch_size, max_seq_len)]
    if max_batch_size > 1:
        sizes.append((1, max_seq_len))
    seq = max_seq_len // 2
    while seq >= 128:
        sizes.append((1, seq))
        seq //= 2
    return sizes


def preflight(args: ModelArgs, max_seq_len: int, max_batch_size: int, dtype: torch.dtype,
              device: torch.device, quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
              world_size: int = 1, memory_limit: str | int | None = None) -> MemoryEstimate:
    """Raise ValueError (listing settings that would fit) if the build will not fit; else the estimate."""
    est = estimate(args, max_seq_len, max_batch_size, dtype, quantize, group_size, world_size, device.type)
    if memory_limit is not None:
        limit, source = parse_size(memory_limit), f"memory_limit={memory_limit!r}"
    else:
        limit, source = available_bytes(device)
    log.info("memory estimate: %s; %s: %s", est.describe(), source, fmt(limit) if limit else "unknown")
    if limit is None or est.total <= limit:
        return est
    options = alternatives(args, max_seq_len, max_batch_size, dtype, quantize, group_size, world_size,
                           device.type, limit)
    advice = ("; settings that fit: " + ", ".join(options)) if options else \
        "; no single setting fits, use a bigger machine"
    raise ValueError(f"this model needs about {est.describe()} but {source} is {fmt(limit)}{advice}")


def main(argv: list[str] | None = None) -> None:
    """Print the memory a build would take, reading only the checkpoint's shapes; exit 1 if it does not fit."""
    from llama import flags
    from llama.checkpoint import load_checkpoint, read_args
    from llama.device import resolve_device, resolve_dtype
    from llama.options import REQUIRED, BuildOptions
    from llama.quant import plan

    p = flags.Parser(prog="python -m llama.memory", description=main.__doc__)
    flags.add_options(p, BuildOptions, ("ckpt_dir", "max_seq_len", "max_batch_size", "dtype", "quantize",
                                        "group_size", "model_parallel_size", "device", "memory_limit"),
                      ckpt_dir=REQUIRED, max_seq_len=2048, max_batch_size=1, device="cpu")
    p.add_argument("--vocab_size", type=int, default=32000, help="when the checkpoint does not give it")
    a = p.parse_args(argv)
    try:
        args, state_dict = load_checkpoint(a.ckpt_dir)
    except FileNotFoundError:  # params.json or config.json without weights: the shapes are enough
        args, state_dict = read_args(a.ckpt_dir), {}
        log.info("%s has no weight files; estimating from its shapes alone", a.ckpt_dir)
    if args.vocab_size <= 0:
        embed = state_dict.get("tok_embeddings.weight")
        args.vocab_size = a.vocab_size if embed is None else embed.shape[0]
    mode, group_size = plan(state_dict, a.quantize, a.group_size, a.ckpt_dir)
    world = a.model_parallel_size or 1
    dev = resolve_device(a.device)
    dt = resolve_dtype(a.dtype, dev, weight_bytes(args, torch.float32) // 4)
    est = estimate(args, a.max_seq_len, a.max_batch_size, dt, mode, group_size, world, dev.type)
    print(f"{a.ckpt_dir}: {est.describe()}")
    limit, source = (parse_size(a.memory_limit), "memory_limit") if a.memory_limit else available_bytes(dev)
    if limit:
        print(f"{source}: {fmt(limit)} -> {'fits' if est.total <= limit else 'does NOT fit'}")
        if est.total > limit:
            print("settings that fit: " + ", ".join(alternatives(
                args, a.max_seq_len, a.max_batch_size, dt, mode, group_size, world, dev.type, limit)))
            sys.exit(1)


if __name__ == "__main__":
    from llama.flags import run

    run(main)
