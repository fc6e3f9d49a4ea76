"""Weight-only int8 and int4 quantization: the math, and quantizing a state dict tensor by tensor.

int8: symmetric, one scale per output channel: w ~= q * scale, q in [-127, 127].
int4: asymmetric, one scale and zero per group of `group_size` inputs of a row:
      w ~= (q - 8) * scale + zero, q in [0, 15] (the convention of PyTorch's int4 kernels).

Checkpoint keys keep Meta's module names; a quantized linear `name` holds
  name.weight  int8 (out, in), or uint8 (out, in / 2) with two int4 values per byte, low nibble first
  name.scales  (out,) for int8, (out, in / group_size) for int4
  name.zeros   (out, in / group_size), int4 only; (out, 0) when every zero is 0 (GGUF's Q4_0)
Embeddings and norms stay in floating point. The modules that hold these tensors are in
`llama.quant_layers`; writing a quantized checkpoint is `llama.quantize`.
"""

import logging

import torch

from llama.pages import release_pages, trim_heap
from llama.progress import progress

log = logging.getLogger(__name__)

MODES = ("int8", "int4")
# Measured (benchmarks/RESULTS.md): a 7B-shape int4 build peaks at 4.6 GB with groups of 64 and
# 5.1 GB with 32, at the same speed. On stories260K, whose rows are only 64 wide, perplexity
# rises 1.3% / 3.7% / 5.4% with groups of 16 / 32 / 64: tiny models want group_size=32.
DEFAULT_GROUP_SIZE = 64
# Elements quantized at once: bounds the fp32 temporaries of big matrices (the output layer of
# 7B), and keeps them small enough for malloc to reuse instead of fragmenting.
_CHUNK_ELEMENTS = 1 << 22
LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


def is_linear_key(key: str) -> bool:
    """True for the `.weight` of a linear layer (the layers that get quantized)."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in LINEAR_NAMES


def check_mode(mode: str | None, group_size: int) -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown quantize={mode!r}; pass quantize='int8', 'int4' or None")
    if mode == "int4" and (group_size < 2 or group_size % 2):
        raise ValueError(f"group_size={group_size} must be an even number >= 2; try 32, 64 or 128")


# ---------------------------------------------------------------------------- tensor math


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scales fp32 (out,)) with w ~= q * scales[:, None]."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for rows, part in _row_chunks(w):
        wf = part.float()
        scale = wf.abs().amax(dim=1).clamp(min=1e-10) / 127.0  # (rows,)
        q[rows].copy_(torch.round(wf / scale[:, None]).clamp_(-127, 127))
        scales[rows] = scale
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 (out, in/2), scales (out, groups), zeros (out, groups)), fp32 scales/zeros."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"in_features={in_f} is not divisible by group_size={group_size}")
    groups = in_f // group_size
    packed = torch.empty(out_f, in_f // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(out_f, groups, dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    for rows, part in _row_chunks(w):
        g = part.float().reshape(-1, groups, group_size)  # (rows, groups, gs)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (rows, groups)
        scale = ((hi - lo) / 15.0).clamp(min=1e-10)
        q = torch.round((g - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)
        q = q.reshape(-1, in_f // 2, 2)  # (rows, in/2, 2): pairs of neighbours
        torch.bitwise_or(q[..., 0], q[..., 1] << 4, out=packed[rows])
        scales[rows], zeros[rows] = scale, lo + 8 * scale
    return packed, scales, zeros


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (out, in/2) -> values 0..15 as uint8 (out, in)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(1)  # (out, in/2, 2) -> (out, in)


def dequantize_int4(packed, scales, zeros) -> torch.Tensor:
    q = unpack_int4(packed).float()
    out_f, in_f = q.shape
    groups = scales.shape[1]
    q = q.view(out_f, groups, in_f // groups)  # (out, groups, gs)
    w = (q - 8) * scales.float().unsqueeze(-1)
    if zeros.numel():
        w = w + zeros.float().unsqueeze(-1)
    return w.view(out_f, in_f)


def row_slices(n_rows: int, n_cols: int, elements: int = _CHUNK_ELEMENTS):
    """Slices of n_rows rows in blocks of about `elements` elements (a multiple of 64 rows), which
    bound the temporaries of work done block by block on a big matrix."""
    step = max(64, (elements // max(1, n_cols)) // 64 * 64)
    for lo in range(0, n_rows, step):
        yield slice(lo, lo + step)


def _row_chunks(w: torch.Tensor):
    """(row slice, rows of w) in blocks of about _CHUNK_ELEMENTS elements."""
    for rows in row_slices(w.shape[0], w.shape[1]):
        yield rows, w[rows]


def quantize_state_dict(state_dict: dict, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> dict:
    """Quantize each linear weight of a (memory-mapped) state dict, one tensor at a time.

    Other tensors are moved to device/dtype. Pages of the source file are released after each
    tensor, so the full-precision checkpoint never sits in memory as a whole.
    """
    check_mode(mode, group_size)
    out = {}
    nbytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    bar = progress(total=nbytes, desc=f"quantizing to {mode}", unit="B", unit_scale=True)
    for key in list(state_dict):
        t = state_dict[key]
        bar.update(t.numel() * t.element_size())
        if is_linear_key(key):
            prefix = key[: -len("weight")]
            src = t.to(device)  # one full-precision tensor at a time
            if mode == "int4" and t.shape[1] % group_size == 0:
                q, scales, zeros = quantize_int4(src, group_size)
                out[prefix + "zeros"] = zeros.to(dtype)
            else:
                q, scales = quantize_int8(src)
            out[key], out[prefix + "scales"] = q, scales.to(dtype)
            del src, q, scales
            trim_heap()
        else:
            out[key] = _convert(t, device, dtype if t.is_floating_point() else t.dtype)
        release_pages(t)
        del t
    bar.close()
    return out


def _convert(t: torch.Tensor, device, dtype) -> torch.Tensor:
    """t.to(device, dtype), block by block, releasing the source's pages as it goes."""
    if t.dim() < 2 or (t.dtype == dtype and t.device == torch.device(device)):
        return t.to(device=device, dtype=dtype)
    out = torch.empty(t.shape, dtype=dtype, device=device)
    for rows, part in _row_chunks(t):
        out[rows] = part
        release_pages(part)
    return out


