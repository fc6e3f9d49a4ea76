"""llama.cpu_decode: a decoding step of one C++ op for all blocks (or one a block), against a float64
model and the blocks' own PyTorch forward, on odd shapes, every weight kind, GQA and rows at
different positions."""

import pytest
import torch

from conftest import random_llama_weights
from llama import cpu_decode, kernels
from llama.cpu_decode import FusedBlock, FusedLayers, FusedTransformer
from llama.model import ModelArgs, Transformer
from llama.prepare import prepare_for_device
from llama.quant import quantize_state_dict
from llama.quant_layers import quantize_model

# head_dim 24 and hidden 200: neither is a multiple of the vector width (8 or 16) nor of the row
# tile; 6 heads share 2 kv heads. int4 needs whole blocks of 64: the second shape.
ODD = ModelArgs(dim=144, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=301, hidden_dim=200)
INT4 = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=301, hidden_dim=192)
STEPS = 12


def build(args: ModelArgs, dtype=torch.float32, quantize: str | None = None, prepared: bool = True) -> Transformer:
    """A model of random weights (the same for every call), its caches for 3 rows of 64 positions."""
    sd = random_llama_weights({k: v.shape for k, v in Transformer(args).state_dict().items()}, seed=3)
    model = Transformer(args)
    if quantize:  # fp32 scales; the norms and embeddings stay fp32
        quantize_model(model, quantize, 32)
        sd = quantize_state_dict(sd, quantize, 32)
    model.load_state_dict(sd)
    if not quantize:
        model.to(dtype)
    if prepared:
        prepare_for_device(model)
    model.setup_caches(3, 64)
    return model.eval()


def steps(model: Transformer, tokens: torch.Tensor, prompt_lens: list[int]) -> torch.Tensor:
    """Logits of STEPS decoding steps after prompts of different lengths (rows at different positions)."""
    out = []
    with torch.inference_mode():
        model(tokens[:, : max(prompt_lens)], 0)  # each row then steps on from its own length
        pos = torch.tensor(prompt_lens)
        for i in range(STEPS):
            cur = tokens[torch.arange(len(prompt_lens)), pos + i][:, None]  # (b, 1)
            out.append(model(cur, pos + i)[:, 0])
    return torch.stack(out, 1)  # (b, steps, vocab)


def tokens_for(args: ModelArgs) -> torch.Tensor:
    return torch.randint(0, args.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))


def unfused(monkeypatch):
    monkeypatch.setattr(cpu_decode, "MAX_ROWS", 0)  # every step and prefill through PyTorch's forward
    monkeypatch.setattr(cpu_decode, "PREFILL_MAX_TOKENS", 0)


pytestmark = pytest.mark.skipif(not kernels.available(), reason="the C++ kernels are tested in test_kernels")


def test_blocks_are_fused_and_keep_meta_keys():
    model = build(ODD)
    assert isinstance(model.layers, FusedLayers)
    assert all(isinstance(layer, FusedBlock) for layer in model.layers)
    assert list(model.state_dict()) == list(Transformer(ODD).state_dict())


def test_whole_step_one_op_for_all_blocks_and_one_op_a_block_agree(monkeypatch):
    """A step (and the prefill before them) is one op (embedding to logits); where the embedding, norm
    or output is not of a kind the op knows, all blocks are one op; where the blocks are not all
    FusedBlocks, each is one."""
    tokens = tokens_for(ODD)
    calls = []
    for name in ("decode_step", "decode_layers"):
        op = getattr(cpu_decode.kernels, name)
        monkeypatch.setattr(cpu_decode.kernels, name, lambda *a, op=op, name=name: calls.append(name) or op(*a))
    model = build(ODD)
    assert type(model) is FusedTransformer
    whole = steps(model, tokens, [4, 7, 5])
    assert calls == ["decode_step"] * (1 + STEPS)
    calls.clear()
    model = build(ODD)
    model._step_fusable = False  # as for an embedding of another kind: the blocks in one op
    stack = steps(model, tokens, [4, 7, 5])
    torch.testing.assert_close(whole, stack, rtol=1e-5, atol=1e-5)  # the final norm: C++ against PyTorch
    assert calls == ["decode_layers"] * (1 + STEPS)
    calls.clear()
    model = build(ODD)
    model._step_fusable = False
    model.layers._stack = cpu_decode.Stack([])  # as for a list not all FusedBlocks: each block's own op
    torch.testing.assert_close(steps(model, tokens, [4, 7, 5]), stack, rtol=0, atol=0)
    assert calls == ["decode_layers"] * ((1 + STEPS) * ODD.n_layers)
    calls.clear()
    model = build(ODD)
    model.layers[1] = build(ODD, prepared=False).layers[1]  # a plain TransformerBlock
    torch.testing.assert_close(steps(model, tokens, [4, 7, 5]), whole, rtol=1e-5, atol=2e-5)
    assert calls == ["decode_layers"] * (1 + STEPS)  # block 0's op; block 1 through PyTorch


