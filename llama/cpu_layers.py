"""CPU linear layers that decode through the fastest kernel there is, and the swap into a model.

`use_cpu_kernels(model)` replaces, after loading, each linear layer on the CPU (fp32, fp16,
bf16, int8 or int4 weights) with one of the layers below. They keep Meta's state-dict keys
(`weight`, `scales`, `zeros`); int4 layers hold their weights in the kernel's packed layout.
"""

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from llama import kernels
from llama.pages import trim_heap
from llama.quant import LINEAR_NAMES, unpack_int4
from llama.quant_layers import Int4Linear, Int8Linear

REPACK_ROWS = 1024  # int4 rows repacked at a time, to bound the temporaries


class DenseLinear(nn.Module):
    """fp32, fp16 or bf16 weights through llama.kernels, or through F.linear for many tokens
    (prefill) where PyTorch's matrix multiply is the faster: on CPUs with AVX-512, whose matrix
    multiplies in fp32 (and in fp16 and bf16 where the CPU computes in them) are PyTorch's strength.
    Measured on 110M-shape matrices (2 cores, AVX2), one token reads 14-19 GB/s through
    llama.kernels against 9-14 GB/s through F.linear; 32000x768 at 8 and 16 tokens (a decoding
    batch): fp32 9.8 and 13.1 ms against 30.9 and 35.2, fp16 6.2 and 12.7 against 24.4 and 43.2.
    128 tokens (GFLOP/s, two runs): fp32 768x768 94 and 88 against 103 and 92, 2048x5632 95 and 97
    against 72 and 58; fp16 104-149 against 13-24, bf16 87-130 against 10-19."""

    KERNEL_MAX_TOKENS = 16

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight
        self.kernel_prefill = kernels.loaded_build() == "avx2" or not torch_computes_in(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_prefill or x.numel() // x.shape[-1] <= self.KERNEL_MAX_TOKENS:
            return kernels.linear(x, self.weight)
        return F.linear(x, self.weight)


def torch_computes_in(dtype: torch.dtype) -> bool:
    """Whether PyTorch's CPU matrix multiplies compute in dtype (through oneDNN) rather than convert."""
    if dtype == torch.float32:
        return True
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    return hasattr(torch.ops.mkldnn, check) and getattr(torch.ops.mkldnn, check)()


class KernelInt8Linear(nn.Module):
    """llama.quant's int8 through llama.kernels, with fp32 scales as it reads them."""

    def __init__(self, layer: Int8Linear):
        super().__init__()
        self.register_buffer("weight", layer.weight)
        self.register_buffer("scales", layer.scales.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.scales)


class AtenInt4Linear(nn.Module):
    """int4 through PyTorch's CPU kernel, which computes 64 output rows at once (measured on the
    110M shape with compile: 189 tok/s against 163 with llama.kernels' int4). `scales` holds the
    kernel's (groups, out, 2) pairs of scale and zero."""

    def __init__(self, layer: Int4Linear, in_place: bool = False):
        super().__init__()
        self.out_features, self.group_size = layer.out_features, layer.group_size
        packed = layer.weight if in_place else torch.empty_like(layer.weight)  # the kernel packs blocks of 64 rows
        for lo in range(0, layer.out_features, REPACK_ROWS):
            rows = unpack_int4(layer.weight[lo : lo + REPACK_ROWS]).to(torch.int32)  # (rows, in)
            packed[lo : lo + REPACK_ROWS] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows, 1)
        self.register_buffer("weight", packed)
        zeros = layer.zeros if layer.zeros.numel() else torch.zeros_like(layer.scales)  # none: Q4_0's 0
        pairs = torch.stack([layer.scales.t(), zeros.t()], dim=-1)  # (groups, out, 2)
        # fp16 scales (GGUF's) are widened: the kernel computes in its scales' dtype.
        self.register_buffer("scales", pairs.float() if pairs.dtype == torch.float16 else pairs.contiguous())

    @staticmethod
    def fits(layer: Int4Linear) -> bool:
        return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and layer.out_features % 64 == 0
                and layer.group_size in (32, 64, 128, 256))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (tokens, in)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(self.scales.dtype), self.weight,
                                                       self.group_size, self.scales)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)  # (..., out)


