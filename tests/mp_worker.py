"""Run under torchrun by test_parallel.py: greedy 200 tokens from BOS, then full-sequence logits."""

import sys

import torch

from llama import Llama
from llama.parallel import rank


def main(ckpt_dir: str, tokenizer_path: str, out_path: str, quantize: str = "") -> None:
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=256, max_batch_size=1,
                        device="cpu", dtype="float32", quantize=quantize or None)
    tokens, _ = llama.generate([[llama.tokenizer.bos_id]], max_gen_len=200, temperature=0)
    with torch.inference_mode():
        logits = llama.model(torch.tensor([[llama.tokenizer.bos_id] + tokens[0]]), 0)
    if rank() == 0:
        torch.save({"tokens": tokens[0], "logits": logits[0],
                    "text": llama.tokenizer.decode(tokens[0])}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:5])