@pytest.mark.parametrize("prompt_lens", [[5, 5, 5], [3, 9, 6]])
def test_fp32_steps_equal_float64_model(prompt_lens):
    """Same position in every row (an int position) and different ones (a tensor)."""
    tokens = tokens_for(ODD)
    got = steps(build(ODD), tokens, prompt_lens)
    ref = steps(build(ODD, torch.float64, prepared=False), tokens, prompt_lens)
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=2e-5)  # logits come back float32


def test_kv_cache_holds_what_the_pytorch_block_writes(monkeypatch):
    tokens = tokens_for(ODD)
    fused, plain = build(ODD), build(ODD, prepared=False)
    steps(fused, tokens, [4, 7, 5])
    steps(plain, tokens, [4, 7, 5])
    for a, b in zip(fused.layers, plain.layers):
        torch.testing.assert_close(a.attention.cache.k, b.attention.cache.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.attention.cache.v, b.attention.cache.v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models_no_less_accurate_than_pytorch(dtype, monkeypatch):
    """fp16/bf16 weights, cache and residual stream: the op computes in fp32 between them, so it is at
    least as close to the float64 model of the same weights as PyTorch's half-precision ops."""
    tokens = tokens_for(ODD)
    model = build(ODD, dtype)
    ref = steps(build(ODD, dtype, prepared=False).double(), tokens, [4, 8, 6])
    fused = (steps(model, tokens, [4, 8, 6]).double() - ref).abs().max()
    unfused(monkeypatch)
    plain = (steps(build(ODD, dtype), tokens, [4, 8, 6]).double() - ref).abs().max()
    assert fused <= plain * 1.1 + 1e-3, (fused, plain)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_steps_equal_the_layers_own_forward(quantize, monkeypatch):
    """int8 (per-row scales) and int4 (PyTorch's int4pack kernel) layers: the op calls the same
    kernels the layers do; fp16 scales and no zeros (GGUF's Q4_0) go through llama.kernels' int4."""
    args = INT4 if quantize == "int4" else ODD
    tokens = tokens_for(args)
    got = steps(build(args, quantize=quantize), tokens, [4, 8, 6])
    unfused(monkeypatch)
    want = steps(build(args, quantize=quantize), tokens, [4, 8, 6])
    if quantize == "int8":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    else:  # PyTorch's int4 kernel rounds its input to bf16: the op's silu (within 1.2e-7 of the
        # float64 one, not bit for bit PyTorch's) moves some inputs to the next bf16 value.
        assert ((got - want).norm() / want.norm()).item() < 1e-3


def test_gguf_q4_0_layers(monkeypatch):
    """llama.kernels' int4 with fp16 scales and no zeros (rows interleaved by 8), as a Q4_0 GGUF loads."""
    from llama.quant_layers import Int4Linear

    model = build(INT4, quantize="int4", prepared=False)
    for child in model.modules():
        if isinstance(child, Int4Linear):
            child.scales = child.scales.half()
            child.zeros = child.zeros[:, :0].half()
    prepare_for_device(model)
    assert type(model.layers[0].attention.wq).__name__ == "KernelInt4x8Linear"  # rows interleaved by 8
    tokens = tokens_for(INT4)
    got = steps(model, tokens, [4, 8, 6])
    unfused(monkeypatch)
    torch.testing.assert_close(got, steps(model, tokens, [4, 8, 6]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("zeros", [False, True])
def test_whole_step_with_int4_embeddings(zeros, monkeypatch):
    """GGUF's Q4_0 (fp16 scales, no zeros) and Q4_1 embedding tables: the op's lookup equals the module's."""
    from llama.quant import quantize_int4
    from llama.quant_layers import Int4Embedding

    model = build(INT4, quantize="int4", prepared=False)
    packed, scales, zs = quantize_int4(model.tok_embeddings.weight.detach(), 32)
    table = Int4Embedding(INT4.vocab_size, INT4.dim, 32, torch.float32 if zeros else torch.float16, zeros=zeros)
    table.weight.copy_(packed)
    table.scales.copy_(scales)
    table.zeros.copy_(zs if zeros else zs[:, :0])
    model.tok_embeddings = table
    prepare_for_device(model)
    assert type(model) is FusedTransformer and model._fused_step()
    tokens = tokens_for(INT4)
    got = steps(model, tokens, [4, 8, 6])
    unfused(monkeypatch)
    want = steps(model, tokens, [4, 8, 6])
    assert ((got - want).norm() / want.norm()).item() < 1e-3  # int4 layers: see the test above


def test_layers_with_hooks_use_the_pytorch_forward():
    """Model parallel's collectives are forward hooks on wo and w2: a fused step would skip them."""
    tokens = tokens_for(ODD)
    model, plain = build(ODD), build(ODD, prepared=False)
    for m in (model, plain):
        m.layers[1].attention.wo.register_forward_hook(lambda mod, inp, out: out + 1.0)
    torch.testing.assert_close(steps(model, tokens, [5, 5, 5]), steps(plain, tokens, [5, 5, 5]),
                               rtol=1e-5, atol=2e-5)


def prefills(model: Transformer, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Logits of a prefill of 9 tokens a row (all of them), then a second one of 5 tokens a row at
    different positions (the last of rows 0 and 1 and the first of row 2): a chunked prompt that
    attends to what the first wrote, and rows going back over positions they hold."""
    with torch.inference_mode():
        first = model(tokens[:, :9], 0)  # (3, 9, vocab)
        start = torch.tensor([9, 4, 7])
        chunk = tokens[:, 20:25]
        second = model(chunk, start, logits_pos=torch.tensor([4, 4, 0]))  # (3, 1, vocab)
    return [first, second]


def test_prefill_is_one_op_equal_to_float64(monkeypatch):
    """Prefills of up to PREFILL_MAX_TOKENS tokens run whole as one op, causal within the prefill,
    at each row's positions, with the logits asked for; longer ones go through PyTorch's forward."""
    tokens = tokens_for(ODD)
    calls = []
    op = cpu_decode.kernels.decode_step
    monkeypatch.setattr(cpu_decode.kernels, "decode_step", lambda *a: calls.append(a[0].shape) or op(*a))
    got = prefills(build(ODD), tokens)
    assert calls == [(3, 9), (3, 5)]
    want = prefills(build(ODD, torch.float64, prepared=False), tokens)
    assert [g.shape for g in got] == [w.shape for w in want] == [(3, 9, ODD.vocab_size), (3, 1, ODD.vocab_size)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=2e-5)
    calls.clear()
    monkeypatch.setattr(cpu_decode, "PREFILL_MAX_TOKENS", 26)  # the first prefill has 27 tokens
    for g, w in zip(prefills(build(ODD), tokens), want):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=2e-5)
    assert calls == [(3, 5)]


def test_prefill_through_the_blocks_op_and_gguf_q4_0(monkeypatch):
    """All blocks in one op (decode_layers) for a prefill, and int4x8 (Q4_0) layers, against the
    modules' own PyTorch forward."""
    from llama.quant_layers import Int4Linear

    tokens = tokens_for(ODD)
    calls = []
    op = cpu_decode.kernels.decode_layers
    monkeypatch.setattr(cpu_decode.kernels, "decode_layers", lambda *a: calls.append(a[0].shape[:2]) or op(*a))
    model = build(ODD)
    model._step_fusable = False
    got = prefills(model, tokens)
    assert calls == [(3, 9), (3, 5)]
    q4 = build(INT4, quantize="int4", prepared=False)
    for child in q4.modules():
        if isinstance(child, Int4Linear):
            child.scales, child.zeros = child.scales.half(), child.zeros[:, :0].half()
    prepare_for_device(q4)
    q4_got = prefills(q4, tokens_for(INT4))
    unfused(monkeypatch)
    for g, w in zip(got, prefills(build(ODD), tokens)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5)
    for g, w in zip(q4_got, prefills(q4, tokens_for(INT4))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)
