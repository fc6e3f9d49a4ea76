"""Write a quantized checkpoint: python -m llama.quantize SRC DST --quantize int4 --group_size 32."""

import argparse
import logging
import os
import shutil

import torch

from llama import quant
from llama.checkpoint import find_tokenizer, load_checkpoint
from llama.device import DTYPES
from llama.formats.common import check_new_folder, new_folder
from llama.formats.meta import write_params
from llama.quant import DEFAULT_GROUP_SIZE
from llama.tokenizer import file_name

log = logging.getLogger(__name__)


def save_quantized(ckpt_dir: str, out_dir: str, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                   dtype: str = "float16", force: bool = False) -> None:
    """Write a quantized Meta-layout checkpoint (params.json + consolidated.00.pth, and the
    tokenizer found beside the source) to the new folder out_dir, from any format
    `Llama.build` reads.

    The source is read tensor by tensor from its memory map; `Llama.build(out_dir, ...)` loads
    the result directly, without quantize=. out_dir appears only once complete.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; pass float32, float16 or bfloat16")
    quant.check_mode(mode, group_size)
    if not force:
        check_new_folder(out_dir, "OUT_DIR (or pass --force to replace it)")
    args, state_dict = load_checkpoint(ckpt_dir, flag="CKPT_DIR")
    if quant.is_quantized(state_dict):
        raise ValueError(f"{ckpt_dir!r} is already quantized; pass a floating-point checkpoint")
    if args.vocab_size <= 0:
        args.vocab_size = state_dict["tok_embeddings.weight"].shape[0]
    try:
        tokenizer = find_tokenizer(ckpt_dir)
    except ValueError:
        tokenizer = None
        log.warning("no tokenizer beside %s; pass --tokenizer_path when loading %s", ckpt_dir, out_dir)
    with new_folder(out_dir, "OUT_DIR", force) as tmp:
        quantized = quant.quantize_state_dict(state_dict, mode, group_size, DTYPES[dtype], "cpu")
        write_params(args, tmp)
        torch.save(quantized, os.path.join(tmp, "consolidated.00.pth"))
        if tokenizer:
            shutil.copyfile(tokenizer, os.path.join(tmp, file_name(tokenizer)))
    log.info("wrote %s quantized checkpoint to %s", mode, out_dir)


def main(argv: list[str] | None = None) -> None:
    """Write a quantized copy of a checkpoint that Llama.build loads directly."""
    from llama import flags
    from llama.options import BuildOptions

    p = flags.Parser(prog="python -m llama.quantize", description=main.__doc__)
    p.add_argument("ckpt_dir", help="the floating-point checkpoint to read")
    p.add_argument("out_dir", help="the folder to write (params.json + consolidated.00.pth)")
    flags.add_options(p, BuildOptions, ("quantize", "group_size"), quantize="int8")
    p.add_argument("--mode", dest="quantize", choices=quant.MODES, help=argparse.SUPPRESS)  # the old name
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="of scales, embeddings and norms")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists (once the new one is complete)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    save_quantized(a.ckpt_dir, a.out_dir, a.quantize, a.group_size, a.dtype, a.force)


if __name__ == "__main__":
    from llama.flags import run

    run(main)
