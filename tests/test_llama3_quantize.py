"""int8 / int4 on the tied Llama 3.2-style model: the output layer gets its own quantized copy of
the embedding matrix, the embeddings stay float, and the logits stay close to the float model's."""

import pytest
import torch

from llama import Llama

TOKENS = torch.randint(0, 128000, (1, 16), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def float_logits(llama32_hf):
    llama = Llama.build(llama32_hf[0], max_seq_len=64, max_batch_size=1, device="cpu", dtype="float32")
    with torch.inference_mode():
        return llama.model(TOKENS, 0)


# Relative error of the logits measured on this random model (Gaussian weights: int4 steps of
# ~0.3 sigma in groups of 64): int8 0.025, int4 0.29; the bounds are about twice that. Uncorrelated
# logits (a wrong scale, group, transposition or embedding lookup) give about 1.4.
@pytest.mark.parametrize("mode, bound", [("int8", 0.05), ("int4", 0.5)])
def test_tied_model_quantized(llama32_hf, float_logits, mode, bound, tmp_path):
    from llama.quantize import save_quantized

    llama = Llama.build(llama32_hf[0], max_seq_len=64, max_batch_size=1, device="cpu", dtype="float32",
                        quantize=mode)
    assert llama.model.output.weight.dtype in (torch.int8, torch.uint8, torch.int32)  # its own quantized copy
    assert llama.model.tok_embeddings.weight.dtype == torch.float32
    with torch.inference_mode():
        logits = llama.model(TOKENS, 0)
    error = ((logits - float_logits).norm() / float_logits.norm()).item()
    assert error < bound, error
    if mode == "int4":
        return
    # The quantized checkpoint written from it loads alone (tokenizer.json kept) and gives the same.
    save_quantized(llama32_hf[0], str(tmp_path / "q"), mode, dtype="float32")
    again = Llama.build(str(tmp_path / "q"), max_seq_len=64, max_batch_size=1, device="cpu", dtype="float32")
    assert again.tokenizer.kind == "tokenizer.json"
    with torch.inference_mode():
        torch.testing.assert_close(again.model(TOKENS, 0), logits, atol=1e-4, rtol=0)
