"""How many CPU threads a build computes with: by default, the cores other processes leave idle.

PyTorch's thread pool waits at every operation for its slowest thread, and a thread whose core
another process holds loses whole time slices: on the 2-core test machine, with a busy loop on
one core, stories260K decoded 48 tok/s with 2 threads against 466 with 1 (benchmarks/RESULTS.md).
So a build samples the machine's load for a moment and leaves the busy cores out. OMP_NUM_THREADS
(which torchrun sets) or an explicit `threads` skips the sampling.
"""

import logging
import os
import time

import torch

log = logging.getLogger(__name__)

SAMPLE_S = 0.1  # long enough to see a core kept busy (10 clock ticks at 100 Hz)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _machine_ticks() -> tuple[int, int]:
    """(all ticks, idle ticks) of every CPU together, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(values), values[3] + values[4]


def _own_ticks() -> int:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def busy_elsewhere(sample_s: float = SAMPLE_S) -> float:
    """Cores kept busy by other processes over the next sample_s seconds (0 where unknown)."""
    try:
        (all0, idle0), own0 = _machine_ticks(), _own_ticks()
        time.sleep(sample_s)
        (all1, idle1), own1 = _machine_ticks(), _own_ticks()
    except (OSError, ValueError, IndexError):
        return 0.0
    total = all1 - all0
    if total <= 0:
        return 0.0
    busy = (total - (idle1 - idle0)) - (own1 - own0)
    return max(0.0, busy / total * (os.cpu_count() or 1))


def pick_threads(threads: int | None) -> int:
    """The thread count of a CPU build: `threads` if given, else OMP_NUM_THREADS if set, else the
    usable cores less those other processes keep busy. Sets it for this process."""
    if threads is None and not os.environ.get("OMP_NUM_THREADS"):
        cores = usable_cores()
        others = busy_elsewhere() if cores > 1 else 0.0
        threads = max(1, cores - round(others))
        if threads < cores:
            log.warning("other processes keep %.1f of %d cores busy: computing with %d thread(s) "
                        "(pass --threads to choose)", others, cores, threads)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
