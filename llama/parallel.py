"""Model parallelism: the torchrun environment, the process group, and the tensor-parallel transform.

The model is built whole, of plain `nn.Linear` / `nn.Embedding` layers. `shard_model` shrinks
the split layers to one rank's slice (before loading) and `add_collectives` hooks the
collectives onto them (after every other transform). fairscale's model-parallel state is set up
as Meta's code expects (its group is the whole world); the collectives run on torch.distributed's
default group, whose timeout is LLAMA_DIST_TIMEOUT. SHARD_DIM is the one table of which weight
splits along which dimension: the checkpoint readers, resharding and the memory estimate use it
too. With one process nothing here touches torch.distributed or fairscale.
"""

import atexit
import contextlib
import datetime
import io
import logging
import os

import torch
from torch import nn

log = logging.getLogger(__name__)

# Dimension along which each Meta checkpoint weight is split across model-parallel ranks
# (None: replicated). Column-parallel layers split their output rows, row-parallel layers
# their input columns; fairscale's ParallelEmbedding splits the embedding dimension.
SHARD_DIM = {
    "tok_embeddings": 1,
    "output": 0,
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "wo": 1,
    "w1": 0,
    "w3": 0,
    "w2": 1,
}


# Key/value projections: with more ranks than kv heads, each kv head is copied to the ranks
# whose query heads use it (as Meta runs 70B, 8 kv heads, on 16 ranks).
KV_LAYERS = ("wk", "wv")


# Split layers whose outputs every rank needs whole: gathered after the layer. The outputs of
# the other layers split by input columns (dim 1) are partial sums, reduced after the layer.
GATHERED = ("tok_embeddings", "output")


def _layer_name(key: str) -> str:
    parts = key.split(".")
    return parts[-2] if len(parts) >= 2 else parts[0]


def shard_dim(key: str) -> int | None:
    """The split dimension of a state-dict key such as `layers.0.attention.wq.weight`."""
    return SHARD_DIM.get(_layer_name(key))


def piece_of(key: str, rank: int, world_size: int, n_kv_heads: int) -> tuple[int, int]:
    """(piece, pieces): rank holds piece `piece` of the key's tensor cut into `pieces` equal parts
    along its SHARD_DIM. That is (rank, world_size), except for the key/value projections on more
    ranks than kv heads, where the ranks of one query group share a copy of their kv head."""
    if _layer_name(key) in KV_LAYERS and world_size > n_kv_heads:
        return rank // (world_size // n_kv_heads), n_kv_heads
    return rank, world_size


def local_kv_heads(n_kv_heads: int, world_size: int) -> int:
    """kv heads each rank holds (1, a copy, when ranks exceed kv heads)."""
    return max(1, n_kv_heads // world_size)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def model_parallel_size() -> int:
    """1 without a process group, else fairscale's model-parallel world size."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    from fairscale.nn.model_parallel.initialize import (
        get_model_parallel_world_size,
        model_parallel_is_initialized,
    )

    return get_model_parallel_world_size() if model_parallel_is_initialized() else 1


def setup(model_parallel_size: int | None, device: torch.device) -> tuple[int, int]:
    """Start the process group when torchrun launched several processes; returns (rank, size).
    On CUDA the device becomes this process's current device (what nccl uses)."""
    world = world_size()
    if model_parallel_size is None:
        model_parallel_size = world
    if model_parallel_size != world:
        raise ValueError(
            f"model_parallel_size={model_parallel_size} but torchrun started {world} process(es); "
            f"pass --nproc_per_node {model_parallel_size} to torchrun or leave model_parallel_size unset"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        log.info("initializing process group: backend=%s world_size=%d", backend, world)
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=collective_timeout()))
        # Without this, gloo/nccl can abort at interpreter exit ("terminate called without ...").
        atexit.register(_destroy_process_group)
    from fairscale.nn.model_parallel.initialize import (
        initialize_model_parallel,
        model_parallel_is_initialized,
    )

    if not model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()) as said:  # fairscale prints; stdout is for text
            initialize_model_parallel(world)
        log.info("fairscale: %s", "; ".join(said.getvalue().replace("> ", "").splitlines()))
    return rank(), world


