"""Write a quantized checkpoint: python -m llama.quantize SRC DST --quantize int4 --group_size 32."""

import argparse
import logging
import os
import shutil

import torch

from llama import quant
from llama.checkpoint import load_checkpoint
from llama.device import DTYPES
from llama.quant import DEFAULT_GROUP_SIZE

log = logging.getLogger(__name__)


def save_quantized(ckpt_dir: str, out_dir: str, mode: str, group_size: int = DEFAULT_GROUP_SIZE,
                   dtype: str = "float16") -> None:
    """Write a quantized Meta-layout checkpoint (params.json + consolidated.00.pth) to out_dir.

    The source is read tensor by tensor from its memory map; `Llama.build(out_dir, ...)` loads
    the result directly, without quantize=.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; pass float32, float16 or bfloat16")
    _, state_dict = load_checkpoint(ckpt_dir)
    if quant.is_quantized(state_dict):
        raise ValueError(f"{ckpt_dir!r} is already quantized; pass a floating-point checkpoint")
    quantized = quant.quantize_state_dict(state_dict, mode, group_size, DTYPES[dtype], "cpu")
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(os.path.join(ckpt_dir, "params.json"), os.path.join(out_dir, "params.json"))
    torch.save(quantized, os.path.join(out_dir, "consolidated.00.pth"))
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
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    save_quantized(a.ckpt_dir, a.out_dir, a.quantize, a.group_size, a.dtype)


if __name__ == "__main__":
    from llama.flags import run

    run(main)
