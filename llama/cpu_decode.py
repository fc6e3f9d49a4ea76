"""Decoding steps on CPU as one C++ op (llama.kernels.decode_step, decode_layers).

On a CPU, a decoding step of a small model spends as long in PyTorch's per-op costs (dispatch,
allocation, starting threads for each of about thirty ops a layer) as in reading the weights:
measured on the 110M shape (2 cores), 15 ms a token of about 36. Even a few ops a step cost more
than they seem: a step streams every weight through the caches, so the interpreter and PyTorch's
dispatch start cold each step (110M q4_0: the embedding 0.8 ms and the final norm 0.55 ms, against
0.1 and 0.04 warm). So a whole step is one op.

`use_fused_decode(model)`, after `use_cpu_kernels`, swaps each block for a `FusedBlock` (the same
children under the same names, Meta's state-dict keys), model.layers for `FusedLayers`, and the
model's class for `FusedTransformer`: steps of one token a row, and prefills of up to
PREFILL_MAX_TOKENS tokens, run the embedding, every block, the final norm and the output layer in
one op. Where a part is not of a kind the op knows, what can be fused still is: all blocks in one
op, else each block in one. Everything else (longer prefills, more rows than MAX_ROWS, layers with
hooks such as model parallel's collectives, torch.compile) goes through the modules' own PyTorch
forward.
"""

import torch
from torch import nn

from llama import kernels
from llama.cpu_layers import AtenInt4Linear, DenseLinear, KernelInt4Linear, KernelInt4x8Linear, KernelInt8Linear
from llama.model import Layers, RMSNorm, Transformer, TransformerBlock
from llama.quant_layers import Int4Embedding

# The kinds of csrc/kernels.h, by layer class.
KINDS = {DenseLinear: 0, KernelInt8Linear: 1, KernelInt4Linear: 2, AtenInt4Linear: 3, KernelInt4x8Linear: 4}
NO_TENSOR = torch.empty(0)
MAX_ROWS = DenseLinear.KERNEL_MAX_TOKENS  # rows a step: the kernels read each weight once for all
# Tokens of a prefill in one op. Its attention reads every key for each 4 tokens (PyTorch's tiles the
# keys too), so PyTorch's forward catches up on long prompts: 110M q4_0 (2 cores, before the 4-token
# attention), 512 tokens 738 and 827 ms against 790 and 918; 1024: 1841 and 2128 against 1915 and 2033.
PREFILL_MAX_TOKENS = 512


def _linears(block: nn.Module) -> list[nn.Module]:
    a, f = block.attention, block.feed_forward
    return [a.wq, a.wk, a.wv, a.wo, f.w1, f.w2, f.w3]


def _tensors(layer: nn.Module) -> list[torch.Tensor]:
    """(weight, scales, zeros) of a kernel layer, empty where it has none."""
    return [getattr(layer, name, NO_TENSOR) for name in ("weight", "scales", "zeros")]


