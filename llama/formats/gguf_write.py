"""(ModelArgs, Meta state dict, tokenizer) -> one GGUF file that llama.cpp reads, written with the
`gguf` package's writer, tensor by tensor (no second copy of the model in memory).

Norms stay F32 as llama.cpp keeps them; matrices are written as `outtype` (f32, f16, bf16 or
q8_0; q8_0 needs rows of a multiple of 32, others fall back to f16). q/k rows are already in
Meta's interleaved order, which is GGUF's. Llama 3.1 RoPE scaling is stored as llama.cpp stores
it: a `rope_freqs` tensor of per-frequency divisors.
"""

import logging

import numpy as np
import torch

from llama.formats.gguf import LAYER_NAMES, TOP_NAMES
from llama.model import ModelArgs, scale_frequencies
from llama.quant import row_slices

log = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_TO_GGUF_TOP = {meta: gguf for gguf, meta in TOP_NAMES.items()}
_TO_GGUF_LAYER = {meta: gguf for gguf, meta in LAYER_NAMES.items()}


def gguf_name(key: str) -> str:
    """GGUF tensor name of a Meta key (`layers.0.attention.wq.weight` -> `blk.0.attn_q.weight`)."""
    base = key[: -len(".weight")]
    if base in _TO_GGUF_TOP:
        return f"{_TO_GGUF_TOP[base]}.weight"
    _, n, rest = base.split(".", 2)  # layers, N, module path
    return f"blk.{n}.{_TO_GGUF_LAYER[rest]}.weight"


def tensor_type(t: torch.Tensor, outtype: str):
    """The GGML type a tensor is written as."""
    from gguf import GGMLQuantizationType as Q

    if t.dim() < 2 or outtype == "f32":
        return Q.F32
    if outtype == "q8_0" and t.shape[-1] % 32 == 0:
        return Q.Q8_0
    return Q.BF16 if outtype == "bf16" else Q.F16


def encode(t: torch.Tensor, qtype) -> np.ndarray:
    """The bytes (or values) of t as GGML type qtype, quantized row block by row block."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if qtype == Q.F32:
        return t.float().contiguous().numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).contiguous().numpy()
    rows = t.reshape(-1, t.shape[-1])  # (rows, in)
    parts = [quants.quantize(rows[block].float().numpy(), qtype) for block in row_slices(*rows.shape)]
    return np.concatenate(parts)


def rope_divisors(args: ModelArgs) -> torch.Tensor:
    """llama.cpp's rope_freqs: plain frequency / scaled frequency, one per pair of a head."""
    head_dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return freqs / scale_frequencies(freqs, *args.rope_scaling)


def _add_metadata(writer, args: ModelArgs, outtype: str, name: str) -> None:
    from gguf import LlamaFileType

    writer.add_name(name)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.ffn_hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_vocab_size(args.vocab_size)
    writer.add_file_type({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                          "bf16": LlamaFileType.MOSTLY_BF16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[outtype])


def _tensors(args: ModelArgs, state_dict: dict) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) in llama.cpp's order; a tied output is left out (llama.cpp ties a
    file without output.weight)."""
    tied = args.tie_word_embeddings or state_dict.get("output.weight") is state_dict["tok_embeddings.weight"]
    out = [("token_embd.weight", state_dict["tok_embeddings.weight"])]
    if args.rope_scaling is not None:
        out.append(("rope_freqs.weight", rope_divisors(args)))
    out.append(("output_norm.weight", state_dict["norm.weight"]))
    if not tied:
        out.append(("output.weight", state_dict["output.weight"]))
    layers = sorted((k for k in state_dict if k.startswith("layers.")), key=lambda k: (int(k.split(".")[1]), k))
    out += [(gguf_name(k), state_dict[k]) for k in layers]
    return out


def write_gguf(args: ModelArgs, state_dict: dict, tokenizer, path: str, outtype: str = "f16",
               name: str = "llama", progress=None) -> str:
    """Write one GGUF file at path (the caller renames it into place); returns its name."""
    from gguf import GGML_QUANT_SIZES, GGUFWriter

    from llama.gguf_vocab import add_vocab

    if outtype not in OUTTYPES:
        raise ValueError(f"unknown GGUF type {outtype!r}; pass --outtype {', '.join(OUTTYPES)}")
    writer = GGUFWriter(path, "llama")
    _add_metadata(writer, args, outtype, name)
    add_vocab(writer, tokenizer)
    tensors = [(n, t, tensor_type(t, outtype)) for n, t in _tensors(args, state_dict)]
    for n, t, qtype in tensors:
        block, size = GGML_QUANT_SIZES[qtype]
        writer.add_tensor_info(n, tuple(t.shape), np.dtype(np.float32), t.numel() // block * size, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, t, qtype in tensors:
        writer.write_tensor_data(encode(t, qtype))
        if progress is not None:
            progress.update(t.numel() * t.element_size())
    writer.close()
    log.info("wrote %s: %d tensors, %s", path, len(tensors), outtype)
    return path
