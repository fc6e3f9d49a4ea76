"""Run under torchrun: greedy 200-token text of each checkpoint; rank 0 writes {path: text} as JSON.

    python -m torch.distributed.run --nproc_per_node 2 tests/torchrun_generate.py OUT.json TOKENIZER CKPT...
"""

import json
import sys

import torch

from llama import Llama
from llama.parallel import rank


def main(out: str, tokenizer: str, *checkpoints: str) -> None:
    texts = {}
    for path in checkpoints:
        llama = Llama.build(path, tokenizer, max_seq_len=256, max_batch_size=1, device="cpu", dtype="float32")
        tokens, _ = llama.generate([[llama.tokenizer.bos_id]], max_gen_len=200, temperature=0.0)
        texts[path] = llama.tokenizer.decode(tokens[0])
    if rank() == 0:
        with open(out, "w") as f:
            json.dump(texts, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # gloo aborts at exit if its group is still alive


if __name__ == "__main__":
    main(*sys.argv[1:])
