"""llama2.c model files (run.c's .bin): the legacy header and version 1, fp32, memory-mapped.

Legacy: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a
negative vocab_size means the classifier is stored separately), then fp32 tensors grouped by
kind across layers, RoPE tables, optional classifier. Version 1: uint32 magic "ak42", int32
version, the same 7 ints, a uint8 shared-classifier flag, zero padding to 256 bytes, then the
tensors in another order and without RoPE tables. Version 2 (int8 Q8_0) is refused.
"""

import logging
import math
import os
import struct

import torch

from llama.config import validate
from llama.formats.common import check_parallel_split, shard
from llama.model import ModelArgs

log = logging.getLogger(__name__)

MAGIC = 0x616B3432  # "ak42" as little-endian uint32
LEGACY_HEADER_BYTES = 7 * 4
V1_HEADER_BYTES = 256
# Tensor kinds in file order; "output" is present only when the classifier is not shared.
LEGACY_ORDER = ("tok_embeddings", "attention_norm", "wq", "wk", "wv", "wo", "ffn_norm",
                "w1", "w2", "w3", "norm", "freq_cos", "freq_sin", "output")
V1_ORDER = ("attention_norm", "ffn_norm", "norm", "tok_embeddings", "wq", "wk", "wv", "wo",
            "w1", "w2", "w3", "output")
# Meta key of each kind ({} = layer number); None: stored but not needed (RoPE tables).
META_KEYS = {
    "tok_embeddings": "tok_embeddings.weight",
    "attention_norm": "layers.{}.attention_norm.weight",
    "wq": "layers.{}.attention.wq.weight",
    "wk": "layers.{}.attention.wk.weight",
    "wv": "layers.{}.attention.wv.weight",
    "wo": "layers.{}.attention.wo.weight",
    "ffn_norm": "layers.{}.ffn_norm.weight",
    "w1": "layers.{}.feed_forward.w1.weight",
    "w2": "layers.{}.feed_forward.w2.weight",
    "w3": "layers.{}.feed_forward.w3.weight",
    "norm": "norm.weight",
    "freq_cos": None,
    "freq_sin": None,
    "output": "output.weight",
}


def shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Shape of one tensor of each kind (per layer for layer kinds)."""
    d, f, v, hd = args.dim, args.ffn_hidden_dim, args.vocab_size, args.head_dim
    q, kv = args.n_heads * hd, args.kv_heads * hd
    return {
        "tok_embeddings": (v, d), "attention_norm": (d,), "wq": (q, d), "wk": (kv, d), "wv": (kv, d),
        "wo": (d, q), "ffn_norm": (d,), "w1": (f, d), "w2": (d, f), "w3": (f, d), "norm": (d,),
        "freq_cos": (args.max_seq_len, hd // 2), "freq_sin": (args.max_seq_len, hd // 2), "output": (v, d),
    }


def read_header(path: str) -> tuple[ModelArgs, bool, int, tuple[str, ...]]:
    """(ModelArgs, shared classifier, header bytes, tensor order) from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(V1_HEADER_BYTES)
    if len(head) < LEGACY_HEADER_BYTES:
        raise ValueError(f"{path!r} is {len(head)} bytes long: too short for a llama2.c model file")
    magic, version = struct.unpack_from("<Ii", head)
    if magic == MAGIC:
        if version == 2:
            raise ValueError(
                f"{path!r} is a llama2.c version 2 (int8 Q8_0) file, which is not supported; "
                "export it again with llama2.c's export.py --version 1 (fp32), or load the original checkpoint"
            )
        if version != 1 or len(head) < V1_HEADER_BYTES:
            raise ValueError(
                f"{path!r} is a llama2.c file of unknown version {version}; only legacy and version 1 load"
            )
        ints, shared = struct.unpack_from("<7i", head, 8), bool(head[36])
        header_bytes, order = V1_HEADER_BYTES, V1_ORDER
    else:
        ints = struct.unpack_from("<7i", head)
        shared, header_bytes, order = ints[5] > 0, LEGACY_HEADER_BYTES, LEGACY_ORDER
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = ints
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, seq_len, abs(vocab_size)) <= 0 or \
            dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise ValueError(f"{path!r} is not a checkpoint this loader knows (not Meta, Hugging Face or llama2.c)")
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     vocab_size=abs(vocab_size), norm_eps=1e-5, max_seq_len=seq_len, hidden_dim=hidden_dim)
    validate(args, f"{path!r} (llama2.c header)")
    return args, shared, header_bytes, order


