"""One validation of model configuration for every format (params.json, config.json, llama2.c
headers): types, ranges and divisibility, each error naming the file, the key as that file spells
it, the value and what is allowed. Readers call `validate` before anything is derived from the
values (head_dim, the feed-forward width, RoPE tables, the memory estimate).
"""

import math

# Field -> (smallest, largest) accepted. The upper bounds are far above every released Llama
# (405B: dim 16384, 126 layers, 128 heads, hidden 53248, vocab 128256) and keep a corrupt value
# from building a model of a billion layers before anything else can complain.
INTEGERS = {
    "dim": (1, 1 << 17), "n_layers": (1, 4096), "n_heads": (1, 4096), "multiple_of": (1, 1 << 20),
    "max_seq_len": (1, 1 << 24), "max_batch_size": (1, 1 << 16),
}
OPTIONAL_INTEGERS = {"n_kv_heads": (1, 4096), "hidden_dim": (1, 1 << 20), "rope_original_context": (1, 1 << 24)}
VOCAB = (1, 1 << 23)
POSITIVE_NUMBERS = ("norm_eps", "rope_theta")
OPTIONAL_POSITIVE_NUMBERS = ("ffn_dim_multiplier", "rope_scaling_factor", "rope_high_freq_factor",
                             "rope_low_freq_factor")
FLAGS = ("use_scaled_rope", "tie_word_embeddings")
ROPE_SCALING_KEYS = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(args, source: str, names: dict[str, str] | None = None) -> None:
    """Raise ValueError for the first value of `args` (a ModelArgs) the model cannot use.

    `names` maps ModelArgs fields to the keys of the source file (config.json's `hidden_size` for
    `dim`, ...), so the message names what the user sees in the file.
    """
    def fail(field: str, allowed: str):
        key = (names or {}).get(field, field)
        raise ValueError(f"{source}: {key} is {getattr(args, field)!r}; it must be {allowed}")

    for field, (lo, hi) in INTEGERS.items():
        value = getattr(args, field)
        if not is_int(value) or not lo <= value <= hi:
            fail(field, f"an integer from {lo} to {hi}")
    for field, (lo, hi) in OPTIONAL_INTEGERS.items():
        value = getattr(args, field)
        if value is not None and (not is_int(value) or not lo <= value <= hi):
            fail(field, f"an integer from {lo} to {hi}, or absent")
    if not is_int(args.vocab_size) or not (args.vocab_size == -1 or VOCAB[0] <= args.vocab_size <= VOCAB[1]):
        fail("vocab_size", f"an integer from {VOCAB[0]} to {VOCAB[1]} (or -1: from the tokenizer)")
    for field in POSITIVE_NUMBERS:
        if not is_number(getattr(args, field)) or not getattr(args, field) > 0:
            fail(field, "a finite number > 0")
    for field in OPTIONAL_POSITIVE_NUMBERS:
        value = getattr(args, field)
        if value is not None and (not is_number(value) or not value > 0):
            fail(field, "a finite number > 0, or absent")
    for field in FLAGS:
        if not isinstance(getattr(args, field), bool):
            fail(field, "true or false")
    _check_shapes(args, fail)
    _check_rope_scaling(args, source, fail)


def _check_shapes(args, fail) -> None:
    if args.dim % args.n_heads:
        fail("dim", f"divisible by the number of heads ({args.n_heads})")
    if args.n_heads % args.kv_heads:
        fail("n_kv_heads", f"a divisor of the number of heads ({args.n_heads})")
    if args.head_dim % 2:
        fail("dim", f"such that each head's width (dim / n_heads = {args.head_dim}) is even, as RoPE rotates pairs")


def _check_rope_scaling(args, source: str, fail) -> None:
    given = [key for key in ROPE_SCALING_KEYS if getattr(args, key) is not None]
    if given and not args.use_scaled_rope:
        raise ValueError(f"{source} sets {', '.join(given)} but not use_scaled_rope: true; add it or remove them")
    if args.use_scaled_rope:
        _, low, high, _ = args.rope_scaling
        if not low < high:
            raise ValueError(f"{source}: the RoPE low frequency factor ({low}) must be below the high "
                             f"frequency factor ({high})")
