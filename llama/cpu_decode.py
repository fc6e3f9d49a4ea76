"""Decoding steps on CPU with one C++ op per decoder block (llama.kernels.block_decode).

On a CPU, a decoding step of a small model spends as long in PyTorch's per-op costs (dispatch,
allocation, starting threads for each of about thirty ops a layer) as in reading the weights:
measured on the 110M shape (2 cores), 15 ms a token of about 36. `use_fused_decode(model)` swaps
each block, after `use_cpu_kernels`, for a `FusedBlock`: the same children under the same names
(Meta's state-dict keys), whose steps of one token a row run as one op, and everything else
(prefill, more rows than MAX_ROWS, layers with hooks such as model parallel's collectives)
through the block's own PyTorch forward.
"""

import torch
from torch import nn

from llama import kernels
from llama.cpu_layers import AtenInt4Linear, DenseLinear, KernelInt4Linear, KernelInt4x8Linear, KernelInt8Linear
from llama.model import TransformerBlock

# The kinds of csrc/kernels.h, by layer class.
KINDS = {DenseLinear: 0, KernelInt8Linear: 1, KernelInt4Linear: 2, AtenInt4Linear: 3, KernelInt4x8Linear: 4}
NO_TENSOR = torch.empty(0)


def _linears(block: nn.Module) -> list[nn.Module]:
    a, f = block.attention, block.feed_forward
    return [a.wq, a.wk, a.wv, a.wo, f.w1, f.w2, f.w3]


class FusedBlock(nn.Module):
    """A TransformerBlock whose one-token steps run as one C++ op."""

    MAX_ROWS = DenseLinear.KERNEL_MAX_TOKENS  # rows a step: the kernels read each weight once for all

    def __init__(self, block: TransformerBlock):
        super().__init__()
        self.layer_id = block.layer_id
        self.attention, self.feed_forward = block.attention, block.feed_forward
        self.attention_norm, self.ffn_norm = block.attention_norm, block.ffn_norm
        linears = _linears(block)
        self._linears = linears  # a plain list: the modules are registered above
        self._kinds = [KINDS[type(layer)] for layer in linears]
        self._groups = [getattr(layer, "group_size", 0) for layer in linears]
        self._weights = [getattr(layer, name, NO_TENSOR) for layer in linears
                         for name in ("weight", "scales", "zeros")]
        self._has_hooks: bool | None = None

    def forward(self, x, pos, cos, sin, mask, kv_len):
        bsz, seqlen, _ = x.shape
        if seqlen != 1 or bsz > self.MAX_ROWS or self._hooked():
            return TransformerBlock.forward(self, x, pos, cos, sin, mask, kv_len)
        attn = self.attention
        positions = torch.full((bsz,), pos, dtype=torch.long) if isinstance(pos, int) else pos.reshape(bsz)
        return kernels.block_decode(x, self._weights, self._kinds, self._groups, self.attention_norm.weight,
                                    self.ffn_norm.weight, self.attention_norm.eps, attn.cache.k, attn.cache.v,
                                    positions, cos, sin, attn.n_local_heads)

    def _hooked(self) -> bool:
        """Whether a linear layer has hooks (model parallel's collectives), which the op would skip;
        looked at once, at the first step: hooks are added while building, before any step."""
        if self._has_hooks is None:
            self._has_hooks = any(m._forward_hooks or m._forward_pre_hooks for m in self._linears)
        return self._has_hooks


def fusable(block: nn.Module) -> bool:
    """A block whose seven linear layers are all llama.kernels layers on the CPU."""
    return (isinstance(block, TransformerBlock) and kernels.available()
            and all(type(layer) in KINDS and layer.weight.device.type == "cpu" for layer in _linears(block)))


def use_fused_decode(model: nn.Module) -> nn.Module:
    """Swap every fusable block of model.layers for a FusedBlock (in place, after use_cpu_kernels)."""
    for i, block in enumerate(getattr(model, "layers", [])):
        if fusable(block):
            model.layers[i] = FusedBlock(block)
    return model
