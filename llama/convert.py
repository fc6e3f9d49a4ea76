"""Convert any supported checkpoint to Meta's layout (any model-parallel size), Hugging Face,
llama2.c or GGUF.

    python -m llama.convert SRC DST --to meta --model_parallel_size 2
    python -m llama.convert SRC DST --to hf [--tokenizer_path tokenizer.model] [--dtype bfloat16]
    python -m llama.convert SRC model.bin --to llama2c
    python -m llama.convert SRC model.gguf --to gguf [--outtype q8_0]

SRC is a Meta or Hugging Face directory, or a llama2.c .bin or GGUF file (dequantized as it is
read); DST is a new directory (a new file for llama2c and gguf). The tokenizer (tokenizer.model or
tokenizer.json) is copied beside the output; GGUF embeds it, and a GGUF source's own is written out.
"""

import logging
import os
import shutil
import sys

import torch
from tqdm import tqdm

from llama.checkpoint import detect_format, find_tokenizer, load_checkpoint
from llama.device import DTYPES
from llama.formats.common import check_new_folder, disk_error, new_folder
from llama.formats.gguf import is_gguf
from llama.formats.gguf_write import OUTTYPES, write_gguf
from llama.formats.hf import write_hf
from llama.formats.llama2c import write_llama2c
from llama.formats.meta import save_shard, write_params
from llama.quant import dequantize_int4, is_quantized
from llama.tokenizer import Tokenizer, file_name

log = logging.getLogger(__name__)

FORMATS = ("meta", "hf", "llama2c", "gguf")
SINGLE_FILE_FORMATS = ("llama2c", "gguf")
# Meta's params.json has no context length: Llama 2 models were trained with 4096, Llama 3 (its
# 128,256-word vocabulary) with 8192, and Llama 3.1 / 3.2 (scaled RoPE) reach 131072.
LLAMA2_CONTEXT = 4096
LLAMA3_CONTEXT, LLAMA3_VOCAB = 8192, 128256
SCALED_ROPE_CONTEXT = 131072
PROGRESS_MIN_BYTES = 2**30
GGUF_TYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def convert(src: str, dst: str, to: str = "meta", model_parallel_size: int = 1,
            tokenizer_path: str | None = None, dtype: str | None = None, force: bool = False,
            outtype: str | None = None) -> list[str]:
    """Convert checkpoint `src` into the new directory `dst`; returns the files written.

    Args:
        src: a Meta or Hugging Face checkpoint directory, or a llama2.c .bin or GGUF file.
        dst: output directory, not existing yet or empty (for "llama2c" and "gguf", a new file).
        to: "meta" (params.json + consolidated.NN.pth), "hf" (config.json + safetensors),
            "llama2c" (a version-1 fp32 .bin for run.c) or "gguf" (one file for llama.cpp).
        model_parallel_size: number of consolidated.NN.pth shards for "meta".
        tokenizer_path: tokenizer.model or tokenizer.json to copy beside the output; by default the
            one beside src.
        dtype: cast the weights ("float32", "float16", "bfloat16"); by default keep them.
        outtype: the GGUF type of the matrices ("f32", "f16", "bf16", "q8_0"); by default the
            source's float type.
    """
    dtype = _check_request(dst, to, model_parallel_size, dtype, outtype)
    if to not in SINGLE_FILE_FORMATS and not force:
        check_new_folder(dst, "DST (or pass --force to replace it)")
    source_format = detect_format(src, flag="SRC")
    if tokenizer_path is None:
        try:
            tokenizer_path = find_tokenizer(src)
        except ValueError:
            log.warning("no tokenizer beside %s; pass --tokenizer_path to copy one to the output", src)
    elif not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"tokenizer {tokenizer_path!r} does not exist; check --tokenizer_path")
    if to == "gguf" and tokenizer_path is None:
        raise ValueError(f"a GGUF file embeds its tokenizer, and there is none beside {src!r}; pass --tokenizer_path")
    if to in SINGLE_FILE_FORMATS:  # one new file, written under a temporary name, beside anything there
        tmp = f"{dst}.partial"
        try:
            files = [os.path.basename(dst)]
            _write(src, tmp, to, model_parallel_size, dtype, source_format, tokenizer_path, outtype)
            os.replace(tmp, dst)
        except (OSError, RuntimeError) as e:
            raise disk_error(e, dst) or e from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if to == "llama2c":
            files += _copy_tokenizer(tokenizer_path, os.path.dirname(os.path.abspath(dst)))
    else:  # a new folder, renamed into place once complete
        with new_folder(dst, force=force) as tmp:
            files = _write(src, tmp, to, model_parallel_size, dtype, source_format, tokenizer_path)
            files += _copy_tokenizer(tokenizer_path, tmp)
    log.info("converted %s (%s) -> %s (%s): %s", src, source_format, dst, to, ", ".join(files))
    return files