def is_quantized(state_dict: dict) -> str | None:
    """"int8" or "int4" when the state dict holds quantized linears, else None."""
    for key in state_dict:
        if key.endswith(".scales"):
            return "int4" if key[: -len("scales")] + "zeros" in state_dict else "int8"
    return None


def stored_layers(state_dict: dict) -> dict[str, tuple[torch.dtype | None, bool]]:
    """{module name: (scales dtype, has zeros)} of the layers a quantized state dict holds
    quantized. int4 scales stored in fp16 (GGUF's Q4_0) stay fp16, which loses nothing; a None
    dtype is the build's. Empty zeros (Q4_0's) stay empty."""
    layers = {}
    for key, t in state_dict.items():
        if key.endswith(".scales"):
            name = key[: -len(".scales")]
            zeros = state_dict.get(name + ".zeros")
            keep = t.dtype == torch.float16 and zeros is not None
            layers[name] = (t.dtype if keep else None, zeros is None or zeros.numel() > 0)
    return layers


def group_size_of(state_dict: dict) -> int:
    for key in state_dict:
        if key.endswith(".zeros"):
            prefix = key[: -len("zeros")]
            return state_dict[prefix + "weight"].shape[1] * 2 // state_dict[prefix + "scales"].shape[1]
    return DEFAULT_GROUP_SIZE


def plan(state_dict: dict, quantize: str | None, group_size: int, source: str) -> tuple[str | None, int]:
    """(mode, group size) of a build: the checkpoint's own quantization, else `quantize`."""
    check_mode(quantize, group_size)
    stored = is_quantized(state_dict)
    if not stored:
        return quantize, group_size
    if quantize and (quantize != stored or group_size_of(state_dict) != group_size):
        raise ValueError(f"{source!r} is already quantized ({stored}); leave quantize unset")
    return stored, group_size_of(state_dict)
