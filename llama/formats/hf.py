"""Hugging Face Llama directories (config.json + safetensors or pytorch_model*.bin) <-> Meta keys.

Hugging Face stores q/k projections with each head's rows in "rotate-half" order (first all
real parts, then all imaginary parts); Meta interleaves them. `to_interleaved` undoes that.
"""

import json
import logging
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llama.config import validate
from llama.formats.common import check_parallel_split, file_kind, shard, torch_load
from llama.model import LLAMA3_ROPE_SCALING, ModelArgs
from llama.parallel import local_kv_heads

log = logging.getLogger(__name__)

TOP_KEYS = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_KEYS = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
TOP_TO_HF = {meta: hf for hf, meta in TOP_KEYS.items()}
LAYER_TO_HF = {meta: hf for hf, meta in LAYER_KEYS.items()}
# Buffers some older checkpoints saved; the model recomputes them.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
MAX_SHARD_BYTES = 5 * 2**30
# Hugging Face's "llama3" rope_scaling keys -> ModelArgs fields, in LLAMA3_ROPE_SCALING's order.
HF_ROPE_KEYS = {
    "factor": "rope_scaling_factor",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "original_max_position_embeddings": "rope_original_context",
}


def meta_key(key: str) -> str | None:
    """Meta name of a Hugging Face key; None for keys to skip; ValueError for unknown ones."""
    if key in TOP_KEYS:
        return TOP_KEYS[key]
    if key.endswith(IGNORED_SUFFIXES):
        return None
    parts = key.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in LAYER_KEYS:
        return f"layers.{parts[2]}.{LAYER_KEYS[parts[3]]}"
    raise ValueError(f"unexpected tensor {key!r}; this is not a LlamaForCausalLM checkpoint")


