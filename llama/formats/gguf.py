"""GGUF files (llama.cpp, Ollama, LM Studio) -> (ModelArgs, Meta state dict), read with the `gguf`
package (llama.cpp's own reader), memory-mapped, tensor by tensor.

llama.cpp's converter stores q/k rows in Meta's interleaved order (it permutes Hugging Face's), so
tensors only change names. Q4_0 and Q4_1 become the package's int4 in groups of 32 by moving
nibbles, without dequantizing (Q4_0 keeps its fp16 scales and stores no zeros: the same bytes as
the file); F32, F16 and BF16 stay
memory-mapped; every other type (Q8_0, Q5_*, the k-quants) is dequantized row block by row block
with the gguf package's own code, to the build's dtype.
"""

import logging
import os
import threading
import warnings

import numpy as np
import torch

from llama.config import validate
from llama.formats.common import check_parallel_split, shard
from llama.model import LLAMA3_ROPE_SCALING, ModelArgs, scale_frequencies
from llama.pages import release_pages, trim_heap
from llama.quant import row_slices

log = logging.getLogger(__name__)

MAGIC = b"GGUF"
TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
LAYER_NAMES = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
               "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
               "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
# ModelArgs fields -> GGUF metadata keys, for messages that name what the file holds.
GGUF_NAMES = {"dim": "llama.embedding_length", "n_layers": "llama.block_count",
              "n_heads": "llama.attention.head_count", "n_kv_heads": "llama.attention.head_count_kv",
              "hidden_dim": "llama.feed_forward_length", "norm_eps": "llama.attention.layer_norm_rms_epsilon",
              "rope_theta": "llama.rope.freq_base", "max_seq_len": "llama.context_length",
              "vocab_size": "llama.vocab_size"}
INT4_TYPES = ("Q4_0", "Q4_1")
FLOAT_TYPES = {"F32": None, "F16": None, "BF16": torch.bfloat16}
_NIBBLE_CHUNK_ELEMENTS = 1 << 20  # uint8 temporaries of a few MB while moving Q4 nibbles
_MISSING = object()


def is_gguf(path: str) -> bool:
    """Whether path is a file that starts with GGUF's magic bytes."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


_READERS: dict[tuple, object] = {}  # the last file opened: its key, its reader
_READERS_LOCK = threading.Lock()


def open_gguf(path: str):
    """The gguf package's reader of path without the tokenizer's fields, kept for the next caller
    while the file is unchanged."""
    with _READERS_LOCK:
        return _reader(path, with_vocab=False)


def read_vocab_fields(path: str, read):
    """read(reader) on a reader of path that has the tokenizer's fields, which are dropped after
    (the reader holds each token and merge as a numpy array: 40 MB for 32,000 words). One caller
    at a time."""
    with _READERS_LOCK:
        reader = _reader(path, with_vocab=True)
        try:
            return read(reader)
        finally:
            _drop_vocab(reader)


def _reader(path: str, with_vocab: bool):
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    reader = _READERS.get(key)
    if reader is None or (with_vocab and reader.vocab_dropped):
        reader = read_whole(path)
        _READERS.clear()
        _READERS[key] = reader
        if not with_vocab:
            _drop_vocab(reader)
    return reader


def _drop_vocab(reader) -> None:
    reader.fields = {k: f for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    reader.vocab_dropped = True
    trim_heap()


def _reader_class():
    from gguf import GGUFReader

    class Reader(GGUFReader):
        """GGUFReader whose views of the file are plain arrays: it makes one view per token, score
        and merge, and a view of a numpy memmap costs 490 bytes where a plain one costs 120."""

        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, mapped):
            self.mapped, self._plain = mapped, mapped.view(np.ndarray)
            self.vocab_dropped = False

    return Reader


def read_whole(path: str):
    """The gguf package's reader of path, every field included; ValueError for a damaged file."""
    try:
        return _reader_class()(path, "r")
    except Exception as e:  # the reader raises IndexError, ValueError, ... for a cut or damaged file
        raise ValueError(f"cannot read {path!r}: truncated or not a GGUF file ({type(e).__name__}: {e}); "
                         "download it again") from None


