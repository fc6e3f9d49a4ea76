"""The transformer alone: rotary embeddings, the FFN rule, and the KV cache against a full forward."""

import pytest
import torch

from conftest import FP32_ORDER
from llama.model import ModelArgs, Transformer, apply_rotary_emb, rope_tables


def complex_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta's complex-number rotary embedding, as an independent reference."""
    b, s, h, d = x.shape
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    freqs_cis = torch.polar(torch.ones(s, d // 2), torch.outer(torch.arange(s).float(), freqs))
    xc = torch.view_as_complex(x.float().reshape(b, s, h, d // 2, 2))  # (b, s, h, d/2)
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)  # (b, s, h, d)


def test_real_rope_equals_complex_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4, 16)
    cos, sin = rope_tables(16, 32, 10000.0)[:, :9, None]  # (9, 1, 16) each
    out = apply_rotary_emb(x, cos, sin)
    torch.testing.assert_close(out, complex_rope(x, 10000.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "dim, multiple_of, mult, expected",
    [(4096, 256, None, 11008), (5120, 256, None, 13824), (8192, 4096, 1.3, 28672), (64, 4, None, 172)],
)
def test_ffn_hidden_dim_follows_meta_rule(dim, multiple_of, mult, expected):
    # Llama-2 7B, 13B and 70B, and stories260K (hidden 172 in its llama2.c header).
    args = ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=mult)
    assert args.ffn_hidden_dim == expected


def test_unknown_params_key_is_named_and_left_out(tmp_path, caplog):
    from llama.checkpoint import read_params

    (tmp_path / "params.json").write_text('{"dim": 64, "n_heads": 8, "some_future_key": 8.0}')
    assert read_params(str(tmp_path)).dim == 64
    assert "ignored unknown key(s) some_future_key" in caplog.text


FP32 = FP32_ORDER  # the noise floor of summation order (conftest)


@pytest.fixture(scope="module")
def model_and_tokens(stories):
    torch.manual_seed(0)
    tokens = torch.randint(0, stories.model.vocab_size, (2, 48))
    with torch.inference_mode():
        full = stories.model(tokens, 0)  # (2, 48, vocab)
    return stories.model, tokens, full


def test_decode_attention_equals_sdpa():
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from llama.model import decode_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 8, 16), torch.randn(3, 4, 20, 16), torch.randn(3, 4, 20, 16)
    mask = torch.arange(20) <= torch.tensor([4, 19, 0]).view(3, 1, 1, 1)  # (3, 1, 1, 20)
    ref = sdpa(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=True)  # (3, 8, 1, 16)
    torch.testing.assert_close(decode_attention(q, k, v, mask), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunks", [[1] * 48, [7, 1, 1, 13, 26], [30, 18], [1, 40, 3, 4]])
def test_kv_cache_decoding_equals_full_forward(model_and_tokens, chunks):
    model, tokens, full = model_and_tokens
    pos, outs = 0, []
    with torch.inference_mode():
        for n in chunks:
            outs.append(model(tokens[:, pos : pos + n], pos))
            pos += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **FP32)


def test_per_row_start_positions_equal_full_forward(model_and_tokens):
    """Rows at different positions in one call, as in a ragged batch after prefill."""
    model, tokens, full = model_and_tokens
    with torch.inference_mode():
        model(tokens[:, :25], 0)  # row 0 will use only its first 20 cached positions
        step = torch.stack([tokens[0, 20:21], tokens[1, 25:26]])  # (2, 1)
        out = model(step, torch.tensor([20, 25]))
    torch.testing.assert_close(out[0, 0], full[0, 20], **FP32)
    torch.testing.assert_close(out[1, 0], full[1, 25], **FP32)


def test_gqa_matches_repeated_kv_heads():
    """A GQA model equals the same model with each KV head repeated (full multi-head)."""
    torch.manual_seed(0)
    gqa_args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=8)
    mha_args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=50, multiple_of=8)
    gqa, mha = Transformer(gqa_args), Transformer(mha_args)
    sd = gqa.state_dict()
    head = gqa_args.head_dim
    for key, t in list(sd.items()):
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            # (kv_heads * d, dim) -> (kv_heads, 1, d, dim) -> (n_heads * d, dim)
            t = t.view(2, 1, head, 32).expand(2, 2, head, 32).reshape(4 * head, 32)
        sd[key] = t
    mha.load_state_dict(sd)
    for m in (gqa, mha):
        m.setup_caches(1, 16)
    x = torch.randint(0, 50, (1, 10))
    with torch.inference_mode():
        torch.testing.assert_close(gqa(x), mha(x), **FP32)


def test_compiled_whole_cache_path_equals_default(model_and_tokens, monkeypatch):
    """The path torch.compile traces (every step attends over the whole cache, masked) gives the
    same logits, step by step."""
    model, tokens, full = model_and_tokens
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.inference_mode():
        out = [model(tokens[:, :5], 0)]
        for i in range(5, 12):
            out.append(model(tokens[:, i : i + 1], torch.tensor([i, i])))
    torch.testing.assert_close(torch.cat(out, dim=1), full[:, :12], **FP32)