def hf_key(key: str) -> str:
    """Hugging Face name of a Meta key."""
    if key in TOP_TO_HF:
        return TOP_TO_HF[key]
    _, n, rest = key.split(".", 2)  # layers, N, rest
    return f"model.layers.{n}.{LAYER_TO_HF[rest]}"


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from Hugging Face's rotate-half order to Meta's interleaved pairs."""
    rows, cols = w.shape
    halves = w.view(n_heads, 2, rows // n_heads // 2, cols)  # (heads, re/im, d/2, in)
    return halves.transpose(1, 2).reshape(rows, cols)  # (heads * d/2 * 2, in)


def to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from Meta's interleaved pairs to Hugging Face's rotate-half order."""
    rows, cols = w.shape
    pairs = w.view(n_heads, rows // n_heads // 2, 2, cols)  # (heads, d/2, re/im, in)
    return pairs.transpose(1, 2).reshape(rows, cols)  # (heads * 2 * d/2, in)


def rope_fields(rope: dict, context: int | None, path: str) -> dict:
    """ModelArgs fields of a config's rope_scaling / rope_parameters: none for plain RoPE, the
    Llama 3 scaling fields for type "llama3" (whose original context is max_position_embeddings,
    `context`, when not given, as in transformers); ValueError for any other type."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("default", None):
        return {}
    if rope_type != "llama3":
        raise ValueError(f"{path} uses RoPE scaling {rope_type!r}; only plain RoPE and Llama 3's 'llama3' "
                         "scaling are supported")
    rope = {"original_max_position_embeddings": context, **rope}
    try:
        fields = {key: rope[name] for name, key in HF_ROPE_KEYS.items()}
    except KeyError as e:
        raise ValueError(f"{path}: the 'llama3' RoPE scaling has no {e.args[0]!r}") from None
    meta = dict(zip(HF_ROPE_KEYS.values(), LLAMA3_ROPE_SCALING))
    # Values equal to Meta's reference stay unset, so a params.json written from them is Meta's own.
    return {"use_scaled_rope": True, **{k: v for k, v in fields.items() if v != meta[k]}}


# ModelArgs fields -> config.json keys, for messages that name what the user sees in the file.
CONFIG_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps", "hidden_dim": "intermediate_size",
                "max_seq_len": "max_position_embeddings", "rope_theta": "rope_theta",
                "rope_scaling_factor": "rope_parameters' factor",
                "rope_low_freq_factor": "rope_parameters' low_freq_factor",
                "rope_high_freq_factor": "rope_parameters' high_freq_factor",
                "rope_original_context": "rope_parameters' original_max_position_embeddings"}


def read_config(ckpt_dir: str) -> ModelArgs:
    """ModelArgs from config.json; ValueError for what Llama 2 and 3 cannot run."""
    path = os.path.join(ckpt_dir, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if cfg.get("model_type") != "llama":
        raise ValueError(
            f"{path} has model_type {cfg.get('model_type')!r}; only Hugging Face Llama checkpoints "
            "(model_type 'llama') can be loaded"
        )
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds a JSON {type(cfg).__name__}, not an object")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{path}: rope_parameters/rope_scaling is {rope!r}; it must be an object")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(f"{path} asks for a non-silu activation or biases, which Llama does not have")
    try:
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        args = ModelArgs(
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            hidden_dim=cfg["intermediate_size"],
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            **rope_fields(rope, cfg.get("max_position_embeddings"), path),
        )
    except KeyError as e:
        raise ValueError(f"{path} has no {e.args[0]!r}; it is not a complete Llama config") from None
    validate(args, path, CONFIG_NAMES)
    if cfg.get("head_dim", args.head_dim) != args.head_dim:
        raise ValueError(f"{path}: head_dim {cfg['head_dim']!r} x {n_heads} heads != hidden_size {dim}")
    return args


def weight_files(ckpt_dir: str) -> list[str]:
    """The weight files of a directory: an index's shards, else the single file (safetensors first)."""
    for index in INDEXES:
        path = os.path.join(ckpt_dir, index)
        if os.path.isfile(path):
            with open(path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{path} has no weight_map; it is not a Hugging Face weights index")
            names = sorted(set(weight_map.values()))
            folder = os.path.realpath(ckpt_dir)
            outside = [n for n in names if not isinstance(n, str)
                       or not os.path.realpath(os.path.join(folder, n)).startswith(folder + os.sep)]
            if outside:
                raise ValueError(f"{path} names {outside[0]!r}, which is not a file inside {ckpt_dir!r}; "
                                 "a checkpoint's index may only name files in its own folder")
            missing = [n for n in names if not os.path.isfile(os.path.join(ckpt_dir, n))]
            if missing:
                raise FileNotFoundError(f"{path} lists {missing[:3]}, which are not in {ckpt_dir!r}")
            return [os.path.join(ckpt_dir, n) for n in names]
    for name in SINGLE_FILES:
        if os.path.isfile(os.path.join(ckpt_dir, name)):
            return [os.path.join(ckpt_dir, name)]
    raise FileNotFoundError(
        f"{ckpt_dir!r} has config.json but no model.safetensors, pytorch_model.bin or their "
        "*.index.json with shards; download the weight files too"
    )


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors or torch file, memory-mapped."""
    if file_kind(path) != "safetensors":
        return torch_load(path)
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {path!r}: truncated or not a safetensors file ({e})") from None


def read_hf(ckpt_dir: str, rank: int = 0, world_size: int = 1) -> tuple[ModelArgs, dict]:
    """A Hugging Face Llama directory as (ModelArgs, Meta state dict) for rank of world_size."""
    args = read_config(ckpt_dir)
    tied = args.tie_word_embeddings
    check_parallel_split(args, world_size)
    heads = {"attention.wq.weight": args.n_heads // world_size,
             "attention.wk.weight": local_kv_heads(args.kv_heads, world_size)}
    state_dict, embeddings, source = {}, None, {}
    for path in weight_files(ckpt_dir):
        for key, tensor in read_tensors(path).items():
            name = meta_key(key)
            if name is None or (tied and name == "output.weight"):
                continue
            if name in source:
                raise ValueError(f"{key} is in two weight files of {ckpt_dir!r} ({os.path.basename(source[name])} "
                                 f"and {os.path.basename(path)}); the checkpoint is inconsistent")
            source[name] = path
            if name == "tok_embeddings.weight":
                embeddings = tensor
            local = shard(name, tensor, rank, world_size, args.kv_heads)
            n_heads = heads.get(name.split(".", 2)[-1])
            state_dict[name] = local if n_heads is None else to_interleaved(local, n_heads)
    if tied and embeddings is not None:
        # Same tensor as tok_embeddings with one rank; a different slice of it with several.
        state_dict["output.weight"] = shard("output.weight", embeddings, rank, world_size, args.kv_heads)
    log.info("read Hugging Face checkpoint %s (rank %d of %d)", ckpt_dir, rank, world_size)
    return args, state_dict


def is_tied(state_dict: dict) -> bool:
    """Whether output.weight is (or equals) tok_embeddings.weight."""
    out, emb = state_dict["output.weight"], state_dict["tok_embeddings.weight"]
    return out is emb or (out.shape == emb.shape and out.dtype == emb.dtype and torch.equal(out, emb))


def hf_rope(args: ModelArgs) -> dict:
    """rope_parameters of config.json (transformers 5.x; 4.x reads the same dict as rope_scaling)."""
    if args.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": args.rope_theta}
    return {"rope_type": "llama3", "rope_theta": args.rope_theta, **dict(zip(HF_ROPE_KEYS, args.rope_scaling))}


def hf_config(args: ModelArgs, tied: bool, dtype: torch.dtype, bos_id: int = 1,
              eos_id: int | list[int] = 2) -> dict:
    """config.json for LlamaForCausalLM (keys read by transformers 4.x and 5.x)."""
    rope = hf_rope(args)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": rope,
        **({"rope_scaling": rope} if args.rope_scaling else {}),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "vocab_size": args.vocab_size,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def hf_tensors(args: ModelArgs, state_dict: dict, tied: bool) -> dict[str, torch.Tensor]:
    """Meta state dict (full tensors) -> Hugging Face names and q/k order; output left out when tied."""
    heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.kv_heads}
    out = {}
    for key, tensor in state_dict.items():
        if tied and key == "output.weight":
            continue
        n_heads = heads.get(key.split(".", 2)[-1])
        out[hf_key(key)] = tensor if n_heads is None else to_rotate_half(tensor, n_heads)
    return out


def write_hf(args: ModelArgs, state_dict: dict, out_dir: str, progress=None,
             max_shard_bytes: int = MAX_SHARD_BYTES, bos_id: int = 1, eos_id: int | list[int] = 2) -> list[str]:
    """Write config.json and safetensors (sharded with an index above max_shard_bytes); returns the files."""
    os.makedirs(out_dir, exist_ok=True)
    tied = is_tied(state_dict)
    tensors = hf_tensors(args, state_dict, tied)
    groups, size = [[]], 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, keys in zip(names, groups):
        # One owned, contiguous tensor per key: safetensors refuses views that share storage.
        part = {k: tensors[k].contiguous().clone() for k in keys}
        save_file(part, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        if progress is not None:
            progress.update(sum(t.numel() * t.element_size() for t in part.values()))
        del part
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    dtype = state_dict["tok_embeddings.weight"].dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(args, tied, dtype, bos_id, eos_id), f, indent=2)
    return names
