"""Weight-only int8 and int4 quantization of the linear layers, applied tensor by tensor.

int8: symmetric, one scale per output channel: w ~= q * scale, q in [-127, 127].
int4: asymmetric, one scale and zero per group of `group_size` inputs of a row:
      w ~= (q - 8) * scale + zero, q in [0, 15] (the convention of PyTorch's int4 kernels).

Checkpoint keys keep Meta's module names; a quantized linear `name` holds
  name.weight  int8 (out, in), or uint8 (out, in / 2) with two int4 values per byte, low nibble first
  name.scales  (out,) for int8, (out, in / group_size) for int4
  name.zeros   (out, in / group_size), int4 only
Embeddings and norms stay in floating point. This module does not know about files except
`save_quantized`; `Llama.build(quantize=...)` calls `quantize_state_dict` while loading.
"""

import ctypes
import logging
import mmap
import os

import torch
import torch.nn.functional as F
from torch import nn

from llama import kernels, parallel

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
    w = (q - 8) * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)
    return w.view(out_f, in_f)


def _row_chunks(w: torch.Tensor):
    """(row slice, rows of w) in blocks of about _CHUNK_ELEMENTS elements."""
    step = max(64, (_CHUNK_ELEMENTS // max(1, w.shape[1])) // 64 * 64)
    for lo in range(0, w.shape[0], step):
        yield slice(lo, lo + step), w[lo : lo + step]


# ---------------------------------------------------------------------------- modules


def _int4_cpu_kernel_ok(device: torch.device, out_f: int, in_f: int, group_size: int) -> bool:
    return (device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and out_f % 64 == 0 and in_f % group_size == 0 and group_size in (32, 64, 128, 256))


class Int8Linear(nn.Module):
    """y = x (q * scales)^T with q int8 per output channel."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.parallel: str | None = None  # fairscale communication, set by convert_linears
        self.kernel = False  # llama.kernels, set by use_kernel

    def use_kernel(self) -> None:
        """Switch to llama.kernels (CPU), with fp32 scales as it reads them."""
        if self.weight.device.type == "cpu" and kernels.available():
            self.scales = self.scales.float()
            self.kernel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _communicate(self.parallel, x, self._local)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel:
            return kernels.linear(x, self.weight, self.scales)
        # PyTorch's fused int8 kernel reads the int8 weights directly; on CPU it is fast for bf16
        # inputs only (measured: fp32/fp16 inputs run at a tenth of the speed of dequantizing),
        # and needs in_features % 16 == 0 (other sizes give wrong results or crash in 2.13).
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.in_features % 16 == 0:
            shape = x.shape
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scales)
            return y.view(*shape[:-1], self.out_features)  # (..., out)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


class Int4Linear(nn.Module):
    """y = x W^T with W stored as int4 groups of `group_size` inputs (see the module docstring).

    On CPU the weight is repacked at load time into the layout of PyTorch's int4 kernel (or,
    where that does not apply, of llama.kernels); such a module's state dict is then
    kernel-specific, so save quantized checkpoints with `save_quantized`.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.kernel_layout: str | None = None  # "llama" (llama.kernels) or "aten" (PyTorch's)
        self.parallel: str | None = None  # fairscale communication, set by convert_linears

    def to_kernel_layout(self) -> None:
        """Repack for the fastest CPU kernel there is, 1024 rows at a time: PyTorch's int4 kernel
        where its shape rules allow (it computes 64 output rows at once; measured on the 110M
        shape with compile: 189 tok/s against 163 with llama.kernels' int4), else llama.kernels."""
        if self.kernel_layout or self.weight.device.type != "cpu":
            return
        if _int4_cpu_kernel_ok(self.weight.device, self.out_features, self.in_features, self.group_size):
            packed = torch.empty_like(self.weight)  # PyTorch's kernel packs blocks of 64 rows
            for lo in range(0, self.out_features, 1024):
                rows = unpack_int4(self.weight[lo : lo + 1024]).to(torch.int32)  # (rows, in)
                packed[lo : lo + 1024] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows, 1)
            self.weight = packed
            # The kernel wants (groups, out, 2) of (scale, zero).
            self.scales = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).contiguous()  # (groups, out, 2)
            del self.zeros
            self.register_buffer("zeros", None)
            self.kernel_layout = "aten"
        elif kernels.int4_group_ok(self.in_features, self.group_size) and kernels.available():
            packed = torch.empty_like(self.weight)
            for lo in range(0, self.out_features, 1024):
                packed[lo : lo + 1024] = kernels.pack_int4(unpack_int4(self.weight[lo : lo + 1024]))
            self.weight = packed  # scales and zeros stay as they are
            self.kernel_layout = "llama"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _communicate(self.parallel, x, self._local)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_layout == "llama":
            return kernels.linear_int4(x, self.weight, self.scales, self.zeros, self.group_size)
        shape = x.shape
        if self.kernel_layout == "aten":
            x2 = x.reshape(-1, shape[-1])  # (tokens, in)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(self.scales.dtype), self.weight, self.group_size, self.scales)
            return y.to(x.dtype).view(*shape[:-1], self.out_features)  # (..., out)
        w = dequantize_int4(self.weight, self.scales, self.zeros).to(x.dtype)
        return F.linear(x, w)


