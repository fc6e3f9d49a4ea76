"""Quantized linear layers in plain PyTorch, and the transform that swaps them into a model.

The layers hold the tensors `llama.quant` describes and compute with PyTorch ops on any device;
`llama.prepare` later swaps them for faster device-specific layers where there are some.
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn

from llama.quant import DEFAULT_GROUP_SIZE, LINEAR_NAMES, check_mode, dequantize_int4

log = logging.getLogger(__name__)


class Int8Linear(nn.Module):
    """y = x (q * scales)^T with q int8 per output channel."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's fused int8 kernel reads the int8 weights directly; on CPU it is fast for bf16
        # inputs only (measured: fp32/fp16 inputs run at a tenth of the speed of dequantizing),
        # and needs in_features % 16 == 0 (other sizes give wrong results or crash in 2.13).
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.in_features % 16 == 0:
            shape = x.shape
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scales)
            return y.view(*shape[:-1], self.out_features)  # (..., out)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


class Int4Linear(nn.Module):
    """y = x W^T with W stored as int4 groups of `group_size` inputs (see llama.quant)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype=torch.float32, device=None,
                 zeros: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups if zeros else 0, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_int4(self.weight, self.scales, self.zeros).to(x.dtype))


class Int4Embedding(nn.Module):
    """An embedding table stored as int4 groups (GGUF's Q4_0/Q4_1 embeddings): rows are
    dequantized as they are looked up, to `dtype`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int, scale_dtype=torch.float32,
                 dtype=torch.float32, device=None, zeros: bool = True):
        super().__init__()
        self.group_size, self.dtype = group_size, dtype
        groups = embedding_dim // group_size
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim // 2, dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, groups, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", torch.empty(num_embeddings, groups if zeros else 0, dtype=scale_dtype,
                                                  device=device))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)  # (n,)
        rows = dequantize_int4(self.weight[flat], self.scales[flat], self.zeros[flat])  # (n, dim)
        return rows.to(self.dtype).view(*tokens.shape, -1)  # (..., dim)


def quantize_model(model: nn.Module, mode: str | None, group_size: int = DEFAULT_GROUP_SIZE,
                   dtype: torch.dtype = torch.float32,
                   layers: dict[str, tuple[torch.dtype | None, bool]] | None = None) -> nn.Module:
    """Swap every linear layer named in LINEAR_NAMES for its quantized form (in place, any device;
    on the meta device before loading). int4 needs in_features divisible by group_size; other
    layers become int8 (logged). A no-op when mode is None.

    `layers` ({module name: (scales dtype or None for `dtype`, has zeros)}) limits the swap to the
    layers a quantized checkpoint stores quantized, `tok_embeddings` included (quant.stored_layers).
    """
    if mode is None:
        return model
    check_mode(mode, group_size)
    if layers is not None and "tok_embeddings" in layers:
        vocab, dim = model.tok_embeddings.weight.shape
        scale_dtype, zeros = layers["tok_embeddings"]
        model.tok_embeddings = Int4Embedding(vocab, dim, group_size, scale_dtype or dtype, dtype,
                                             model.tok_embeddings.weight.device, zeros)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full_name = f"{name}.{child_name}" if name else child_name
            if child_name not in LINEAR_NAMES or not isinstance(child, nn.Linear):
                continue
            if layers is not None and full_name not in layers:
                continue
            out_f, in_f = child.weight.shape  # this rank's shard
            device = child.weight.device
            if mode == "int4" and in_f % group_size == 0:
                scale_dtype, zeros = (layers or {}).get(full_name, (None, True))
                new = Int4Linear(in_f, out_f, group_size, scale_dtype or dtype, device, zeros)
            else:
                if mode == "int4":
                    log.info("%s.%s: in_features=%d not divisible by group_size=%d; using int8",
                             name, child_name, in_f, group_size)
                new = Int8Linear(in_f, out_f, dtype, device)
            setattr(module, child_name, new)
    return model