def _copy_tokenizer(tokenizer_path: str | None, folder: str) -> list[str]:
    """Copy the tokenizer as tokenizer.model, or as tokenizer.json when it is one; write out the
    one a GGUF file embeds."""
    if tokenizer_path is None:
        return []
    data = None
    if is_gguf(tokenizer_path):
        from llama.gguf_vocab import tokenizer_file

        name, data = tokenizer_file(Tokenizer(tokenizer_path).backend)
    else:
        name = file_name(tokenizer_path)
    if os.path.exists(os.path.join(folder, name)):
        log.warning("left the %s already in %s as it is", name, folder)
        return []
    if data is None:
        shutil.copyfile(tokenizer_path, os.path.join(folder, name))
    else:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return [name]


def _check_request(dst: str, to: str, model_parallel_size: int, dtype: str | None,
                   outtype: str | None = None) -> torch.dtype | None:
    """The dtype to cast to; ValueError for a request that cannot be carried out."""
    if to not in FORMATS:
        raise ValueError(f"unknown output format {to!r}; pass --to meta, hf, llama2c or gguf")
    if to == "gguf" and dtype is not None:
        raise ValueError("--to gguf takes --outtype (f32, f16, bf16 or q8_0), not --dtype")
    if outtype is not None and (to != "gguf" or outtype not in OUTTYPES):
        raise ValueError(f"--outtype {outtype} applies to --to gguf only, as one of {', '.join(OUTTYPES)}")
    if to != "meta" and model_parallel_size != 1:
        raise ValueError(f"--model_parallel_size applies to --to meta only; {to} output is not split")
    if dtype is not None and str(dtype).lower() not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; pass --dtype float32, float16 or bfloat16")
    dtype = DTYPES[str(dtype).lower()] if dtype is not None else None
    if to == "llama2c" and dtype not in (None, torch.float32):
        raise ValueError("llama2.c version-1 files are float32; leave out --dtype")
    if to in SINGLE_FILE_FORMATS and os.path.exists(dst):
        raise ValueError(f"output {dst!r} already exists; choose a new file name")
    return dtype