def layout(args: ModelArgs, shared: bool, order: tuple[str, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(kind, shape) of every stored tensor, in file order."""
    shape = shapes(args)
    entries = []
    for kind in order:
        if kind == "output" and shared:
            continue
        per_layer = META_KEYS[kind] is not None and "{}" in META_KEYS[kind]
        entries += [(kind, shape[kind])] * (args.n_layers if per_layer else 1)
    return entries


def read_llama2c(path: str, rank: int = 0, world_size: int = 1) -> tuple[ModelArgs, dict]:
    """A llama2.c .bin file as (ModelArgs, Meta state dict) for rank of world_size, memory-mapped."""
    args, shared, header_bytes, order = read_header(path)
    entries = layout(args, shared, order)
    expected = header_bytes + 4 * sum(math.prod(s) for _, s in entries)
    size = os.path.getsize(path)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header describes"
        raise ValueError(f"{path!r} is {what}: {size} bytes, but its llama2.c header needs {expected}")
    check_parallel_split(args, world_size)
    data = torch.from_file(path, shared=False, size=size // 4, dtype=torch.float32)  # (floats,) mmap
    state_dict, offset, layer, kv = {}, header_bytes // 4, {}, args.kv_heads
    for kind, shape in entries:
        n = math.prod(shape)
        key = META_KEYS[kind]
        if key is not None:
            i = layer[kind] = layer.get(kind, -1) + 1
            key = key.format(i)
            full = data[offset : offset + n].view(shape)  # (out, in) or (dim,)
            state_dict[key] = full if kind == "tok_embeddings" else shard(key, full, rank, world_size, kv)
        offset += n
    embeddings = state_dict["tok_embeddings.weight"]
    if shared:
        # Same tensor as tok_embeddings with one rank; a different slice of it with several.
        state_dict["output.weight"] = shard("output.weight", embeddings, rank, world_size, kv)
    state_dict["tok_embeddings.weight"] = shard("tok_embeddings.weight", embeddings, rank, world_size, kv)
    log.info("read llama2.c checkpoint %s (rank %d of %d)", path, rank, world_size)
    return args, state_dict


def write_llama2c(args: ModelArgs, state_dict: dict, path: str, progress=None) -> str:
    """Write full tensors as a llama2.c version-1 fp32 file (what run.c reads); returns its name."""
    if args.rope_theta != 10000.0 or args.use_scaled_rope:
        scaled = ", scaled RoPE" if args.use_scaled_rope else ""
        raise ValueError(f"llama2.c files hold no RoPE settings, and this model has rope_theta={args.rope_theta}"
                         f"{scaled}; convert it with --to meta or --to hf")
    shared = torch.equal(state_dict["output.weight"], state_dict["tok_embeddings.weight"])
    ints = (args.dim, args.ffn_hidden_dim, args.n_layers, args.n_heads, args.kv_heads, args.vocab_size,
            args.max_seq_len)
    header = struct.pack("<Ii7iB", MAGIC, 1, *ints, int(shared))
    layer = {}
    with open(path, "wb") as f:
        f.write(header.ljust(V1_HEADER_BYTES, b"\0"))
        for kind, _ in layout(args, shared, V1_ORDER):
            i = layer[kind] = layer.get(kind, -1) + 1
            tensor = state_dict[META_KEYS[kind].format(i)]
            f.write(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
            if progress is not None:
                progress.update(tensor.numel() * tensor.element_size())
    return os.path.basename(path)
