"""torchrun environment, process group, and the layer factories the model is built from.

With one process nothing here touches torch.distributed or fairscale, and the factories
return plain `nn.Linear` / `nn.Embedding`. With several, they return fairscale's
model-parallel layers. The `.weight` keys are the same either way.
"""

import atexit
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


def shard_dim(key: str) -> int | None:
    """The split dimension of a state-dict key such as `layers.0.attention.wq.weight`."""
    parts = key.split(".")
    name = parts[-2] if len(parts) >= 2 else parts[0]
    return SHARD_DIM.get(name)


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
    """Start the process group when torchrun launched several processes; returns (rank, size)."""
    world = world_size()
    if model_parallel_size is None:
        model_parallel_size = world
    if model_parallel_size != world:
        raise ValueError(
            f"model_parallel_size={model_parallel_size} but torchrun started {world} process(es); "
            f"pass --nproc_per_node {model_parallel_size} to torchrun or leave model_parallel_size unset"
        )
    if world == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        log.info("initializing process group: backend=%s world_size=%d", backend, world)
        torch.distributed.init_process_group(backend)
        # Without this, gloo/nccl can abort at interpreter exit ("terminate called without ...").
        atexit.register(_destroy_process_group)
    from fairscale.nn.model_parallel.initialize import (
        initialize_model_parallel,
        model_parallel_is_initialized,
    )

    if not model_parallel_is_initialized():
        initialize_model_parallel(world)
    return rank(), world


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears down its connections while others still use them
        torch.distributed.destroy_process_group()


def _fairscale_layer(cls, weight_shape: tuple[int, ...], **attrs) -> nn.Module:
    """An instance of a fairscale layer without its eager full-size init (which breaks on meta)."""
    layer = cls.__new__(cls)
    nn.Module.__init__(layer)
    for name, value in attrs.items():
        setattr(layer, name, value)
    layer.weight = nn.Parameter(torch.empty(weight_shape), requires_grad=False)
    layer.register_parameter("bias", None)
    return layer


def column_linear(in_features: int, out_features: int, gather_output: bool = False) -> nn.Module:
    """y = x W^T with W split by output rows across ranks."""
    mp = model_parallel_size()
    if mp == 1:
        return nn.Linear(in_features, out_features, bias=False)
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear

    return _fairscale_layer(
        ColumnParallelLinear,
        (out_features // mp, in_features),
        in_features=in_features,
        out_features=out_features,
        gather_output=gather_output,
        output_size_per_partition=out_features // mp,
    )


def row_linear(in_features: int, out_features: int) -> nn.Module:
    """y = x W^T with W split by input columns; outputs are summed across ranks."""
    mp = model_parallel_size()
    if mp == 1:
        return nn.Linear(in_features, out_features, bias=False)
    from fairscale.nn.model_parallel.layers import RowParallelLinear

    return _fairscale_layer(
        RowParallelLinear,
        (out_features, in_features // mp),
        in_features=in_features,
        out_features=out_features,
        input_is_parallel=True,
        input_size_per_partition=in_features // mp,
    )


def embedding(num_embeddings: int, embedding_dim: int) -> nn.Module:
    """Token embedding, split along the embedding dimension across ranks."""
    mp = model_parallel_size()
    if mp == 1:
        return nn.Embedding(num_embeddings, embedding_dim)
    from fairscale.nn.model_parallel.layers import ParallelEmbedding

    return _fairscale_layer(
        ParallelEmbedding,
        (num_embeddings, embedding_dim // mp),
        num_embeddings=num_embeddings,
        embedding_dim=embedding_dim,
        padding_idx=None,
        max_norm=None,
        norm_type=2.0,
        scale_grad_by_freq=False,
        sparse=False,
        embedding_dim_per_partition=embedding_dim // mp,
    )