class KernelInt4Linear(nn.Module):
    """int4 through llama.kernels, for the shapes PyTorch's kernel refuses."""

    def __init__(self, layer: Int4Linear, in_place: bool = False):
        super().__init__()
        self.group_size = layer.group_size
        packed = layer.weight if in_place else torch.empty_like(layer.weight)
        for lo in range(0, layer.out_features, REPACK_ROWS):
            packed[lo : lo + REPACK_ROWS] = kernels.pack_int4(unpack_int4(layer.weight[lo : lo + REPACK_ROWS]))
        self.register_buffer("weight", packed)
        self.register_buffer("scales", layer.scales)
        self.register_buffer("zeros", layer.zeros)

    @staticmethod
    def fits(layer: Int4Linear) -> bool:
        return kernels.int4_group_ok(layer.in_features, layer.group_size) and kernels.available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear_int4(x, self.weight, self.scales, self.zeros, self.group_size)


class KernelInt4x8Linear(nn.Module):
    """Q4_0 (GGUF's int4: groups of 32, fp16 scales, no zeros) through llama.kernels with rows
    interleaved by 8, whose kernel computes a block of 8 rows in one vector (kernels.h:
    int4x8_group). `weight` and `scales` hold that layout."""

    group_size = 32

    def __init__(self, layer: Int4Linear, in_place: bool = False):
        super().__init__()
        packed = layer.weight if in_place else torch.empty_like(layer.weight)
        for lo in range(0, layer.out_features, REPACK_ROWS):  # REPACK_ROWS % 8 == 0
            packed[lo : lo + REPACK_ROWS] = kernels.pack_int4_rows8(unpack_int4(layer.weight[lo : lo + REPACK_ROWS]))
        self.register_buffer("weight", packed)
        self.register_buffer("scales", kernels.int4x8_scales(layer.scales))

    @staticmethod
    def fits(layer: Int4Linear) -> bool:
        return (layer.group_size == 32 and layer.scales.dtype == torch.float16 and not layer.zeros.numel()
                and layer.out_features % 8 == 0 and layer.in_features % 32 == 0 and kernels.available())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear_int4x8(x, self.weight, self.scales)


def cpu_layer(layer: nn.Module, in_place: bool = False) -> nn.Module | None:
    """The faster replacement for one CPU linear layer, or None when it has none. `in_place`:
    int4 weights are repacked in their own memory (rows are repacked block by block, each block
    read whole before it is written), for weights no other module shares."""
    if isinstance(layer, Int4Linear):
        # fp16 scales (GGUF's Q4_0) stay fp16 in llama.kernels, which widens them as it reads them;
        # PyTorch's kernel would need them, and the activations, in one dtype.
        order = (KernelInt4x8Linear, KernelInt4Linear, AtenInt4Linear) if layer.scales.dtype == torch.float16 \
            else (AtenInt4Linear, KernelInt4Linear)
        for kind in order:
            if kind.fits(layer):
                return kind(layer, in_place)
        return None
    if isinstance(layer, Int8Linear):
        return KernelInt8Linear(layer) if kernels.available() else None
    # A model-parallel slice of a memory-mapped file can be a strided view: PyTorch's ops take it.
    if (isinstance(layer, nn.Linear) and layer.bias is None and layer.weight.is_contiguous()
            and layer.weight.dtype in (torch.float32, torch.float16, torch.bfloat16) and kernels.available()):
        return DenseLinear(layer.weight)
    return None


def use_cpu_kernels(model: nn.Module) -> nn.Module:
    """Swap each CPU linear layer for its faster form (in place, after loading). Only the parents
    are listed up front: a repacked int4 layer's old weights are freed as soon as it is swapped,
    so the model never holds two copies (a 7B int4 build would otherwise peak 3.5 GB higher)."""
    parents = [m for m in model.modules() if any(n in LINEAR_NAMES for n, _ in m.named_children())]
    uses = Counter(t.data_ptr() for t in model.state_dict(keep_vars=True).values())
    for module in parents:
        for name in LINEAR_NAMES:
            child = getattr(module, name, None)
            weight = getattr(child, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.device.type != "cpu":
                continue
            new = cpu_layer(child, in_place=uses[weight.data_ptr()] == 1)
            if new is not None:
                repacked = isinstance(child, Int4Linear)
                setattr(module, name, new)
                del child, new, weight
                if repacked:
                    trim_heap()
    return model
