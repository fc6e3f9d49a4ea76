"""Not collected: prints the differences the Llama 3 tests bound (run explicitly)."""
import torch

from test_llama3_model import N_POSITIONS, hf_logits, meta_logits, tokens_for_test  # noqa: F401
from llama import Llama
from llama.model import rope_tables


def test_measure(llama3_meta_ckpt, meta_logits, llama32_hf, hf_logits):
    llama = Llama.build(llama3_meta_ckpt, max_seq_len=N_POSITIONS, max_batch_size=1, device="cpu", dtype="float32")
    with torch.inference_mode():
        ours = llama.model(tokens_for_test(0), 0)[0]
        p = llama.model.params
        llama.model.rope = rope_tables(p.head_dim, N_POSITIONS, p.rope_theta)
        plain = llama.model(tokens_for_test(0), 0)[0]
        print("\nmeta: max |diff|", (ours - meta_logits).abs().max().item(), "logit scale", meta_logits.abs().max().item())
        print("control (no scaling): max |diff| at 700+", (plain - meta_logits)[700:].abs().max().item(),
              "first 16 positions", (plain - meta_logits)[:16].abs().max().item())
        llama = Llama.build(llama32_hf[0], max_seq_len=N_POSITIONS, max_batch_size=1, device="cpu", dtype="float32")
        ours = llama.model(tokens_for_test(1), 0)[0]
        print("hf: max |diff|", (ours - hf_logits).abs().max().item(), "logit scale", hf_logits.abs().max().item())
