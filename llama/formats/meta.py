"""Writing Meta's release layout: params.json + consolidated.NN.pth (one per model-parallel rank).

The reader (any shard count, resharded at load) is `llama.checkpoint.load_meta`; `llama.convert`
feeds `save_shard` one rank's slice at a time.
"""

import json
import os

import torch

from llama.model import ModelArgs

DEFAULT_ROPE_THETA = 10000.0
# (ffn_dim_multiplier, multiple_of) of Meta's releases: Llama 3.2 1B, 70B (and Llama 2 70B), 3 8B,
# 3.1 405B; tried first when a width must be expressed in Meta's keys, so that their params.json
# round-trips through Hugging Face's intermediate_size.
META_FFN = ((1.5, 256), (1.3, 4096), (1.3, 1024), (1.2, 4096))
ROPE_KEYS = ("rope_scaling_factor", "rope_high_freq_factor", "rope_low_freq_factor", "rope_original_context")


def ffn_params(args: ModelArgs) -> dict:
    """multiple_of / ffn_dim_multiplier that make Meta's rule give this model's feed-forward width."""
    if args.hidden_dim is None:
        out = {"multiple_of": args.multiple_of}
        return out if args.ffn_dim_multiplier is None else {**out, "ffn_dim_multiplier": args.ffn_dim_multiplier}
    hidden, base = args.hidden_dim, int(2 * (4 * args.dim) / 3)
    candidates = ([{"multiple_of": args.multiple_of}]
                  + [{"ffn_dim_multiplier": m, "multiple_of": k} for m, k in META_FFN]
                  + [{"multiple_of": 2**k} for k in range(12, -1, -1)])
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
    if args.use_scaled_rope:
        params["use_scaled_rope"] = True
        # Only values that differ from Meta's reference (Llama 3.2's factor 32, say); Meta's later
        # code reads the two factors, and only this project's loader the other two.
        for key in ROPE_KEYS:
            if getattr(args, key) is not None:
                params[key] = getattr(args, key)
    params["vocab_size"] = args.vocab_size
    return params


def write_params(args: ModelArgs, out_dir: str) -> str:
    """Write params.json into out_dir (created if needed); returns its name."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "params.json"), "w") as f:
        json.dump(meta_params(args), f)
    return "params.json"


def save_shard(state_dict: dict, out_dir: str, rank: int) -> str:
    """Write one rank's tensors as consolidated.NN.pth; returns its name."""
    # torch.save of a view stores its whole underlying storage (a mmap'd file), and Meta's files
    # hold tied weights twice: copy views and repeated tensors.
    owned, seen = {}, set()
    for key, t in state_dict.items():
        whole = t.untyped_storage().nbytes() == t.nbytes and t.untyped_storage().data_ptr() not in seen
        owned[key] = t if whole else t.clone()
        seen.add(owned[key].untyped_storage().data_ptr())
    name = f"consolidated.{rank:02d}.pth"
    torch.save(owned, os.path.join(out_dir, name))
    return name
