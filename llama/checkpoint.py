"""Checkpoint files -> (ModelArgs, state dict in Meta's key names) for one model-parallel rank.

`load_checkpoint` finds the format from the files and hands over to its reader: Meta's layout
here, Hugging Face, llama2.c and GGUF in `llama.formats`. Readers are plain functions over files;
none of them builds a module. Tensors come back memory-mapped where the format allows it, so
loading never holds two copies of the weights.
"""

import dataclasses
import json
import logging
import os
import re

import torch

from llama.config import validate
from llama.formats.common import check_parallel_split, file_kind, torch_load
from llama.formats.gguf import is_gguf, read_gguf, read_gguf_args
from llama.formats.hf import read_config, read_hf
from llama.formats.llama2c import read_header, read_llama2c
from llama.model import ModelArgs
from llama.parallel import piece_of, shard_dim

log = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
# Keys some Meta checkpoints carry that the model recomputes.
IGNORED_KEYS = ("rope.freqs",)
# Tokenizer files looked for beside a checkpoint, in this order.
TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.json")


def load_checkpoint(path: str, rank: int = 0, world_size: int = 1, flag: str = "--ckpt_dir",
                    dtype: torch.dtype = torch.float32) -> tuple[ModelArgs, dict]:
    """Read any supported checkpoint and return (ModelArgs, state dict) for rank `rank` of `world_size`.

    The format is found from the files themselves (see `detect_format`). The state dict uses
    Meta's key names and holds this rank's model-parallel shard. `dtype` is what GGUF's
    quantized types other than Q4_0/Q4_1 are dequantized to; other formats keep their own.
    """
    kind = detect_format(path, flag)
    if kind == "gguf":
        return read_gguf(path, rank, world_size, dtype)
    return READERS[kind](path, rank, world_size)


def read_args(path: str) -> ModelArgs:
    """The ModelArgs of a checkpoint from its params.json, config.json or llama2.c header alone
    (no weights needed)."""
    kind = detect_format(path)
    if kind == "meta":
        return read_params(path)
    if kind == "hf":
        return read_config(path)
    if kind == "gguf":
        return read_gguf_args(path)
    return read_header(path)[0]


