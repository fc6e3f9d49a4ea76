"""The Llama transformer: Meta's architecture and module names, pure PyTorch math.

No I/O, no printing, no device names, and no knowledge of model parallelism or quantization:
those are transforms applied to a constructed model (`llama.parallel.shard_model`,
`llama.quant_layers.quantize_model`, `llama.prepare`). Runtime buffers (rotary tables, KV cache)
are made by `setup_caches` on the weights' device.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Meta's Llama 3.1 RoPE scaling, as llama-models 0.3.0 hard-codes it: factor, low and high
# frequency factors, and the context length of the model before scaling.
LLAMA3_ROPE_SCALING = (8.0, 1.0, 4.0, 8192)


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
    # Llama 3.1 / 3.2 RoPE scaling. `use_scaled_rope` alone means Meta's reference values
    # (LLAMA3_ROPE_SCALING); later Meta code reads the two factors below from params.json.
    use_scaled_rope: bool = False
    rope_scaling_factor: float | None = None
    rope_high_freq_factor: float | None = None
    # Only this project's readers write these two: HF rope_scaling values Meta's keys cannot hold.
    rope_low_freq_factor: float | None = None
    rope_original_context: int | None = None
    # The output layer is the embedding matrix (HF tie_word_embeddings: Llama 3.2 1B and 3B).
    tie_word_embeddings: bool = False

    @classmethod
    def from_params(cls, params: dict) -> "ModelArgs":
        """ModelArgs from a `params.json` dict, leaving out keys that are not fields (unchecked:
        llama.config.validate checks the values)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in known})

    @property
    def rope_scaling(self) -> tuple[float, float, float, int] | None:
        """(factor, low_freq_factor, high_freq_factor, original context) with use_scaled_rope, else None."""
        if not self.use_scaled_rope:
            return None
        given = (self.rope_scaling_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                 self.rope_original_context)
        return tuple(meta if value is None else value for value, meta in zip(given, LLAMA3_ROPE_SCALING))

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
        # x * rsqrt(mean(x^2) + eps) in fp32, as one fused op.
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


def scale_frequencies(freqs: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                      original_context: int) -> torch.Tensor:
    """Llama 3.1's RoPE scaling: frequencies whose wavelength is longer than original_context /
    low_freq_factor are divided by factor, those shorter than original_context / high_freq_factor
    kept, and those between blended linearly in original_context / wavelength."""
    turns = original_context * freqs / (2 * math.pi)  # original_context / wavelength
    keep = ((turns - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    return (1 - keep) * freqs / factor + keep * freqs


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None,
                scaling: tuple[float, float, float, int] | None = None) -> torch.Tensor:
    """cos and signed sin of every (position, pair), each value repeated for both members of
    its pair: shape (2, max_seq_len, head_dim), fp32. Row 1 is (-sin, +sin, -sin, ...).
    `scaling` is ModelArgs.rope_scaling (None: plain RoPE)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if scaling is not None:
        freqs = scale_frequencies(freqs, *scaling)
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), freqs)  # (seq, d/2)
    sign = torch.tensor([-1.0, 1.0], device=device)
    cos = angles.cos().repeat_interleave(2, dim=-1)  # (seq, d)
    sin = (angles.sin().unsqueeze(-1) * sign).flatten(1)  # (seq, d/2, 2) -> (seq, d)
    return torch.stack([cos, sin])


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by position angles, as Meta's complex RoPE does:
    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin). cos, sin: (b or 1, s, 1, d)."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (b, s, h, d): (x1, x0, x3, x2, ...)
    return (xf * cos + swapped * sin).type_as(x)


class KVCache(nn.Module):
    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor | int, xk: torch.Tensor, xv: torch.Tensor, kv_len: int):
        """Write xk, xv (b, s, kv_heads, d) at positions pos (b, s), or at pos..pos+s-1 in every
        row when pos is an int; return keys/values up to kv_len."""
        b, s = xk.shape[:2]
        if isinstance(pos, int):
            self.k[:b, :, pos : pos + s] = xk.transpose(1, 2)  # (b, kv_heads, s, d)
            self.v[:b, :, pos : pos + s] = xv.transpose(1, 2)
        else:
            rows = torch.arange(b, device=pos.device).unsqueeze(1)  # (b, 1)
            self.k[rows, :, pos] = xk  # indexed view is (b, s, kv_heads, d)
            self.v[rows, :, pos] = xv
        return self.k[:b, :, :kv_len], self.v[:b, :, :kv_len]  # (b, kv_heads, kv_len, d)


def decode_attention(xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per row, as plain matmuls: what SDPA computes, in a form
    torch.compile fuses into its own kernels. xq (b, 1, heads, d); keys/values (b, kv_heads, T, d);
    mask (b, 1, 1, T). Returns (b, heads, 1, d)."""
    b, _, heads, d = xq.shape
    kv_heads = keys.shape[1]
    q = xq.view(b, kv_heads, heads // kv_heads, d)  # (b, kv_heads, rep, d): a query group per kv head
    scores = torch.matmul(q, keys.transpose(2, 3)).float() / math.sqrt(d)  # (b, kv_heads, rep, T)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.matmul(scores.softmax(-1).type_as(values), values)  # (b, kv_heads, rep, d)
    return out.view(b, heads, 1, d)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # Heads held by this module; llama.parallel.shard_model divides them among ranks.
        self.n_local_heads = args.n_heads
        self.n_local_kv_heads = args.kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, pos, cos, sin, mask, kv_len):
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)  # (b, s, heads, d)
        xk = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)  # (b, s, kv_heads, d)
        xv = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq = apply_rotary_emb(xq, cos, sin)
        xk = apply_rotary_emb(xk, cos, sin)
        keys, values = self.cache.update(pos, xk, xv, kv_len)  # (b, kv_heads, kv_len, d)
        if seqlen == 1 and mask is not None:
            out = decode_attention(xq, keys, values, mask)  # (b, heads, 1, d)
        else:
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
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

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