class HalfLinear(nn.Module):
    """A CPU linear layer with fp16 or bf16 weights that decodes through llama.kernels.

    Inputs of more than KERNEL_MAX_TOKENS tokens (prefill) go to F.linear, whose bf16 matrix
    multiplies use the CPU's matrix units where it has them.
    """

    KERNEL_MAX_TOKENS = 4

    def __init__(self, original: nn.Module):
        super().__init__()
        self.weight = original.weight
        self.parallel = _parallel_kind(original)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _communicate(self.parallel, x, self._local)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= self.KERNEL_MAX_TOKENS:
            return kernels.linear(x, self.weight)
        return F.linear(x, self.weight)


def _parallel_kind(original: nn.Module) -> str | None:
    """How a fairscale layer communicates: "column", "column_gather", "row", or None (plain)."""
    if parallel.model_parallel_size() == 1:
        return None
    from fairscale.nn.model_parallel import layers as fs

    if isinstance(original, fs.ColumnParallelLinear):
        return "column_gather" if original.gather_output else "column"
    if isinstance(original, fs.RowParallelLinear):
        return "row"
    return None


def _communicate(kind: str | None, x: torch.Tensor, local) -> torch.Tensor:
    """Apply `local` (this rank's shard) with fairscale's collectives around it."""
    if kind is None:
        return local(x)
    from fairscale.nn.model_parallel import mappings

    if kind == "row":
        return mappings.reduce_from_model_parallel_region(local(x))
    y = local(mappings.copy_to_model_parallel_region(x))
    return mappings.gather_from_model_parallel_region(y) if kind == "column_gather" else y


