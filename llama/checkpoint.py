"""Checkpoint files -> (ModelArgs, state dict in Meta's key names) for one model-parallel rank.

Readers are plain functions over files; none of them builds a module. Tensors come back
memory-mapped where the format allows it, so loading never holds two copies of the weights.
"""

import json
import logging
import os
import re

import torch

from llama.model import ModelArgs
from llama.parallel import shard_dim

log = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
# Keys some Meta checkpoints carry that the model recomputes.
IGNORED_KEYS = ("rope.freqs",)


def load_checkpoint(path: str, rank: int = 0, world_size: int = 1) -> tuple[ModelArgs, dict]:
    """Read any supported checkpoint and return (ModelArgs, state dict) for rank `rank` of `world_size`.

    The state dict uses Meta's key names and holds this rank's model-parallel shard.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; check --ckpt_dir")
    if os.path.isdir(path):
        files = sorted(os.listdir(path))
        if not files:
            raise FileNotFoundError(f"checkpoint directory {path!r} is empty; check --ckpt_dir")
        if "params.json" in files or any(_SHARD_RE.match(f) for f in files):
            return load_meta(path, rank, world_size)
        raise ValueError(
            f"{path!r} holds no known checkpoint layout (found: {', '.join(files[:8])}); expected "
            "Meta's params.json + consolidated.NN.pth; check --ckpt_dir"
        )
    raise ValueError(f"{path!r} is a file, not a checkpoint directory; check --ckpt_dir")


def torch_load(path: str) -> dict:
    """torch.load with no pickle code allowed and the file memory-mapped."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"cannot load {path!r} as a weights-only torch checkpoint: {str(e).splitlines()[0]}") from None


def read_params(ckpt_dir: str) -> ModelArgs:
    params_path = os.path.join(ckpt_dir, "params.json")
    if not os.path.isfile(params_path):
        raise FileNotFoundError(f"{ckpt_dir!r} has no params.json; a Meta checkpoint directory needs one")
    try:
        with open(params_path) as f:
            params = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{params_path} is not valid JSON: {e}") from None
    return ModelArgs.from_params(params, source=params_path)


def meta_shards(ckpt_dir: str) -> list[str]:
    """Paths of consolidated.NN.pth, checked to be numbered 00..S-1."""
    found = sorted(
        (int(m.group(1)), f) for f in os.listdir(ckpt_dir) if (m := _SHARD_RE.match(f))
    )
    if not found:
        raise FileNotFoundError(f"{ckpt_dir!r} has params.json but no consolidated.NN.pth files")
    numbers = [n for n, _ in found]
    if numbers != list(range(len(found))):
        raise ValueError(f"{ckpt_dir!r} has shards {numbers}; expected consolidated.00 to {len(found) - 1:02d}")
    return [os.path.join(ckpt_dir, f) for _, f in found]


def load_meta(ckpt_dir: str, rank: int = 0, world_size: int = 1) -> tuple[ModelArgs, dict]:
    """Meta's layout with S shards, merged or split to this rank of world_size."""
    args = read_params(ckpt_dir)
    paths = meta_shards(ckpt_dir)
    check_parallel_split(args, world_size)
    # Only the shards overlapping this rank's slice are opened (memory-mapped).
    shards = {}
    n_shards = len(paths)
    for i, p in enumerate(paths):
        if i * world_size < (rank + 1) * n_shards and rank * n_shards < (i + 1) * world_size:
            shards[i] = torch_load(p)
    first = shards[min(shards)]
    state_dict = {}
    for key in first:
        if key in IGNORED_KEYS:
            continue
        dim = shard_dim(key)
        if dim is None or (n_shards == 1 and world_size == 1):
            state_dict[key] = first[key]
        else:
            state_dict[key] = reshard(key, shards, n_shards, dim, rank, world_size)
    log.info("loaded %s: %d shard(s) -> rank %d of %d", ckpt_dir, n_shards, rank, world_size)
    return args, state_dict


def reshard(key: str, shards: dict, n_shards: int, dim: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank's slice of a tensor stored as n_shards equal pieces along dim."""
    piece = shards[min(shards)][key].shape[dim]
    total = piece * n_shards
    if total % world_size:
        raise ValueError(f"{key} has size {total} on dim {dim}, not divisible by {world_size} ranks")
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    parts = []
    for i in sorted(shards):
        a, b = max(lo, i * piece), min(hi, (i + 1) * piece)
        if a < b:
            if key not in shards[i]:
                raise ValueError(f"shard {i} has no {key}; the checkpoint shards do not match")
            parts.append(shards[i][key].narrow(dim, a - i * piece, b - a))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def check_parallel_split(args: ModelArgs, world_size: int) -> None:
    """Raise ValueError when the heads cannot be split over world_size ranks."""
    if args.n_heads % world_size or args.kv_heads % world_size:
        raise ValueError(
            f"n_heads={args.n_heads} and n_kv_heads={args.kv_heads} must be divisible by the "
            f"model-parallel size {world_size}; choose --nproc_per_node among "
            f"{[m for m in range(1, args.kv_heads + 1) if args.kv_heads % m == 0 and args.n_heads % m == 0]}"
        )
