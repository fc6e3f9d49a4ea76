"""sample_top_p and greedy choice."""

import torch

from llama import sample_top_p
from llama.sampling import next_token


def test_top_p_samples_only_from_the_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    # Sorted: 0.5, 0.3, 0.1, ... the nucleus for p=0.75 is {1, 3} (mass 0.8 >= 0.75).
    g = torch.Generator().manual_seed(0)
    seen = {sample_top_p(probs, 0.75, g).item() for _ in range(300)}
    assert seen == {1, 3}


def test_top_p_keeps_the_top_token_for_tiny_p():
    probs = torch.tensor([[0.2, 0.7, 0.1]])
    assert {sample_top_p(probs, 0.01).item() for _ in range(50)} == {1}


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 0.0, 1.9]])
    assert next_token(logits, 0.0, 0.9).tolist() == [1, 0]