def detect_format(path: str, flag: str = "--ckpt_dir") -> str:
    """"meta", "hf", "llama2c" or "gguf" for a checkpoint path; FileNotFoundError/ValueError (naming the
    flag or argument that gave the path) otherwise."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; check {flag}")
    if os.path.isdir(path):
        files = sorted(os.listdir(path))
        if not files:
            raise FileNotFoundError(f"checkpoint directory {path!r} is empty; check {flag}")
        if "params.json" in files or any(_SHARD_RE.match(f) for f in files):
            return "meta"
        if "config.json" in files:
            return "hf"
        raise ValueError(
            f"{path!r} holds no known checkpoint layout (found: {', '.join(files[:8])}); expected "
            "Meta's params.json + consolidated.NN.pth or Hugging Face's config.json + weights "
            f"(for a llama2.c .bin or a .gguf file, pass the file itself); check {flag}"
        )
    if is_gguf(path):
        return "gguf"
    kind = file_kind(path)
    if kind != "raw":
        raise ValueError(
            f"{path!r} is a single {kind} weights file; pass the directory that holds it with its "
            f"params.json (Meta) or config.json (Hugging Face) as {flag}"
        )
    return "llama2c"


def find_tokenizer(ckpt_path: str) -> str:
    """The tokenizer beside a checkpoint: tokenizer.model (else tokenizer.json) in its directory (or
    next to its file), else in the folder above a checkpoint directory, where Meta's Llama 2
    download puts it. A GGUF file is its own tokenizer."""
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"checkpoint {ckpt_path!r} does not exist; check --ckpt_dir")
    if is_gguf(ckpt_path):
        return ckpt_path
    folder = os.path.abspath(ckpt_path if os.path.isdir(ckpt_path) else os.path.dirname(ckpt_path) or ".")
    candidates = [folder] + ([os.path.dirname(folder)] if os.path.isdir(ckpt_path) else [])
    for candidate in candidates:
        for name in TOKENIZER_NAMES:
            path = os.path.join(candidate, name)
            if os.path.isfile(path):
                return path
    raise ValueError(f"there is no tokenizer.model or tokenizer.json beside {ckpt_path!r}; pass --tokenizer_path")


def match_vocab(args: ModelArgs, state_dict: dict, tokenizer) -> ModelArgs:
    """args with vocab_size filled in (from the embeddings, else the tokenizer); ValueError when
    the tokenizer, params and weights disagree."""
    weights = state_dict["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in state_dict else None
    params = None if args.vocab_size == -1 else args.vocab_size
    if params is not None and weights is not None and params != weights:
        raise ValueError(f"the checkpoint's params give vocab_size={params} but its embeddings have "
                         f"{weights} rows; the checkpoint is inconsistent")
    size = params or weights or tokenizer.n_words
    if tokenizer.n_words != size:
        raise ValueError(
            f"tokenizer {tokenizer.path!r} has {tokenizer.n_words} words but the checkpoint has a "
            f"vocabulary of {size}; pass the tokenizer that came with this checkpoint as --tokenizer_path"
        )
    return dataclasses.replace(args, vocab_size=size)


def read_params(ckpt_dir: str) -> ModelArgs:
    params_path = os.path.join(ckpt_dir, "params.json")
    if not os.path.isfile(params_path):
        raise FileNotFoundError(f"{ckpt_dir!r} has no params.json; a Meta checkpoint directory needs one")
    try:
        with open(params_path) as f:
            params = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{params_path} is not valid JSON: {e}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{params_path} holds a JSON {type(params).__name__}, not an object of model parameters")
    unknown = sorted(set(params) - {f.name for f in dataclasses.fields(ModelArgs)})
    if unknown:
        log.warning("%s: ignored unknown key(s) %s", params_path, ", ".join(unknown))
    args = ModelArgs.from_params(params)
    validate(args, params_path)
    return args


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
    if world_size > 1 and any(key.endswith(".scales") for key in first):
        raise ValueError(
            f"{ckpt_dir!r} is a quantized checkpoint, which loads in one process only; under "
            "torchrun pass the float checkpoint with --quantize, and each rank quantizes its shard"
        )
    state_dict = {}
    for key in first:
        if key in IGNORED_KEYS:
            continue
        dim = shard_dim(key)
        if dim is None or (n_shards == 1 and world_size == 1):
            state_dict[key] = first[key]
        else:
            state_dict[key] = reshard(key, shards, n_shards, dim, rank, world_size, args.kv_heads)
    log.info("loaded %s: %d shard(s) -> rank %d of %d", ckpt_dir, n_shards, rank, world_size)
    return args, state_dict


def reshard(key: str, shards: dict, n_shards: int, dim: int, rank: int, world_size: int,
            n_kv_heads: int) -> torch.Tensor:
    """Rank's slice of a tensor stored as n_shards equal pieces along dim. Key/value projections
    stored on more shards than kv heads hold copies (one kv head per shard); ranks beyond the kv
    heads get copies too (see parallel.piece_of)."""
    piece_id, pieces = piece_of(key, rank, world_size, n_kv_heads)
    n_stored = piece_of(key, 0, n_shards, n_kv_heads)[1]
    if n_stored != n_shards:  # keep one copy of each stored kv head
        copies = n_shards // n_stored
        shards = {i // copies: sd for i, sd in sorted(shards.items())}
    piece = shards[min(shards)][key].shape[dim]
    total = piece * n_stored
    if total % pieces:
        raise ValueError(f"{key} has size {total} on dim {dim}, not divisible by {pieces} ranks")
    lo, hi = piece_id * total // pieces, (piece_id + 1) * total // pieces
    parts = []
    for i in sorted(shards):
        a, b = max(lo, i * piece), min(hi, (i + 1) * piece)
        if a < b:
            if key not in shards[i]:
                raise ValueError(f"shard {i} has no {key}; the checkpoint shards do not match")
            parts.append(shards[i][key].narrow(dim, a - i * piece, b - a))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


READERS = {"meta": load_meta, "hf": read_hf, "llama2c": read_llama2c}