def collective_timeout() -> float:
    """Seconds a rank waits for the others in a collective (LLAMA_DIST_TIMEOUT, default 600)."""
    value = os.environ.get("LLAMA_DIST_TIMEOUT", "600")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"LLAMA_DIST_TIMEOUT={value!r} must be a number of seconds > 0")
    return seconds


def _collective(op, *args):
    """Run a torch.distributed collective; a rank that does not answer in time is one clear error."""
    try:
        return op(*args)
    except RuntimeError as e:
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        raise TimeoutError(
            f"rank {rank()}: another model-parallel rank did not answer within {collective_timeout():.0f} s "
            "(it stopped, died or is far slower); set LLAMA_DIST_TIMEOUT to wait longer"
        ) from None


def patient_group():
    """A gloo group of every rank whose collectives never time out in practice: for ranks that
    wait on a person (the chat's next message). Every rank must call it, at the same point."""
    return torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=365))


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears down its connections while others still use them
        torch.distributed.destroy_process_group()


def can_split(n_heads: int, n_kv_heads: int, world_size: int) -> bool:
    """Whether world_size ranks can share the heads: the query heads split evenly, and the kv
    heads split evenly or (more ranks than kv heads) are copied evenly."""
    return n_heads % world_size == 0 and (n_kv_heads % world_size == 0 or world_size % n_kv_heads == 0)


def check_split(n_heads: int, n_kv_heads: int, world_size: int) -> None:
    """Raise ValueError when the heads cannot be split over world_size ranks."""
    if not can_split(n_heads, n_kv_heads, world_size):
        sizes = [m for m in range(1, n_heads + 1) if can_split(n_heads, n_kv_heads, m)]
        raise ValueError(
            f"n_heads={n_heads} must be divisible by the model-parallel size {world_size}, and "
            f"n_kv_heads={n_kv_heads} divisible by it or a divisor of it (kv heads are then copied); "
            f"run with --nproc_per_node "
            f"(or convert --model_parallel_size) among {sizes}"
        )


def shard_model(model: nn.Module, world_size: int) -> nn.Module:
    """Give every layer of SHARD_DIM its slice's shape for one of world_size ranks (in place).

    Linear and embedding layers are replaced by smaller ones of the same kind on the same device
    (use it on the meta device, before loading); attention modules keep their local head counts.
    """
    if world_size == 1:
        return model
    args = model.params
    check_split(args.n_heads, args.kv_heads, world_size)
    for module in list(model.modules()):
        if hasattr(module, "n_local_heads"):
            module.n_local_heads //= world_size
            module.n_local_kv_heads = local_kv_heads(args.kv_heads, world_size)
        for name, child in list(module.named_children()):
            dim = SHARD_DIM.get(name)
            if dim is not None:
                pieces = piece_of(f"{name}.weight", 0, world_size, args.kv_heads)[1]
                setattr(module, name, _smaller(child, dim, pieces))
    return model


def _smaller(layer: nn.Module, dim: int, pieces: int) -> nn.Module:
    shape = list(layer.weight.shape)
    shape[dim] //= pieces
    device = layer.weight.device
    if isinstance(layer, nn.Embedding):
        return nn.Embedding(*shape, device=device)
    return nn.Linear(shape[1], shape[0], bias=False, device=device)  # weight (out, in)


def add_collectives(model: nn.Module) -> nn.Module:
    """Add the collectives to a sharded model (in place; after every module swap).

    The outputs of the GATHERED layers (the embedding, split by dimension; the output layer,
    split by vocabulary) are gathered; those of the other layers split by input columns (`wo`,
    `w2`) are summed over ranks. Layers split by output rows need nothing in inference: their
    inputs are whole on every rank and their outputs stay split. A no-op with one process.
    """
    world = model_parallel_size()
    if world == 1:
        return model

    def reduce(module, inputs, output):
        _collective(torch.distributed.all_reduce, output)  # in place: output is this layer's own
        return output

    def gather(module, inputs, output):
        parts = [torch.empty_like(output) for _ in range(world)]
        _collective(torch.distributed.all_gather, parts, output.contiguous())
        return torch.cat(parts, dim=-1)

    for module in list(model.modules()):
        for name, child in module.named_children():
            if name in GATHERED:
                child.register_forward_hook(gather)
            elif SHARD_DIM.get(name) == 1:
                child.register_forward_hook(reduce)
    return model
