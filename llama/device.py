"""Turn the device and dtype arguments ("auto" or a name) into torch objects."""

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}

# CPU "auto", measured on a 2-core AVX512-BF16/AMX Xeon (benchmarks/RESULTS.md): models below
# CPU_HALF_MIN_PARAMS are bound by per-op overhead, not memory bandwidth, so they keep fp32
# (exact, and no slower). Bigger models use bf16 where the CPU has native bf16: half the bytes
# of fp32 to read per decoded token (through llama.kernels), and prefill on the CPU's bf16
# matrix units. Without native bf16 they stay fp32.
CPU_HALF_MIN_PARAMS = 50_000_000


def cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """"auto" picks the local rank's CUDA GPU, then MPS, then CPU."""
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; pass --device auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} asked for CUDA but torch sees no CUDA GPU; pass --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                "pass --device cuda:0 or auto"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device} asked for MPS but it is not available; pass --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}; pass --device auto, cpu, cuda or mps")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, n_params: int = 0) -> torch.dtype:
    """"auto": bf16 on GPUs that support it, else fp16; on CPU by model size (see above)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).strip().lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        if n_params < CPU_HALF_MIN_PARAMS:
            return torch.float32
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; pass --dtype auto, float32, float16 or bfloat16")
    return DTYPES[name]
