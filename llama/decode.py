"""The token loop: prefill a batch of prompts in one forward, then decode step by step."""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from llama.bandwidth import StepClock
from llama.model import Transformer
from llama.options import GenerationOptions
from llama.sampling import next_token


@dataclass
class Row:
    """One prompt's output so far, as `generate` returns it."""

    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)
    done: bool = False


StopCheck = Callable[[int, Row], bool]


def check_prompts(prompt_tokens: list[list[int]], max_gen_len: int, max_seq_len: int, vocab_size: int) -> None:
    """Raise ValueError for an empty batch, an empty, too long or out-of-vocabulary prompt."""
    if not isinstance(prompt_tokens, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in prompt_tokens):
        raise TypeError("prompt_tokens must be a list of lists of token ids, one list per prompt")
    if not prompt_tokens:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompt_tokens):
        if len(p) == 0:
            raise ValueError(f"prompt {i} has no tokens; encode it with bos=True")
        if len(p) > max_seq_len or (len(p) == max_seq_len and max_gen_len > 0):
            raise ValueError(
                f"prompt {i} has {len(p)} tokens, which leaves no room to generate within "
                f"max_seq_len={max_seq_len}; raise --max_seq_len or shorten the prompt"
            )
        bad = [t for t in p if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary 0..{vocab_size - 1}")


def _check_finite(logits: torch.Tensor, model: Transformer) -> None:
    if not math.isfinite(logits.sum().item()):  # one reduction: 70 us less a step than isfinite().all()
        raise FloatingPointError(f"the model produced NaN/inf logits: {nan_cause(model)}")


def nan_cause(model: Transformer) -> str:
    """The likely cause of non-finite logits, looked for only once they appear."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return f"the weights hold NaN/inf values (first in {name}); the checkpoint is damaged"
    dtype = model.tok_embeddings.weight.dtype
    if dtype in (torch.float16, torch.bfloat16):
        return f"the activations overflowed {dtype}; try --dtype float32 (or bfloat16 for float16)"
    p = model.params
    return (f"the weights are finite and {dtype} does not overflow, so check the checkpoint's params "
            f"(norm_eps={p.norm_eps}, rope_theta={p.rope_theta})")


def prefill(model: Transformer, prompts: list[list[int]], rows: list[Row], echo_logprobs: bool) -> torch.Tensor:
    """Run all prompts in one forward; the logits after each prompt's last token (b, vocab).
    With echo_logprobs, fill each row's logprobs with its prompt's (0.0 for the first token)."""
    dev = model.tok_embeddings.weight.device
    bsz, lens = len(prompts), [len(p) for p in prompts]
    # Right-padded prompts; the filler is a valid id that attention never sees (causal mask).
    tokens = torch.zeros((bsz, max(lens)), dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=dev)
    last_pos = torch.tensor(lens, device=dev) - 1
    if not echo_logprobs:
        return model(tokens, 0, logits_pos=last_pos)[:, 0]  # (b, vocab)
    logits = model(tokens, 0)  # (b, s, vocab)
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]  # (b, s - 1)
    for b, n in enumerate(lens):
        rows[b].logprobs = [0.0] + lp[b, : n - 1].tolist()
    return logits[torch.arange(bsz, device=dev), last_pos]  # (b, vocab)


def decode_batch(model: Transformer, prompts: list[list[int]], options: GenerationOptions, stop: set[int],
                 generator: torch.Generator | None, stop_check: StopCheck | None = None) -> Iterator[list[Row]]:
    """Prefill all prompts (at most model.max_batch_size) in one forward, then decode; yields the
    rows after every step. A row ends at a token in `stop` (left out), after options.max_gen_len
    tokens, or when `stop_check(i, row)` returns True after a token was added (the token stays)."""
    dev = model.tok_embeddings.weight.device
    lens = [len(p) for p in prompts]
    budgets = [min(options.max_gen_len, model.max_seq_len - n) for n in lens]
    rows = [Row(list(p) if options.echo else [], done=budgets[b] == 0) for b, p in enumerate(prompts)]
    if options.max_gen_len > 0 or (options.logprobs and options.echo):
        logits = prefill(model, prompts, rows, options.logprobs and options.echo)
    if all(r.done for r in rows):
        yield rows
        return
    n_gen = [0] * len(prompts)
    clock = StepClock(model)
    for _ in range(max(budgets)):
        _check_finite(logits, model)
        cur = next_token(logits, options.temperature, options.top_p, generator)  # (b,)
        if options.logprobs:
            lp = torch.log_softmax(logits, dim=-1).gather(-1, cur[:, None])[:, 0].tolist()
        for b, t in enumerate(cur.tolist()):
            r = rows[b]
            if r.done:
                continue
            if t in stop:
                r.done = True
                continue
            r.tokens.append(t)
            if options.logprobs:
                r.logprobs.append(lp[b])
            n_gen[b] += 1
            r.done = n_gen[b] >= budgets[b] or (stop_check is not None and stop_check(b, r))
        yield rows
        if all(r.done for r in rows):
            return
        # A row's newest token goes at len + n_gen - 1. Finished rows are frozen: their
        # (ignored) step rewrites their last prompt slot, which they no longer read.
        step_pos = [n - 1 if r.done else n + g - 1 for n, g, r in zip(lens, n_gen, rows)]
        clock.start()
        logits = model(cur[:, None], torch.tensor(step_pos, device=dev))[:, 0]  # (b, vocab)
        clock.stop()