def convert_linears(model: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                    dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every linear layer named in LINEAR_NAMES with its quantized form (in place, any device).

    int4 needs in_features divisible by group_size; other layers stay int8 (logged).
    """
    check_mode(mode, group_size)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name not in LINEAR_NAMES or not hasattr(child, "weight"):
                continue
            out_f, in_f = child.weight.shape  # this rank's shard
            device = child.weight.device
            if mode == "int4" and in_f % group_size == 0:
                new = Int4Linear(in_f, out_f, group_size, dtype, device)
            else:
                if mode == "int4":
                    log.info("%s.%s: in_features=%d not divisible by group_size=%d; using int8",
                             name, child_name, in_f, group_size)
                new = Int8Linear(in_f, out_f, dtype, device)
            new.parallel = _parallel_kind(child)
            setattr(module, child_name, new)
    return model


def quantize_state_dict(state_dict: dict, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> dict:
    """Quantize each linear weight of a (memory-mapped) state dict, one tensor at a time.

    Other tensors are moved to device/dtype. Pages of the source file are released after each
    tensor, so the full-precision checkpoint never sits in memory as a whole.
    """
    check_mode(mode, group_size)
    out = {}
    for key in list(state_dict):
        t = state_dict[key]
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


def group_size_of(state_dict: dict) -> int:
    for key, t in state_dict.items():
        if key.endswith(".zeros"):
            w = state_dict[key[: -len("zeros")] + "weight"]
            return w.shape[1] * 2 // t.shape[1]
    return DEFAULT_GROUP_SIZE


def prepare_for_device(model: nn.Module) -> None:
    """Switch linear layers to the fastest kernel their device has (after load_state_dict):
    on CPU, llama.kernels for int8, fp16 and bf16 weights where they build, and for int4 the
    faster of PyTorch's kernel and llama.kernels that the layer's shape allows."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Int4Linear):
                child.to_kernel_layout()
                trim_heap()
            elif isinstance(child, Int8Linear):
                child.use_kernel()
            elif (name in LINEAR_NAMES and isinstance(getattr(child, "weight", None), torch.Tensor)
                  and child.weight.device.type == "cpu" and child.weight.dtype in (torch.float16, torch.bfloat16)
                  and getattr(child, "bias", None) is None and kernels.available()):
                setattr(module, name, HalfLinear(child))


# ---------------------------------------------------------------------------- memory


def release_pages(t: torch.Tensor) -> None:
    """Drop a memory-mapped tensor's pages from this process (they stay in the page cache).

    Without this, reading every tensor of a memory-mapped checkpoint leaves all of it resident.
    Only for CPU tensors inside a read-only-used file mapping (Linux); a no-op elsewhere.
    """
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() * t.element_size() < (1 << 20):
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    if not _in_file_mapping(start, end):
        return  # anonymous memory: MADV_DONTNEED would zero it
    page = mmap.PAGESIZE
    lo, hi = (start + page - 1) // page * page, end // page * page  # whole pages only
    if hi > lo:
        _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # 4: MADV_DONTNEED


def _in_file_mapping(start: int, end: int) -> bool:
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                if lo <= start and end <= hi:
                    # A file mapping: dropped pages are read back from the file if touched again.
                    return len(fields) >= 6 and fields[5].startswith("/")
    except OSError:
        pass
    return False


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc), so quantizing layer after layer does not
    leave the holes of its temporaries resident. A no-op where malloc_trim does not exist."""
    try:
        _libc().malloc_trim(0)
    except (AttributeError, OSError):
        pass


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _LIBC


# ---------------------------------------------------------------------------- files


def save_quantized(ckpt_dir: str, out_dir: str, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                   dtype: str = "float16") -> None:
    """Write a quantized Meta-layout checkpoint (params.json + consolidated.00.pth) to out_dir.

    The source is read tensor by tensor from its memory map; `Llama.build(out_dir, ...)` loads
    the result directly, without quantize=.
    """
    import shutil

    from llama.checkpoint import load_checkpoint
    from llama.device import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; pass float32, float16 or bfloat16")
    _, state_dict = load_checkpoint(ckpt_dir)
    if is_quantized(state_dict):
        raise ValueError(f"{ckpt_dir!r} is already quantized; pass a floating-point checkpoint")
    quantized = quantize_state_dict(state_dict, mode, group_size, DTYPES[dtype], "cpu")
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(os.path.join(ckpt_dir, "params.json"), os.path.join(out_dir, "params.json"))
    torch.save(quantized, os.path.join(out_dir, "consolidated.00.pth"))
    log.info("wrote %s quantized checkpoint to %s", mode, out_dir)


def main(ckpt_dir: str, out_dir: str, mode: str = "int8", group_size: int = DEFAULT_GROUP_SIZE,
         dtype: str = "float16") -> None:
    """python -m llama.quantize CKPT_DIR OUT_DIR --mode int4 --group_size 32"""
    logging.basicConfig(level=logging.INFO)
    save_quantized(ckpt_dir, out_dir, mode, group_size, dtype)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
