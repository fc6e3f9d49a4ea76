"""Pieces every format shares: safe torch loading, rank slicing, head-split checks, file sniffing."""

import contextlib
import errno
import os
import resource
import shutil
import struct
import tempfile

import torch

from llama.model import ModelArgs
from llama.parallel import check_split, piece_of, shard_dim

ZIP_MAGIC = b"PK\x03\x04"


def torch_load(path: str) -> dict:
    """torch.load with no pickle code allowed, memory-mapped when the file is a zip archive."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # old non-zip files cannot be mapped; anything else is corrupt
            raise _unreadable(path, e) from None
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise _unreadable(path, e) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _unreadable(path, e) from None


def _unreadable(path: str, e: Exception) -> ValueError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
    return ValueError(f"cannot read {path!r}: truncated, corrupt or not a weights-only torch file ({first})")


def check_parallel_split(args: ModelArgs, world_size: int) -> None:
    """Raise ValueError when the heads cannot be split over world_size ranks."""
    check_split(args.n_heads, args.kv_heads, world_size)


def shard(key: str, tensor: torch.Tensor, rank: int, world_size: int, n_kv_heads: int) -> torch.Tensor:
    """Rank's slice of a full tensor (a narrow view, no copy); replicated keys come back whole,
    and ranks beyond the kv heads get their kv head's slice (see parallel.piece_of)."""
    dim = shard_dim(key)
    if dim is None or world_size == 1:
        return tensor
    piece, pieces = piece_of(key, rank, world_size, n_kv_heads)
    size = tensor.shape[dim]
    if size % pieces:
        raise ValueError(f"{key} has size {size} on dim {dim}, not divisible by {pieces} ranks")
    part = size // pieces
    return tensor.narrow(dim, piece * part, part)


def file_kind(path: str) -> str:
    """"zip" (torch.save), "safetensors", or "raw" from a file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return "safetensors"
    return "raw"


def check_new_folder(dst: str, flag: str = "DST") -> None:
    """ValueError unless dst is free to write: missing, or an empty folder."""
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ValueError(f"output {dst!r} already exists and is not an empty folder; choose a new {flag}")


@contextlib.contextmanager
def new_folder(dst: str, flag: str = "DST", force: bool = False):
    """A temporary folder beside dst to write a checkpoint into, renamed to dst when the block ends
    without an error (removed when it fails), so dst is never left partly written. An existing
    dst must be an empty folder, unless `force`: then the old folder is replaced only once the
    new one is complete."""
    if not force:
        check_new_folder(dst, flag)
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(dst))}.", suffix=".partial", dir=parent)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
        old = f"{tmp}.old"
        if os.path.isdir(dst):
            os.rename(dst, old)  # empty, or replaced with force
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        disk = disk_error(e, dst)
        if disk is None:
            raise
        raise disk from None


def disk_error(e: BaseException, dst: str) -> OSError | None:
    """The one-line error for a write that failed for want of disk (or of a file-size allowance),
    whether the OS said so (ENOSPC, EFBIG) or a writer hid it in its own message; else None."""
    if not isinstance(e, Exception) or isinstance(e, (ValueError, TypeError, KeyError)):
        return None
    errno_, text = getattr(e, "errno", None), str(e).lower()
    parent = os.path.dirname(os.path.abspath(dst))
    free = shutil.disk_usage(parent).free
    if errno_ in (errno.ENOSPC, errno.EDQUOT) or "no space left" in text or free < 2**20:
        return _os_error(errno.ENOSPC, f"no space left on the disk of {dst!r} ({free / 1e9:.2f} GB free); "
                         "free some space or write elsewhere; nothing was written")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if errno_ == errno.EFBIG or "file too large" in text or limit != resource.RLIM_INFINITY:
        return _os_error(errno.EFBIG, f"file too large for {dst!r} (a file-size limit, ulimit -f, or the "
                         "file system's); raise the limit or write elsewhere; nothing was written")
    return None


def _os_error(code: int, message: str) -> OSError:
    e = OSError(message)  # str(e) is the message alone, without "[Errno N]"
    e.errno = code
    return e
