"""Decoding steps on CPU with one C++ op for all the decoder blocks (llama.kernels.decode_layers).

On a CPU, a decoding step of a small model spends as long in PyTorch's per-op costs (dispatch,
allocation, starting threads for each of about thirty ops a layer) as in reading the weights:
measured on the 110M shape (2 cores), 15 ms a token of about 36. One op a block still left about
1 ms a step of Python between the blocks (110M q4_0: 5.9 against 4.8 ms for the blocks alone).

`use_fused_decode(model)`, after `use_cpu_kernels`, swaps each block for a `FusedBlock` (the same
children under the same names, Meta's state-dict keys) and model.layers for `FusedLayers`, whose
steps of one token a row run every block in one op. Everything else (prefill, more rows than
MAX_ROWS, layers with hooks such as model parallel's collectives) goes through the blocks' own
PyTorch forward, and a block list that is not all FusedBlocks runs each one's op in turn.
"""

import torch
from torch import nn

from llama import kernels
from llama.cpu_layers import AtenInt4Linear, DenseLinear, KernelInt4Linear, KernelInt4x8Linear, KernelInt8Linear
from llama.model import Layers, TransformerBlock

# The kinds of csrc/kernels.h, by layer class.
KINDS = {DenseLinear: 0, KernelInt8Linear: 1, KernelInt4Linear: 2, AtenInt4Linear: 3, KernelInt4x8Linear: 4}
NO_TENSOR = torch.empty(0)
MAX_ROWS = DenseLinear.KERNEL_MAX_TOKENS  # rows a step: the kernels read each weight once for all


def _linears(block: nn.Module) -> list[nn.Module]:
    a, f = block.attention, block.feed_forward
    return [a.wq, a.wk, a.wv, a.wo, f.w1, f.w2, f.w3]


def _one_token_rows(x: torch.Tensor) -> bool:
    bsz, seqlen, _ = x.shape
    return seqlen == 1 and bsz <= MAX_ROWS


class FusedBlock(nn.Module):
    """A TransformerBlock whose one-token steps run as one C++ op."""

    def __init__(self, block: TransformerBlock):
        super().__init__()
        self.layer_id = block.layer_id
        self.attention, self.feed_forward = block.attention, block.feed_forward
        self.attention_norm, self.ffn_norm = block.attention_norm, block.ffn_norm
        linears = _linears(block)
        self._linears = linears  # a plain list: the modules are registered above
        self.kinds = [KINDS[type(layer)] for layer in linears]
        self.groups = [getattr(layer, "group_size", 0) for layer in linears]
        self.weights = [getattr(layer, name, NO_TENSOR) for layer in linears for name in ("weight", "scales", "zeros")]
        self._has_hooks: bool | None = None

    def forward(self, x, pos, cos, sin, mask, kv_len):
        if not _one_token_rows(x) or self.hooked():
            return TransformerBlock.forward(self, x, pos, cos, sin, mask, kv_len)
        return decode([self], self.weights, self.kinds, self.groups, x, pos, cos, sin)

    def hooked(self) -> bool:
        """Whether a linear layer has hooks (model parallel's collectives), which the op would skip;
        looked at once, at the first step: hooks are added while building, before any step."""
        if self._has_hooks is None:
            self._has_hooks = any(m._forward_hooks or m._forward_pre_hooks for m in self._linears)
        return self._has_hooks


def decode(blocks: list[FusedBlock], weights: list[torch.Tensor], kinds: list[int], groups: list[int],
           x: torch.Tensor, pos, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One step of consecutive blocks, of their weights, kinds and groups laid end to end."""
    bsz = x.shape[0]
    positions = torch.full((bsz,), pos, dtype=torch.long) if isinstance(pos, int) else pos.reshape(bsz)
    norms = [n for b in blocks for n in (b.attention_norm, b.ffn_norm)]
    caches = [b.attention.cache for b in blocks]  # read at each step: setup_caches may replace them
    return kernels.decode_layers(x, weights, kinds, groups, [n.weight for n in norms], [n.eps for n in norms],
                                 [c.k for c in caches], [c.v for c in caches], positions, cos, sin,
                                 blocks[0].attention.n_local_heads)


class FusedLayers(Layers):
    """model.layers whose one-token steps run all blocks in one op, when all are unhooked FusedBlocks."""

    def __init__(self, layers: Layers):
        super().__init__(layers)
        self._args: tuple | None = None  # the blocks' weights, kinds and groups end to end, or () for none

    def forward(self, h, pos, cos, sin, mask, kv_len):
        if self._args is None:  # at the first step, after any hooks were added
            blocks = list(self)
            fused = blocks and all(isinstance(b, FusedBlock) and not b.hooked() for b in blocks)
            self._args = ([t for b in blocks for t in b.weights], [k for b in blocks for k in b.kinds],
                          [g for b in blocks for g in b.groups]) if fused else ()
        if self._args and _one_token_rows(h):
            return decode(list(self), *self._args, h, pos, cos, sin)
        return super().forward(h, pos, cos, sin, mask, kv_len)


def fusable(block: nn.Module) -> bool:
    """A block whose seven linear layers are all llama.kernels layers on the CPU."""
    return (isinstance(block, TransformerBlock) and kernels.available()
            and all(type(layer) in KINDS and layer.weight.device.type == "cpu" for layer in _linears(block)))


def use_fused_decode(model: nn.Module) -> nn.Module:
    """Swap every fusable block of model.layers for a FusedBlock, and model.layers for FusedLayers
    (in place, after use_cpu_kernels)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, Layers):
        return model
    for i, block in enumerate(layers):
        if fusable(block):
            layers[i] = FusedBlock(block)
    if any(isinstance(b, FusedBlock) for b in layers):
        model.layers = FusedLayers(layers)
    return model
