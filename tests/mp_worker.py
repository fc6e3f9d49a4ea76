"""Run under torchrun by the tests: for each checkpoint, greedy 200 tokens from BOS and the
full-sequence logits; rank 0 saves {path: {"tokens", "logits", "text"}} with torch.save.

    python -m torch.distributed.run --nproc_per_node 2 tests/mp_worker.py OUT TOKENIZER CKPT...

A CKPT written as PATH#int8 (or #int4) is built with quantize="int8", and PATH#64 generates 64
tokens instead of 200; its results keep that key. TOKENIZER "-" means the tokenizer beside each
checkpoint.
"""

import sys

import torch

from llama import Llama
from llama.parallel import rank


def run(checkpoint: str, tokenizer: str | None, quantize: str | None = None, max_gen_len: int = 200) -> dict:
    llama = Llama.build(checkpoint, None if tokenizer == "-" else tokenizer, max_seq_len=256, max_batch_size=1,
                        device="cpu", dtype="float32", quantize=quantize)
    tokens, _ = llama.generate([[llama.tokenizer.bos_id]], max_gen_len=max_gen_len, temperature=0)
    with torch.inference_mode():
        logits = llama.model(torch.tensor([[llama.tokenizer.bos_id] + tokens[0]]), 0)
    return {"tokens": tokens[0], "logits": logits[0], "text": llama.tokenizer.decode(tokens[0])}


def run_spec(spec: str, tokenizer: str) -> dict:
    path, *options = spec.split("#")
    tokens = [int(o) for o in options if o.isdigit()]
    quantize = [o for o in options if not o.isdigit()]
    return run(path, tokenizer, *(quantize or [None]), *tokens)


def main(out_path: str, tokenizer: str, *checkpoints: str) -> None:
    results = {spec: run_spec(spec, tokenizer) for spec in checkpoints}
    if rank() == 0:
        torch.save(results, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