def _hooked(*modules: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _op_rows(x: torch.Tensor, stack: "Stack") -> bool:
    """Whether the op takes x (b, s, ...): a step of at most MAX_ROWS rows, or a prefill of at most
    PREFILL_MAX_TOKENS tokens whose every linear layer computes in the kernels anyway."""
    b, s = x.shape[:2]
    if torch.compiler.is_compiling() or not stack.fused:
        return False
    return b <= MAX_ROWS if s == 1 else b * s <= PREFILL_MAX_TOKENS and stack.prefill


class FusedBlock(nn.Module):
    """A TransformerBlock whose one-token steps run as one C++ op."""

    def __init__(self, block: TransformerBlock):
        super().__init__()
        self.layer_id = block.layer_id
        self.attention, self.feed_forward = block.attention, block.feed_forward
        self.attention_norm, self.ffn_norm = block.attention_norm, block.ffn_norm
        self._stack: Stack | None = None

    def forward(self, x, pos, cos, sin, mask, kv_len):
        if self._stack is None:  # at the first step, after any hooks were added
            self._stack = Stack([self])
        if not _op_rows(x, self._stack):
            return TransformerBlock.forward(self, x, pos, cos, sin, mask, kv_len)
        return self._stack.layers(x, _positions(pos, *x.shape[:2]), cos, sin)


def _positions(pos: int | torch.Tensor, bsz: int, seqlen: int) -> torch.Tensor:
    """(b, s) positions of each token from Transformer._span's int or (b, s) tensor."""
    if isinstance(pos, int):
        return (pos + torch.arange(seqlen)).expand(bsz, seqlen)  # (b, s)
    return pos.reshape(bsz, seqlen)


class Stack:
    """The op's arguments for consecutive blocks: weights, kinds and groups of their linear layers
    and their norms, end to end, taken once (after building, the modules hold the same tensors);
    the caches, which setup_caches replaces, are looked up again when it has. `fused`: whether every
    block is a FusedBlock with no hooks on its linear layers (model parallel's collectives);
    `prefill`: whether their layers compute many tokens in the kernels too (DenseLinear may use
    PyTorch's matrix multiply there)."""

    def __init__(self, blocks: list[nn.Module]):
        self.blocks = blocks
        self.fused = bool(blocks) and all(isinstance(b, FusedBlock) and not _hooked(*_linears(b)) for b in blocks)
        if not self.fused:
            return
        linears = [layer for b in blocks for layer in _linears(b)]
        self.prefill = all(_kernel_prefill(layer) for layer in linears)
        self.weights = [t for layer in linears for t in _tensors(layer)]
        self.kinds = [KINDS[type(layer)] for layer in linears]
        self.groups = [getattr(layer, "group_size", 0) for layer in linears]
        norms = [n for b in blocks for n in (b.attention_norm, b.ffn_norm)]
        self.norms, self.eps = [n.weight for n in norms], [n.eps for n in norms]
        self.n_heads = blocks[0].attention.n_local_heads
        self._cache, self._k, self._v = None, [], []

    def caches(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        first = self.blocks[0].attention.cache
        if first is not self._cache:
            caches = [b.attention.cache for b in self.blocks]
            self._cache, self._k, self._v = first, [c.k for c in caches], [c.v for c in caches]
        return self._k, self._v

    def args(self) -> list:
        """The blocks' arguments to decode_layers and decode_step, from weights to cache_v."""
        return [self.weights, self.kinds, self.groups, self.norms, self.eps, *self.caches()]

    def layers(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return kernels.decode_layers(x, *self.args(), positions, cos, sin, self.n_heads)


def _kernel_prefill(layer: nn.Module) -> bool:
    return not isinstance(layer, DenseLinear) or layer.kernel_prefill


class FusedLayers(Layers):
    """model.layers whose steps and short prefills run all blocks in one op, when all are unhooked
    FusedBlocks."""

    def __init__(self, layers: Layers):
        super().__init__(layers)
        self._stack: Stack | None = None

    def stack(self) -> Stack:
        if self._stack is None:  # at the first step, after any hooks were added
            self._stack = Stack(list(self))
        return self._stack

    def forward(self, h, pos, cos, sin, mask, kv_len):
        if _op_rows(h, self.stack()):
            return self._stack.layers(h, _positions(pos, *h.shape[:2]), cos, sin)
        return super().forward(h, pos, cos, sin, mask, kv_len)


class FusedTransformer(Transformer):
    """A Transformer whose steps and short prefills run whole as one op (llama.kernels.decode_step)
    when its embedding, blocks, final norm and output layer are all of kinds the op knows.
    use_fused_decode gives a built model this class; its modules and state dict stay as they were."""

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0,
                logits_pos: torch.Tensor | None = None) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        all_logits = seqlen > 1 and logits_pos is None
        if (not self._fused_step() or not _op_rows(tokens, self.layers.stack())
                or all_logits and not _kernel_prefill(self.output)):
            return super().forward(tokens, start_pos, logits_pos)
        if isinstance(start_pos, int):
            pos = _positions(start_pos, bsz, seqlen)
        else:
            pos = start_pos.reshape(bsz, 1) + torch.arange(seqlen)  # (b, s)
        rows = torch.arange(bsz * seqlen)  # the tokens whose logits are returned
        if logits_pos is not None:
            rows = torch.arange(bsz) * seqlen + logits_pos.reshape(bsz)
        stack = self.layers.stack()
        logits = kernels.decode_step(tokens, *self._embedding_args, *stack.args(), pos, self.rope, stack.n_heads,
                                     self.norm.weight, self.norm.eps, *self._output_args, rows)
        return logits.view(bsz, -1, logits.shape[-1])  # (b, s or 1, vocab)

    def _fused_step(self) -> bool:
        """Whether the parts are all of kinds the op knows (looked at once, at the first step), and
        none of its embedding, blocks list, final norm and output layer has hooks (at every step)."""
        if getattr(self, "_step_fusable", None) is None:
            emb, out = self.tok_embeddings, self.output
            if type(emb) is nn.Embedding and emb.weight.is_floating_point():
                self._embedding_args = ([emb.weight, NO_TENSOR, NO_TENSOR], 0)
                dtype = emb.weight.dtype
            elif type(emb) is Int4Embedding:
                self._embedding_args = ([emb.weight, emb.scales, emb.zeros], emb.group_size)
                dtype = emb.dtype
            else:
                self._embedding_args = None
            self._step_fusable = (self._embedding_args is not None and self.layers.stack().fused
                                  and type(self.norm) is RMSNorm and type(out) in KINDS
                                  and all(t.device.type == "cpu" for t in (emb.weight, out.weight, self.norm.weight)))
            if self._step_fusable:
                self._output_args = (_tensors(out), KINDS[type(out)], getattr(out, "group_size", 0), dtype)
                self._outer = [emb, self.layers, self.norm, out]  # the model's own run around any forward
        return self._step_fusable and not _hooked(*self._outer)


def fusable(block: nn.Module) -> bool:
    """A block whose seven linear layers are all llama.kernels layers on the CPU."""
    return (isinstance(block, TransformerBlock) and kernels.available()
            and all(type(layer) in KINDS and layer.weight.device.type == "cpu" for layer in _linears(block)))


def use_fused_decode(model: nn.Module) -> nn.Module:
    """Swap every fusable block of model.layers for a FusedBlock, model.layers for FusedLayers, and a
    Transformer's class for FusedTransformer (in place, after use_cpu_kernels)."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, Layers):
        return model
    for i, block in enumerate(layers):
        if fusable(block):
            layers[i] = FusedBlock(block)
    if not any(isinstance(b, FusedBlock) for b in layers):
        return model
    model.layers = FusedLayers(layers)
    if type(model) is Transformer:
        model.__class__ = FusedTransformer
    return model
