"""llama.kernels (the C++ CPU linear kernels) against float references, and the layers that use them."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llama import cpu_layers, kernels
from llama import quant as Q
from llama.prepare import prepare_for_device
from llama.quant_layers import Int4Linear, Int8Linear

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Shapes with row and column counts that are not multiples of the vector width or row tile.
SHAPES = [(37, 100), (64, 768), (130, 2048), (5, 33)]


def test_kernels_build_here():
    """This machine (and CI) has a compiler; a kernel that silently failed to build would leave
    every other test here on the PyTorch fallback."""
    assert os.environ.get("LLAMA_CPU_KERNELS", "auto") == "auto", "unset LLAMA_CPU_KERNELS to test the kernels"
    assert kernels.available(), "llama.kernels did not build; see the warning logged by llama.kernels"
    assert kernels.loaded_build() == kernels.build_for_this_cpu()


def _check_dense(tokens, n, k, wdtype):
    g = torch.Generator().manual_seed(n * 1000 + k + tokens)
    x = torch.randn(tokens, k, generator=g)
    w = torch.randn(n, k, generator=g)
    if wdtype == torch.int8:
        q, scales = Q.quantize_int8(w)
        wd = Q.dequantize_int8(q, scales).double()
        # One token: int8 weights meet x as q8_0 blocks (as int4 does), where they divide K.
        ref = (q8_0_input(x) if tokens == 1 and k % 32 == 0 else x.double()) @ wd.t()
        got = kernels.linear(x, q, scales)
        exact = x.double() @ wd.t()
        assert (got.double() - exact).norm() < 0.01 * exact.norm()  # q8_0 inputs move it well under 1%
    else:
        wd = w.to(wdtype)
        ref = x.double() @ wd.double().t()
        got = kernels.linear(x, wd)
    assert got.shape == (tokens, n) and got.dtype == torch.float32
    # fp32 sums of up to 2048 products of size ~1: a few ulps of the largest partial sums.
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-5 * k ** 0.5)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 9, 17, 38])  # 17 and more: the prefill tiles
def test_dense_kernel_equals_float_product(tokens, wdtype):
    for n, k in SHAPES:
        _check_dense(tokens, n, k, wdtype)


def q8_0_input(x: torch.Tensor) -> torch.Tensor:
    """x as the int4 kernel (and int8 at one token) sees it: llama.cpp's q8_0 of blocks of 32 (d = max|x| / 127
    at fp16 precision, q = x * (127 / max|x|) in fp32 rounded to nearest, ties to even), in float64."""
    blocks = x.float().reshape(-1, 32)  # (blocks, 32)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    q = torch.round(blocks * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))
    return (q.double() * (amax / 127).half().double()).reshape(x.shape)


def _check_int4(tokens, n, k, group_size):
    g = torch.Generator().manual_seed(n + k + tokens + group_size)
    x = torch.randn(tokens, k, generator=g)
    packed, scales, zeros = Q.quantize_int4(torch.randn(n, k, generator=g), group_size)
    # The kernel multiplies int8 blocks of each row of x (as llama.cpp does).
    seen = q8_0_input(x)
    # Half-precision scales and zeros too, as a bf16 or fp16 model stores them; and no zeros
    # (GGUF's Q4_0: w = (q - 8) * scale).
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for s, z in ((scales.to(dtype), zeros.to(dtype)), (scales.to(dtype), zeros.to(dtype)[:, :0])):
            w = Q.dequantize_int4(packed, s.float(), z.float()).double()
            got = kernels.linear_int4(x, kernels.pack_int4(Q.unpack_int4(packed)), s, z.contiguous(), group_size)
            torch.testing.assert_close(got.double(), seen @ w.t(), rtol=1e-5, atol=2e-5 * k ** 0.5)
            # int8 inputs move the result by well under 1% of its size
            exact = x.double() @ w.t()
            assert (got.double() - exact).norm() < 0.01 * exact.norm()


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("tokens", [1, 3, 4, 6])
def test_int4_kernel_equals_dequantized_product(tokens, group_size):
    # Widths the kernel takes: multiples of its 64-value block and of the group.
    shapes = [(37, 128), (130, 2048), (8, 256)] + ([(64, 768)] if group_size != 128 else [(64, 896)])
    for n, k in shapes:
        assert kernels.int4_group_ok(k, group_size)
        _check_int4(tokens, n, k, group_size)


def test_int4_kernel_refuses_widths_it_cannot_take():
    assert not kernels.int4_group_ok(96, 32)  # not a whole number of 64-value blocks
    assert not kernels.int4_group_ok(768, 96)  # a group that is neither 32 nor whole blocks


@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_int4x8_kernel_equals_dequantized_product(tokens):
    """Q4_0 with rows interleaved by 8: the same numbers as q8_0 inputs times the dequantized weights."""
    for n, k in [(8, 32), (72, 96), (64, 768), (16, 2048)]:
        g = torch.Generator().manual_seed(n + k + tokens)
        x = torch.randn(tokens, k, generator=g)
        packed, scales, _ = Q.quantize_int4(torch.randn(n, k, generator=g), 32)
        scales = scales.half()
        w = Q.dequantize_int4(packed, scales.float(), torch.zeros(n, 0)).double()
        got = kernels.linear_int4x8(x, kernels.pack_int4_rows8(Q.unpack_int4(packed)), kernels.int4x8_scales(scales))
        assert got.shape == (tokens, n)
        torch.testing.assert_close(got.double(), q8_0_input(x) @ w.t(), rtol=1e-5, atol=2e-5 * k ** 0.5)


def test_pack_int4_rows8_layout():
    q = (torch.arange(16 * 64) % 13).to(torch.uint8).view(16, 64)  # (rows, in)
    packed = kernels.pack_int4_rows8(q).flatten()
    # Group 1 (rows 8..15), block 1 (values 32..63), chunk 2: byte 4r + j holds row 8 + r's value
    # 32 + 16 + j (low nibble) and 32 + 16 + 4 + j (high nibble).
    for r, j in ((0, 0), (5, 3), (7, 1)):
        byte = packed[(((1 * 2 + 1) * 4 + 2) * 32) + 4 * r + j].item()
        assert byte == q[8 + r, 48 + j].item() | q[8 + r, 52 + j].item() << 4
    assert kernels.int4x8_scales(torch.arange(16 * 2.0).view(16, 2))[1, 0].tolist() == [16, 18, 20, 22, 24, 26, 28, 30]


def test_pack_int4_layout():
    q = torch.arange(128, dtype=torch.uint8).remainder(16).view(1, 128)  # 0..15, 0..15, ...
    packed = kernels.pack_int4(q)
    assert packed.shape == (1, 64)
    # byte j of a block of 64 holds values j (low nibble) and 32 + j (high nibble) of that block.
    assert packed[0, 3].item() == (3 | (35 % 16) << 4) and packed[0, 32 + 5].item() == (5 | (37 % 16) << 4)


def test_input_dtype_and_leading_shape_are_kept():
    w = torch.randn(24, 64).to(torch.bfloat16)
    x = torch.randn(2, 3, 64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        y = kernels.linear(x.to(dtype), w)
        assert y.shape == (2, 3, 24) and y.dtype == dtype
        torch.testing.assert_close(y.float(), F.linear(x.to(dtype).float(), w.float()), rtol=2e-2, atol=2e-2)


def test_wrong_input_width_is_an_error():
    with pytest.raises(RuntimeError, match="features"):
        kernels.linear(torch.randn(1, 10), torch.randn(4, 12).half())


# ---------------------------------------------------------------------------- layers


def test_layers_use_the_kernels_and_match_the_fallback():
    """After prepare_for_device, int8, int4 and bf16 layers run the kernels and give what the
    PyTorch fallback gives for the same weights (for int4, and its inputs as q8_0 blocks)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 256, generator=g)
    x = torch.randn(1, 2, 256, generator=g)

    int8 = Int8Linear(256, 96)
    int8.weight, int8.scales = Q.quantize_int8(w)
    fast8 = cpu_layers.cpu_layer(int8)
    assert isinstance(fast8, cpu_layers.KernelInt8Linear)
    torch.testing.assert_close(fast8(x), int8(x), rtol=1e-5, atol=1e-5)

    int4 = Int4Linear(256, 72, 64)  # 72 rows: not PyTorch's blocks of 64, so llama.kernels
    int4.weight, int4.scales, int4.zeros = Q.quantize_int4(w[:72], 64)
    fast4 = cpu_layers.cpu_layer(int4)
    assert isinstance(fast4, cpu_layers.KernelInt4Linear)
    torch.testing.assert_close(fast4(x), int4(q8_0_input(x).float()), rtol=1e-5, atol=1e-4)  # x as int8 blocks

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wq = torch.nn.Linear(256, 96, bias=False).to(torch.bfloat16)

    block = Block()
    ref = F.linear(x.bfloat16().float(), block.wq.weight.float())
    prepare_for_device(block)
    assert isinstance(block.wq, cpu_layers.DenseLinear)
    torch.testing.assert_close(block.wq(x.bfloat16()).float(), ref, rtol=1e-2, atol=1e-2)
    assert list(block.state_dict()) == ["wq.weight"]  # Meta's key, unchanged
    long = torch.randn(1, cpu_layers.DenseLinear.KERNEL_MAX_TOKENS + 1, 256).bfloat16()  # prefill tiles or F.linear
    torch.testing.assert_close(block.wq(long).float(), F.linear(long.float(), block.wq.weight.float()),
                               rtol=1e-2, atol=1e-2)


def test_kernels_compile_with_torch_compile():
    """The ops trace under torch.compile (their fake shapes are registered) and give eager's result."""
    w, s = Q.quantize_int8(torch.randn(48, 64))
    x = torch.randn(1, 64)

    def f(x):
        return torch.nn.functional.silu(kernels.linear(x, w, s)) * 2

    torch.testing.assert_close(torch.compile(f)(x), f(x))


def test_avx2_build_equals_reference():
    """The 8-wide build most desktop CPUs get, forced with LLAMA_CPU_KERNELS."""
    build = "avx2"
    if kernels.build_for_this_cpu() is None:
        pytest.skip("this CPU cannot run the avx2 build")
    code = (
        "import torch, test_kernels as t; from llama import kernels;"
        f"assert kernels.loaded_build() == {build!r};"
        "[t._check_dense(m, n, k, d) for m in (1, 5) for n, k in t.SHAPES "
        " for d in (torch.float16, torch.bfloat16, torch.int8)];"
        "[t._check_int4(m, 130, 2048, g) for m in (1, 5) for g in (32, 64)]; print('ok')"
    )
    env = {**os.environ, "LLAMA_CPU_KERNELS": build,
           "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]
