"""The last steps of a build: device-specific layers, and torch.compile."""

import torch
from torch import nn

from llama.cpu_decode import use_fused_decode
from llama.cpu_layers import use_cpu_kernels
from llama.progress import note


def prepare_for_device(model: nn.Module) -> nn.Module:
    """Switch layers to the fastest kernels their device has (in place, after loading): on CPU,
    llama.kernels for fp32, fp16, bf16 and int8 weights where they build, and for int4 the faster of
    PyTorch's kernel and llama.kernels that the layer's shape allows, and decoding steps of one C++
    op (llama.cpu_decode). Elsewhere PyTorch's ops stay."""
    return use_fused_decode(use_cpu_kernels(model))


def compile_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Compile the model's forward in place: CUDA graphs on CUDA, a C++ wrapper on CPU."""
    # Guards on the module's attributes cost ~0.1 ms a step; nothing changes them after build.
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    if device.type == "cpu":
        # A C++ wrapper instead of Python around the kernels: stories260K decode step
        # 0.62 -> 0.47 ms on the 2-core test machine.
        options["cpp_wrapper"] = True
    model.compile(mode="reduce-overhead" if device.type == "cuda" else None, options=options)
    note("torch.compile: the first prompt and the first decode steps compile the model (10-30 s)")
    return model
