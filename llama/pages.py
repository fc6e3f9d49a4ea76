"""Keeping resident memory down while weights stream through: dropping pages, trimming the heap.

Reading every tensor of a memory-mapped checkpoint leaves all of it resident, and quantizing
layer after layer leaves the holes of its temporaries in the heap; these two calls undo that
(Linux, glibc; no-ops elsewhere).
"""

import ctypes
import mmap

import torch


def release_pages(t: torch.Tensor, min_bytes: int = 1 << 20) -> None:
    """Drop a memory-mapped tensor's pages from this process (they stay in the page cache).

    Without this, reading every tensor of a memory-mapped checkpoint leaves all of it resident.
    Only for CPU tensors inside a read-only-used file mapping (Linux), of at least min_bytes
    (each call reads /proc/self/maps); a no-op elsewhere.
    """
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() * t.element_size() < max(min_bytes, 1):
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    if not _in_file_mapping(start, end):
        return  # anonymous memory: MADV_DONTNEED would zero it
    page = mmap.PAGESIZE
    lo, hi = (start + page - 1) // page * page, end // page * page  # whole pages only
    if hi > lo:
        _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # 4: MADV_DONTNEED


def _in_file_mapping(start: int, end: int) -> bool:
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                if lo <= start and end <= hi:
                    # A file mapping: dropped pages are read back from the file if touched again.
                    return len(fields) >= 6 and fields[5].startswith("/")
    except OSError:
        pass
    return False


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc), so quantizing layer after layer does not
    leave the holes of its temporaries resident. A no-op where malloc_trim does not exist."""
    try:
        _libc().malloc_trim(0)
    except (AttributeError, OSError):
        pass


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _LIBC