def field(reader, key: str, default=_MISSING):
    """The value of metadata key; `default` when absent (ValueError when no default is given)."""
    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise ValueError(f"{reader.mapped.filename}: has no {key!r}; it is not a complete Llama GGUF file")
        return default
    return f.contents()


def read_gguf_args(path: str) -> ModelArgs:
    """ModelArgs from a GGUF file's `llama.*` metadata (and its tensors' shapes)."""
    reader = open_gguf(path)
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files (Llama 2, Llama 3 "
                         "and models of their shape) can be loaded")
    if field(reader, "llama.expert_count", 0):
        raise ValueError(f"{path}: llama.expert_count is {field(reader, 'llama.expert_count')}; mixture-of-experts "
                         "models are not supported")
    shapes = {t.name: _shape(t) for t in reader.tensors}
    n_heads = field(reader, "llama.attention.head_count")
    vocab = field(reader, "llama.vocab_size", shapes.get("token_embd.weight", (-1,))[0])
    args = ModelArgs(dim=field(reader, "llama.embedding_length"), n_layers=field(reader, "llama.block_count"),
                     n_heads=n_heads, n_kv_heads=field(reader, "llama.attention.head_count_kv", n_heads),
                     vocab_size=vocab, hidden_dim=field(reader, "llama.feed_forward_length"),
                     norm_eps=float(field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
                     rope_theta=float(field(reader, "llama.rope.freq_base", 10000.0)),
                     max_seq_len=field(reader, "llama.context_length", 2048),
                     tie_word_embeddings="output.weight" not in shapes, **_rope_scaling(reader, path))
    validate(args, path, GGUF_NAMES)
    rope_dims = field(reader, "llama.rope.dimension_count", args.head_dim)
    if rope_dims != args.head_dim:
        raise ValueError(f"{path}: llama.rope.dimension_count is {rope_dims} but each head is {args.head_dim} wide; "
                         "partial rotary embeddings are not supported")
    return args


def _rope_scaling(reader, path: str) -> dict:
    """ModelArgs fields of the file's RoPE scaling: none, or Llama 3.1's, which llama.cpp stores as
    a `rope_freqs` tensor of per-frequency divisors (matched here against Meta's rule)."""
    kind = field(reader, "llama.rope.scaling.type", "none")
    if kind not in ("none", "llama3"):
        raise ValueError(f"{path}: llama.rope.scaling.type is {kind!r}; only plain RoPE and Llama 3.1's scaling "
                         "are supported")
    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return {}
    divisors = torch.from_numpy(np.array(tensor.data, dtype=np.float32)).flatten()
    head_dim = 2 * divisors.numel()
    theta = float(field(reader, "llama.rope.freq_base", 10000.0))
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    _, low, high, context = LLAMA3_ROPE_SCALING
    context = field(reader, "llama.rope.scaling.original_context_length", context)
    factor = float(divisors.max())
    expected = freqs / scale_frequencies(freqs, factor, low, high, context)
    if not torch.allclose(expected, divisors, rtol=1e-3):
        raise ValueError(f"{path}: its rope_freqs tensor does not follow Llama 3.1's RoPE scaling (factor {factor:g}, "
                         f"low/high frequency factors {low:g}/{high:g}); this scaling is not supported")
    return {"use_scaled_rope": True, "rope_scaling_factor": factor, "rope_original_context": context}


def meta_name(name: str, path: str) -> str | None:
    """Meta key of a GGUF tensor name (None for rope_freqs, which the model recomputes)."""
    base, _, suffix = name.rpartition(".")
    if name == "rope_freqs.weight":
        return None
    if suffix == "weight" and base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.weight"
    parts = base.split(".")  # blk, N, name
    if suffix == "weight" and len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
    raise ValueError(f"{path}: unexpected tensor {name!r}; this is not a Llama GGUF file")


def read_gguf(path: str, rank: int = 0, world_size: int = 1,
              dtype: torch.dtype = torch.float32) -> tuple[ModelArgs, dict]:
    """A GGUF file as (ModelArgs, Meta state dict) for rank of world_size. Q4_0/Q4_1 come as int4
    (`.weight`, `.scales`, `.zeros`) with one process; with several they are dequantized like
    every other quantized type, to `dtype`, and sliced."""
    args = read_gguf_args(path)
    check_parallel_split(args, world_size)
    reader = open_gguf(path)
    state_dict, counts = {}, {}
    for tensor in reader.tensors:
        name = meta_name(tensor.name, path)
        if name is None:
            continue
        kind = tensor.tensor_type.name
        counts[kind] = counts.get(kind, 0) + 1
        if kind in INT4_TYPES and world_size == 1:
            state_dict.update(int4_tensors(name, tensor))
            continue
        full = to_torch(tensor, dtype, path)
        state_dict[name] = shard(name, full, rank, world_size, args.kv_heads)
        if args.tie_word_embeddings and name == "tok_embeddings.weight":
            state_dict["output.weight"] = shard("output.weight", full, rank, world_size, args.kv_heads)
    if args.tie_word_embeddings and "tok_embeddings.scales" in state_dict:  # the same int4 tensors
        state_dict.update({f"output.{k}": state_dict[f"tok_embeddings.{k}"] for k in ("weight", "scales", "zeros")})
    dequantized = sorted(k for k in counts if k not in FLOAT_TYPES and (k not in INT4_TYPES or world_size > 1))
    log.info("read GGUF %s: %s%s", path, ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
             f"; dequantized {'/'.join(dequantized)} to {str(dtype).replace('torch.', '')}" if dequantized else "")
    return args, state_dict


def _shape(tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first


def _raw(tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # the file is mapped read-only, and nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(tensor.data)


def to_torch(tensor, dtype: torch.dtype, path: str) -> torch.Tensor:
    """A float tensor: memory-mapped for F32/F16/BF16, else dequantized row block by row block."""
    from gguf import quants

    kind, shape = tensor.tensor_type.name, _shape(tensor)
    if kind in FLOAT_TYPES:
        t = _raw(tensor)
        return (t.view(FLOAT_TYPES[kind]) if FLOAT_TYPES[kind] else t).reshape(shape)
    rows = tensor.data.reshape(-1, tensor.data.shape[-1])  # (rows, bytes per row)
    out = torch.empty(rows.shape[0], shape[-1], dtype=dtype)
    for block in row_slices(rows.shape[0], shape[-1]):  # fp32 temporaries of at most 16 MB
        try:
            values = quants.dequantize(rows[block], tensor.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {tensor.name!r} has type {kind}, which the gguf package cannot "
                             "dequantize; requantize the file to Q4_K_M, Q8_0 or F16 with llama-quantize") from None
        out[block] = torch.from_numpy(values)
    release_pages(_raw(tensor), min_bytes=0)
    trim_heap()
    return out.reshape(shape)


def int4_tensors(name: str, tensor) -> dict[str, torch.Tensor]:
    """Q4_0 / Q4_1 blocks as llama.quant's int4 in groups of 32: packed nibbles, scales, zeros.

    A block of 32 is (d fp16[, m fp16], 16 bytes): byte j holds value j (low nibble) and value
    16 + j (high nibble); w = (q - 8) d for Q4_0 and q d + m for Q4_1. Q4_0 keeps its fp16 scales
    and no zeros (all 0); Q4_1's zero m + 8 d is computed in fp32.
    """
    kind = tensor.tensor_type.name
    out_f, in_f = _shape(tensor)
    header = 2 if kind == "Q4_0" else 4
    blocks = _raw(tensor).view(out_f, in_f // 32, header + 16)  # (out, groups, bytes of a block)
    packed = torch.empty(out_f, in_f // 2, dtype=torch.uint8)
    for block in row_slices(out_f, in_f, _NIBBLE_CHUNK_ELEMENTS):
        qs = blocks[block, :, header:]  # (rows, groups, 16)
        q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(qs.shape[0], in_f // 2, 2)  # (rows, in/2, 2)
        torch.bitwise_or(q[..., 0], q[..., 1] << 4, out=packed[block])
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1)  # (out, groups)
    if kind == "Q4_0":
        scales, zeros = d, d.new_empty(out_f, 0)  # every zero is 0: none stored
    else:
        m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
        scales, zeros = d.float(), m + 8 * d.float()
    release_pages(_raw(tensor), min_bytes=0)
    trim_heap()
    prefix = name[: -len("weight")]
    return {name: packed, prefix + "scales": scales, prefix + "zeros": zeros}