def _write(src: str, dst: str, to: str, model_parallel_size: int, dtype: torch.dtype | None,
           source_format: str, tokenizer_path: str | None = None, outtype: str | None = None) -> list[str]:
    """Read src and write it to dst in format `to`; returns the files written."""
    args, state_dict = load_checkpoint(src, 0, model_parallel_size, flag="SRC")
    if source_format == "gguf":
        state_dict = dequantize_all(state_dict)
    if is_quantized(state_dict):
        raise ValueError(f"{src!r} is a quantized checkpoint; convert reads floating-point ones: convert the "
                         "original, then quantize the result with python -m llama.quantize")
    if source_format == "meta":
        if args.vocab_size == -1:
            args.vocab_size = state_dict["tok_embeddings.weight"].shape[0]
        args.max_seq_len = meta_context(args)
    total = model_parallel_size * sum(t.numel() * t.element_size() for t in state_dict.values())
    show = sys.stderr.isatty() and total >= PROGRESS_MIN_BYTES
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {to}", disable=not show) as bar:
        if to == "meta":
            files = [write_params(args, dst)]
            for rank in range(model_parallel_size):
                if rank > 0:  # each rank's slice is read on its own, so one shard is in memory at a time
                    state_dict = load_checkpoint(src, rank, model_parallel_size)[1]
                files.append(save_shard(cast(state_dict, dtype), dst, rank))
                bar.update(total // model_parallel_size)
        elif to == "hf":
            files = write_hf(args, cast(state_dict, dtype), dst, progress=bar, **_special_ids(tokenizer_path))
        elif to == "gguf":
            outtype = outtype or GGUF_TYPES.get(state_dict["layers.0.attention.wq.weight"].dtype, "f32")
            files = [write_gguf(args, state_dict, Tokenizer(tokenizer_path), dst, outtype,
                                name=os.path.basename(os.path.abspath(src)), progress=bar)]
        else:
            os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
            files = [write_llama2c(args, state_dict, dst, progress=bar)]
    return files


def dequantize_all(state_dict: dict) -> dict:
    """The int4 tensors of a GGUF state dict (its Q4_0/Q4_1) dequantized to fp32; tied stay tied."""
    out, done = {}, {}
    for key, t in state_dict.items():
        if key.endswith((".scales", ".zeros")):
            continue
        prefix = key[: -len("weight")]
        if prefix + "zeros" in state_dict:
            if id(t) not in done:
                done[id(t)] = dequantize_int4(t, state_dict[prefix + "scales"], state_dict[prefix + "zeros"])
            t = done[id(t)]
        out[key] = t
    return out


def _special_ids(tokenizer_path: str | None) -> dict:
    """bos_id / eos_id for config.json from the tokenizer (eos: every stop token), else Llama 2's."""
    if tokenizer_path is None:
        return {}
    tokenizer = Tokenizer(tokenizer_path)
    stops = tokenizer.stop_tokens
    return {"bos_id": tokenizer.bos_id, "eos_id": stops[0] if len(stops) == 1 else stops}


def meta_context(args) -> int:
    """The context length of a Meta checkpoint's model (params.json does not give it)."""
    if args.use_scaled_rope:
        return SCALED_ROPE_CONTEXT
    return LLAMA3_CONTEXT if args.vocab_size == LLAMA3_VOCAB else LLAMA2_CONTEXT


def cast(state_dict: dict, dtype: torch.dtype | None) -> dict:
    """Floating tensors cast to dtype (None: unchanged); tied tensors stay tied. A value the dtype
    cannot hold (above 65504 in float16) is an error, not an inf in the output."""
    if dtype is None:
        return state_dict
    done: dict[int, torch.Tensor] = {}
    out = {}
    limit = torch.finfo(dtype).max
    for key, t in state_dict.items():
        if id(t) not in done and t.is_floating_point() and t.numel() and t.abs().max() > limit:
            raise ValueError(f"{key} has values up to {t.abs().max().item():.4g}, beyond {dtype}'s range "
                             f"({limit:.4g}); convert to --dtype bfloat16 or float32 instead")
        if id(t) not in done:
            done[id(t)] = t.to(dtype) if t.is_floating_point() else t
        out[key] = done[id(t)]
    return out


def main(argv: list[str] | None = None) -> None:
    """Convert SRC (Meta or Hugging Face directory, llama2.c .bin, GGUF file) to DST in format --to
    (meta, hf, llama2c or gguf)."""
    from llama import flags

    p = flags.Parser(prog="python -m llama.convert", description=main.__doc__)
    p.add_argument("src", help="a Meta or Hugging Face checkpoint directory, or a llama2.c .bin or .gguf file")
    p.add_argument("dst", help="the new directory (for --to llama2c or gguf, the new file)")
    p.add_argument("--to", default="meta", choices=FORMATS, help="the format to write (default: meta)")
    p.add_argument("--model_parallel_size", type=int, default=1, help="shards to write with --to meta")
    p.add_argument("--tokenizer_path", help="tokenizer.model or tokenizer.json to copy beside the result")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating weights to this dtype")
    p.add_argument("--outtype", choices=OUTTYPES, help="with --to gguf: the matrices' type (default: the source's)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists (once the new one is complete)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = convert(a.src, a.dst, a.to, a.model_parallel_size, a.tokenizer_path, a.dtype, a.force, a.outtype)
    print(f"wrote {', '.join(files)} to {a.dst}")


if __name__ == "__main__":
    from llama.flags import run

    run(main)
