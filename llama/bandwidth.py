"""A one-line warning when CPU decoding reads its weights far slower than this machine's memory.

A decoding step of a model larger than the caches reads every weight once. Even the int4 steps,
which compute the most a byte, read faster than one core alone reads memory (2-core AVX2 machine,
110M shape: f32 17.5 GB/s, q4_0 9.3, one core 12-15). So a step that reads at less than half of
one core's speed is held back by something other than this package: another process on a core
that one of the threads waits for (110M f32 with a busy loop on one of 2 cores: 2 threads 4.7-5.8
GB/s, 1 thread 9.0-11.4, one core 11.5), or swapping. `StepClock` times the first steps of a
decode and, once a process, compares them with one core's read speed, measured then (about 20 ms).
"""

import logging
import statistics
import threading
import time

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

MIN_BYTES = 64 << 20  # smaller models spend their steps on per-token work, not on reading weights
WARM_UP, STEPS = 4, 16  # steps left out, then steps timed
FAR_BELOW = 0.5  # warn below this share of one core's read speed
PROBE_FLOATS = 16 << 20  # 64 MB read to measure a core, more than the caches hold

_lock = threading.Lock()
_checked = False


def step_bytes(model: nn.Module) -> int:
    """Bytes of weights a decoding step reads: every block, the final norm and the output layer
    (the embedding gives one row a token; the KV cache is not weights)."""
    tensors = {t.data_ptr(): t for mod in [*model.layers, model.norm, model.output]
               for name, t in [*mod.named_parameters(), *mod.named_buffers()] if "cache" not in name}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def one_core_read_speed() -> float:
    """Bytes a second one thread reads from memory (the max of 64 MB, best of 3; numpy's is one thread)."""
    probe = np.ones(PROBE_FLOATS, dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        probe.max()
        best = min(best, time.perf_counter() - start)
    return probe.nbytes / best


class StepClock:
    """Times decoding steps on the CPU; after WARM_UP + STEPS of them, warns (once a process) when
    the weights were read at less than FAR_BELOW of one core's read speed."""

    def __init__(self, model: nn.Module):
        self.nbytes = step_bytes(model) if not _checked and model.norm.weight.device.type == "cpu" else 0
        self.times: list[float] = []
        self.started = 0.0

    @property
    def active(self) -> bool:
        return self.nbytes >= MIN_BYTES and len(self.times) < WARM_UP + STEPS and not _checked

    def start(self) -> None:
        if self.active:
            self.started = time.perf_counter()

    def stop(self) -> None:
        if not self.active or not self.started:
            return
        self.times.append(time.perf_counter() - self.started)
        if len(self.times) == WARM_UP + STEPS:
            self._check(statistics.median(self.times[WARM_UP:]))

    def _check(self, step_s: float) -> None:
        global _checked
        with _lock:
            if _checked:
                return
            _checked = True
            achieved, one_core = self.nbytes / step_s, one_core_read_speed()
        log.info("decoding read the weights at %.1f GB/s; one core reads %.1f", achieved / 1e9, one_core / 1e9)
        if achieved < FAR_BELOW * one_core:
            log.warning("decoding reads the weights at %.1f GB/s, less than half of what one core here reads (%.1f "
                        "GB/s): another process may hold a core that one of the %d threads waits for (pass "
                        "--threads to use fewer)", achieved / 1e9, one_core / 1e9, torch.get_num_threads())
