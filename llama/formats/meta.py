"""Writing Meta's release layout: params.json + consolidated.NN.pth for a model-parallel size.

The reader (any shard count, resharded at load) is `llama.checkpoint.load_meta`.
"""

import json
import os

import torch

from llama.formats.common import check_parallel_split, shard
from llama.model import ModelArgs

DEFAULT_ROPE_THETA = 10000.0


def ffn_params(args: ModelArgs) -> dict:
    """multiple_of / ffn_dim_multiplier that make Meta's rule give this model's feed-forward width."""
    if args.hidden_dim is None:
        out = {"multiple_of": args.multiple_of}
        return out if args.ffn_dim_multiplier is None else {**out, "ffn_dim_multiplier": args.ffn_dim_multiplier}
    hidden, base = args.hidden_dim, int(2 * (4 * args.dim) / 3)
    candidates = [{"multiple_of": args.multiple_of}] + [{"multiple_of": 2**k} for k in range(12, -1, -1)]
    # Rounding up to multiple_of = hidden gives hidden for any width in 1..hidden.
    candidates.append({"multiple_of": hidden} if hidden >= base else
                      {"multiple_of": hidden, "ffn_dim_multiplier": hidden / base})
    for params in candidates:
        if ModelArgs(dim=args.dim, **params).ffn_hidden_dim == hidden:
            return params
    return {"hidden_dim": hidden}  # only our loader reads this key


def meta_params(args: ModelArgs) -> dict:
    """params.json as Meta writes it: optional keys only when they differ from Llama 2's defaults."""
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads}
    if args.kv_heads != args.n_heads:
        params["n_kv_heads"] = args.kv_heads
    params.update(ffn_params(args))
    params["norm_eps"] = args.norm_eps
    if args.rope_theta != DEFAULT_ROPE_THETA:
        params["rope_theta"] = args.rope_theta
    params["vocab_size"] = args.vocab_size
    return params


def write_meta(args: ModelArgs, state_dict: dict, out_dir: str, model_parallel_size: int = 1,
               progress=None) -> list[str]:
    """Write params.json and one consolidated.NN.pth per rank from full tensors; returns the files."""
    check_parallel_split(args, model_parallel_size)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump(meta_params(args), f)
    names = []
    for rank in range(model_parallel_size):
        # clone: torch.save of a view would store its whole underlying tensor.
        part = {k: shard(k, t, rank, model_parallel_size).clone() for k, t in state_dict.items()}
        names.append(f"consolidated.{rank:02d}.pth")
        torch.save(part, os.path.join(out_dir, names[-1]))
        if progress is not None:
            progress.update(sum(t.numel() * t.element_size() for t in part.values()))
        del part
    return names
