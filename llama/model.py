"""The Llama 2 transformer: Meta's architecture and module names, pure PyTorch.

No I/O, no printing and no device names: the model runs wherever its weights are.
Runtime buffers (rotary tables, KV cache) are made by `setup_caches` on the weights' device.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama import parallel


@dataclass
class ModelArgs:
    """Model shape; the fields are the keys of Meta's `params.json`, plus cache sizes."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_batch_size: int = 32
    max_seq_len: int = 2048
    # Explicit feed-forward width for checkpoints that do not follow Meta's rule (HF, llama2.c).
    hidden_dim: int | None = None

    @classmethod
    def from_params(cls, params: dict, source: str = "params.json") -> "ModelArgs":
        """ModelArgs from a `params.json` dict; an unknown key is an error naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"{source} has unknown key(s) {unknown}; known keys are {sorted(known)}"
            )
        return cls(**params)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's rule: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> torch.Tensor:
    """cos and sin of every (position, frequency): shape (2, max_seq_len, head_dim // 2), fp32."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), freqs)
    return torch.stack([angles.cos(), angles.sin()])


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by position angles, as Meta's complex RoPE does."""
    b, s, h, d = x.shape
    pairs = x.float().view(b, s, h, d // 2, 2)  # (b, s, h, d/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (b, s, 1, d/2)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(3).type_as(x)  # (b, s, h, d)


class KVCache(nn.Module):
    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, kv_len: int):
        """Write xk, xv (b, s, kv_heads, d) at positions pos (b, s); return keys/values up to kv_len."""
        b = xk.shape[0]
        rows = torch.arange(b, device=pos.device).unsqueeze(1)  # (b, 1)
        self.k[rows, :, pos] = xk  # indexed view is (b, s, kv_heads, d)
        self.v[rows, :, pos] = xv
        return self.k[:b, :, :kv_len], self.v[:b, :, :kv_len]  # (b, kv_heads, kv_len, d)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        mp = parallel.model_parallel_size()
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = args.kv_heads // mp
        self.head_dim = args.head_dim
        self.wq = parallel.column_linear(args.dim, args.n_heads * self.head_dim)
        self.wk = parallel.column_linear(args.dim, args.kv_heads * self.head_dim)
        self.wv = parallel.column_linear(args.dim, args.kv_heads * self.head_dim)
        self.wo = parallel.row_linear(args.n_heads * self.head_dim, args.dim)
        self.cache: KVCache | None = None

    def forward(self, x, pos, cos, sin, mask, kv_len):
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq = apply_rotary_emb(xq, cos, sin)
        xk = apply_rotary_emb(xk, cos, sin)
        keys, values = self.cache.update(pos, xk, xv, kv_len)  # (b, kv_heads, kv_len, d)
        out = F.scaled_dot_product_attention(
            xq.transpose(1, 2),  # (b, heads, s, d)
            keys,
            values,
            attn_mask=mask,
            enable_gqa=self.n_local_heads != self.n_local_kv_heads,
        )  # (b, heads, s, d)
        out = out.transpose(1, 2).reshape(bsz, seqlen, -1)  # (b, s, heads * d)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = parallel.column_linear(dim, hidden_dim)
        self.w2 = parallel.row_linear(hidden_dim, dim)
        self.w3 = parallel.column_linear(dim, hidden_dim)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, pos, cos, sin, mask, kv_len):
        h = x + self.attention(self.attention_norm(x), pos, cos, sin, mask, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.vocab_size <= 0:
            raise ValueError(f"vocab_size is {params.vocab_size}; fill it from the tokenizer first")
        mp = parallel.model_parallel_size()
        if params.n_heads % mp or params.kv_heads % mp:
            raise ValueError(
                f"n_heads={params.n_heads} and n_kv_heads={params.kv_heads} must both be divisible "
                f"by the model-parallel size {mp}; run with a different --nproc_per_node"
            )
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = parallel.embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = parallel.column_linear(params.dim, params.vocab_size, gather_output=True)
        self.max_batch_size = 0
        self.max_seq_len = 0

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """(Re)allocate the KV cache and rotary tables on the device and dtype of the weights."""
        weight = self.tok_embeddings.weight
        p = self.params
        self.register_buffer(
            "rope", rope_tables(p.head_dim, max_seq_len, p.rope_theta, weight.device), persistent=False
        )
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(max_batch_size, max_seq_len, attn.n_local_kv_heads, p.head_dim,
                                 weight.dtype, weight.device)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0,
                logits_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (float32) for tokens (b, s) placed at start_pos (an int, or one per row).

        With logits_pos (b,), only the logits at that position of each row: (b, 1, vocab).
        """
        bsz, seqlen = tokens.shape
        offsets = torch.arange(seqlen, device=tokens.device)
        if isinstance(start_pos, torch.Tensor):
            pos = start_pos.view(bsz, 1) + offsets  # (b, s)
            kv_len = int(start_pos.max()) + seqlen
        else:
            pos = (start_pos + offsets).expand(bsz, seqlen)  # (b, s)
            kv_len = start_pos + seqlen
        assert bsz <= self.max_batch_size and kv_len <= self.max_seq_len, "setup_caches too small"
        cos, sin = self.rope[0][pos], self.rope[1][pos]  # (b, s, d/2)
        mask = None
        if seqlen > 1 or isinstance(start_pos, torch.Tensor):
            keys = torch.arange(kv_len, device=tokens.device)
            mask = (keys <= pos.unsqueeze(-1)).unsqueeze(1)  # (b, 1, s, kv_len)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, pos, cos, sin, mask, kv_len)
        if logits_pos is not None:
            h = h[torch.arange(bsz, device=h.device), logits_pos].unsqueeze(1)  # (b, 1, dim)
        return self.output(self.norm(h)).float()
