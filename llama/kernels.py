"""C++ kernels for CPU decoding (csrc/): linear layers whose weights are fp32, fp16, bf16, int8 or
int4 (cpu_linear.cpp), and a whole decoder block for one decoding step (cpu_decode.cpp).

PyTorch's own CPU paths for these weights convert or dequantize at a fraction of memory speed
when decoding (one token per row); these kernels read each weight once and convert it in
registers. They are compiled on first use with torch.utils.cpp_extension (a C++ compiler and
ninja are needed; about 30 s once, then cached under ~/.cache/torch_extensions), for AVX512 or
AVX2, whichever the CPU has. Where that fails, or with the environment variable
LLAMA_CPU_KERNELS=0, `available()` is False and the layers use PyTorch ops; LLAMA_CPU_KERNELS=avx2
(or avx512) picks a build instead.
"""

import contextlib
import hashlib
import logging
import os
import sys

import torch

from llama.progress import status

log = logging.getLogger(__name__)

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = ("kernels.h", "cpu_linear.cpp", "cpu_decode.cpp")  # the header first: the .cpp files include it
FLAGS = {  # builds, best first
    "avx512": ["-DLLAMA_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}
INT4_BLOCK = 64  # int4 values per packed block (see pack_int4)
_loaded: str | None = None  # the build in use, "" when none; None until the first available() call


def available() -> bool:
    """True when the kernels are built and loaded (building them the first time)."""
    return bool(loaded_build())


def loaded_build() -> str:
    """The build in use ("avx512" or "avx2"), or "" when the kernels are off."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def build_for_this_cpu() -> str | None:
    """The best build this CPU runs, from PyTorch's capability (which ATEN_CPU_CAPABILITY can lower)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability.lower() if capability.lower() in FLAGS else None


def _load() -> str:
    choice = os.environ.get("LLAMA_CPU_KERNELS", "auto").strip().lower()
    if choice == "0":
        log.warning("LLAMA_CPU_KERNELS=0: CPU kernels off; using PyTorch ops, which decode slower")
        return ""
    build = build_for_this_cpu() if choice == "auto" else choice
    if build not in FLAGS:
        log.info("no CPU kernels for %s; using PyTorch ops", build or torch.backends.cpu.get_cpu_capability())
        return ""
    try:
        from torch.utils.cpp_extension import load

        log.info("loading the %s CPU kernels (the first time compiles them, about 30 s)", build)
        sources, folder = _build_folder(build)
        with status("building the C++ CPU kernels (once, about 30 s)"), _stdout_to_stderr():
            load(name=f"llama_cpu_{build}", sources=sources, build_directory=folder, is_python_module=False,
                 extra_cflags=["-O3", "-fopenmp", *FLAGS[build]], extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no ninja, a failed build: all mean "use PyTorch ops"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("CPU kernels could not be built (%s); using PyTorch ops, which decode slower", first)
        return ""
    _register_fakes()
    return build


def _build_folder(build: str) -> tuple[list[str], str]:
    """(.cpp sources, folder) of a build, named by the sources' content and the flags. The sources
    are copied there, so every install of the same code (a virtual environment, a checkout, another
    folder) shares one build instead of rebuilding whenever the path changes."""
    code = {}
    for name in SOURCES:
        with open(os.path.join(CSRC, name), "rb") as f:
            code[name] = f.read()
    digest = hashlib.sha256(b"".join(code.values()) + " ".join(FLAGS[build]).encode()).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    folder = os.path.join(root, "llama", f"{build}-{digest}")
    os.makedirs(folder, exist_ok=True)
    for name, text in code.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(text)
            os.replace(tmp, path)  # whole, even with several processes starting at once
    return [os.path.join(folder, n) for n in SOURCES if n.endswith(".cpp")], folder


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send what the build prints (the compiler's, PyTorch's) to stderr: stdout carries generated text."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _register_fakes() -> None:
    """Output shapes for torch.compile, which traces the ops without running them."""
    if getattr(_register_fakes, "done", False):
        return

    @torch.library.register_fake("llama_cpu::linear")
    def _(x, weight, scales):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.register_fake("llama_cpu::linear_int4")
    def _(x, weight, scales, zeros, group_size):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.register_fake("llama_cpu::linear_int4x8")
    def _(x, weight, scales):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.register_fake("llama_cpu::decode_layers")
    def _(x, weights, kinds, groups, norms, eps, cache_k, cache_v, pos, cos, sin, n_heads):
        return torch.empty_like(x)

    _register_fakes.done = True


def linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T [* scales (out,)], weight fp32, fp16, bf16 or int8; in x's dtype."""
    return torch.ops.llama_cpu.linear(x, weight, scales)


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x @ W^T with W[n, k] = (q[n, k] - 8) * scales[n, g] + zeros[n, g] (g = k // group_size):
    llama.quantize's int4 with q repacked by `pack_int4`; scales and zeros (out, in / group_size)
    fp32, fp16 or bf16. In x's dtype."""
    return torch.ops.llama_cpu.linear_int4(x, packed, scales, zeros, group_size)


def linear_int4x8(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ W^T with W[n, k] = (q[n, k] - 8) * scales[n, k // 32]: Q4_0, with q repacked by
    `pack_int4_rows8` and scales by `int4x8_scales`. In x's dtype."""
    return torch.ops.llama_cpu.linear_int4x8(x, packed, scales)


def decode_layers(x: torch.Tensor, weights: list[torch.Tensor], kinds: list[int], groups: list[int],
                  norms: list[torch.Tensor], eps: list[float], cache_k: list[torch.Tensor],
                  cache_v: list[torch.Tensor], pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  n_heads: int) -> torch.Tensor:
    """Consecutive decoder blocks for x (B, S, dim), S new tokens a row at positions pos (B, S);
    per block 7 linear layers' (weight, scales, zeros), kinds and groups, 2 norms and eps, and one
    cache_k and cache_v, which get the new keys and values; see csrc/cpu_decode.cpp."""
    return torch.ops.llama_cpu.decode_layers(x, weights, kinds, groups, norms, eps, cache_k, cache_v, pos, cos,
                                             sin, n_heads)


def decode_step(tokens: torch.Tensor, embedding: list[torch.Tensor], embedding_group: int,
                weights: list[torch.Tensor], kinds: list[int], groups: list[int], norms: list[torch.Tensor],
                eps: list[float], cache_k: list[torch.Tensor], cache_v: list[torch.Tensor], pos: torch.Tensor,
                rope: torch.Tensor, n_heads: int, norm: torch.Tensor, norm_eps: float, output: list[torch.Tensor],
                output_kind: int, output_group: int, dtype: torch.dtype,
                logits_rows: torch.Tensor) -> torch.Tensor:
    """A whole forward, tokens (B, S) at pos (B, S) -> logits (n, vocab) fp32 of the n tokens
    logits_rows (indices into the B * S tokens): the embedding table's (weight, scales, zeros) (int4
    pairs when embedding_group > 0), the blocks as for decode_layers, the rope tables (2, T,
    head_dim), the final norm and the output layer's (weight, scales, zeros); dtype is the residual
    stream's. See csrc/cpu_decode.cpp."""
    return torch.ops.llama_cpu.decode_step(tokens, embedding, embedding_group, weights, kinds, groups, norms, eps,
                                           cache_k, cache_v, pos, rope, n_heads, norm, norm_eps, output,
                                           output_kind, output_group, dtype, logits_rows)


def int4_group_ok(in_features: int, group_size: int) -> bool:
    return in_features % INT4_BLOCK == 0 and in_features % group_size == 0 and (
        group_size == 32 or group_size % INT4_BLOCK == 0)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15, uint8 (out, in) -> uint8 (out, in / 2): in each block of 64 values, byte j
    holds value j (low nibble) and value 32 + j (high nibble), so 32 bytes widen to two vectors."""
    out_f, in_f = q.shape
    blocks = q.view(out_f, in_f // INT4_BLOCK, 2, INT4_BLOCK // 2)  # (out, blocks, halves, 32)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(out_f, in_f // 2)  # (out, in/2)


def pack_int4_rows8(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15, uint8 (out, in), out % 8 == 0 and in % 32 == 0 -> uint8 (out, in / 2) with rows
    interleaved by 8: for rows 8g..8g+7 and each block of 32 values, 4 chunks of 32 bytes, chunk c
    holding at bytes 4r..4r+3 row r's values 8c..8c+3 (low nibbles) and 8c+4..8c+7 (high nibbles)."""
    out_f, in_f = q.shape
    v = q.view(out_f // 8, 8, in_f // 32, 4, 2, 4)  # (groups, row, block, chunk, half, value)
    v = v.permute(0, 2, 3, 1, 5, 4)  # (groups, block, chunk, row, value, half)
    return (v[..., 0] | (v[..., 1] << 4)).reshape(out_f, in_f // 2)  # (out, in/2)


def int4x8_scales(scales: torch.Tensor) -> torch.Tensor:
    """(out, in / 32) -> (out / 8, in / 32, 8): each block's scales of 8 interleaved rows together."""
    out_f, blocks = scales.shape
    return scales.view(out_f // 8, 8, blocks).transpose(1, 2).contiguous()  # (out/8, blocks, 8)