class Layers(nn.ModuleList):
    """The decoder blocks, run in order (state-dict keys layers.N.*)."""

    def forward(self, h, pos, cos, sin, mask, kv_len):
        for layer in self:
            h = layer(h, pos, cos, sin, mask, kv_len)
        return h


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        if params.vocab_size <= 0:
            raise ValueError(f"vocab_size is {params.vocab_size}; fill it from the tokenizer first")
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = Layers(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        if params.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight  # one tensor; transforms may replace either
        self.max_batch_size = 0
        self.max_seq_len = 0

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """(Re)allocate the KV cache and rotary tables on the device and dtype of the final norm
        (the embeddings may be quantized)."""
        weight = self.norm.weight
        p = self.params
        self.register_buffer(
            "rope", rope_tables(p.head_dim, max_seq_len, p.rope_theta, weight.device, p.rope_scaling),
            persistent=False,
        )
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(max_batch_size, max_seq_len, attn.n_local_kv_heads, p.head_dim,
                                 weight.dtype, weight.device)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0,
                logits_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (float32) for tokens (b, s) placed at start_pos (an int, or a (b,) tensor: one per row).

        With logits_pos (b,), only the logits at that position of each row: (b, 1, vocab).
        """
        bsz, seqlen = tokens.shape
        pos, kv_len, mask = self._span(start_pos, bsz, seqlen, tokens.device)
        assert bsz <= self.max_batch_size and kv_len <= self.max_seq_len, "setup_caches too small"
        if isinstance(pos, int):
            cos, sin = self.rope[:, pos : pos + seqlen, None]  # (2, s, 1, d)
        else:
            cos, sin = self.rope[:, pos].unsqueeze(3)  # (2, b, s, 1, d)
        h = self.layers(self.tok_embeddings(tokens), pos, cos, sin, mask, kv_len)  # (b, s, dim)
        if logits_pos is not None:
            h = h[torch.arange(bsz, device=h.device), logits_pos].unsqueeze(1)  # (b, 1, dim)
        return self.output(self.norm(h)).float()

    def _span(self, start_pos, bsz: int, seqlen: int, device):
        """(positions, cache length attended, mask) for a call.

        Rows at one position get an int position and a causal mask (none for one token). Rows at
        different positions get (b, s) positions and a per-row mask. Under torch.compile every
        call attends over the whole cache, masked, so a decode step has the same shapes at every
        position and compiles once.
        """
        compiling = torch.compiler.is_compiling()
        if isinstance(start_pos, torch.Tensor) and not compiling:
            lo, hi = (int(v) for v in start_pos.aminmax())
            if lo == hi:  # every row at the same position: the cheaper int path
                start_pos = lo
        if isinstance(start_pos, int) and not compiling:
            kv_len = start_pos + seqlen
            if seqlen == 1:
                return start_pos, kv_len, None
            offsets = start_pos + torch.arange(seqlen, device=device)
            return start_pos, kv_len, torch.arange(kv_len, device=device) <= offsets.unsqueeze(-1)  # (s, kv_len)
        offsets = torch.arange(seqlen, device=device)
        if isinstance(start_pos, torch.Tensor):
            pos = start_pos.view(bsz, 1) + offsets  # (b, s)
        else:
            pos = (start_pos + offsets).expand(bsz, seqlen)  # (b, s)
        kv_len = self.max_seq_len if compiling else hi + seqlen
        mask = (torch.arange(kv_len, device=device) <= pos.unsqueeze(-1)).unsqueeze(1)  # (b, 1, s, kv_len)
        return pos, kv_len, mask
