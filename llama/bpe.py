"""Byte-level BPE tokenizers: Meta's Llama 3 `tokenizer.model` (tiktoken ranks) and Hugging Face
`tokenizer.json` files (the `tokenizers` library).

Both encode special-token text found in ordinary text as plain text (never as the special token),
and split very long runs of whitespace or non-whitespace first, where Meta's Llama 3 tokenizer
does, so that tiktoken's regex never sees more than it can take.
"""

import base64
import binascii
import logging
import re
from collections.abc import Iterator

log = logging.getLogger(__name__)

# Meta's Llama 3 pre-tokenizer pattern (contractions, letters, 1-3 digits, punctuation, spaces).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Meta's names of the 256 special tokens after the 128,000 ranks (llama-models 0.3.0): twelve
# named ones, then reserved_special_token_2 .. 245.
LLAMA3_NAMED_SPECIAL = ("begin_of_text", "end_of_text", "reserved_special_token_0", "reserved_special_token_1",
                        "finetune_right_pad_id", "step_id", "start_header_id", "end_header_id", "eom_id",
                        "eot_id", "python_tag", "image")
N_SPECIAL = 256
# Meta's limits: tiktoken takes at most 400,000 characters at once, and a run of more than
# 25,000 whitespace or non-whitespace characters crashes its regex (openai/tiktoken#195).
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")


def llama3_special_tokens(n_ranks: int) -> dict[str, int]:
    """{"<|name|>": id} for the 256 special tokens that follow n_ranks ordinary ones."""
    names = list(LLAMA3_NAMED_SPECIAL)
    names += [f"reserved_special_token_{i}" for i in range(2, 2 + N_SPECIAL - len(names))]
    return {f"<|{name}|>": n_ranks + i for i, name in enumerate(names)}


def split_long_text(s: str) -> Iterator[str]:
    """s in pieces of at most MAX_ENCODE_CHARS characters, cut again inside every run of more than
    MAX_RUN_CHARS whitespace or non-whitespace characters, every MAX_RUN_CHARS from its start."""
    for start in range(0, len(s), MAX_ENCODE_CHARS):
        window = s[start : start + MAX_ENCODE_CHARS]
        if len(window) <= MAX_RUN_CHARS:
            yield window
            continue
        cut = 0
        for run in _RUNS.finditer(window):
            for at in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield window[cut:at]
                cut = at
        yield window[cut:]


def load_ranks(path: str) -> dict[bytes, int]:
    """{token bytes: rank} from a tiktoken file (`base64 rank` lines); ValueError naming a bad line."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(f"{path!r} line {n} is not 'base64-token rank'; the tiktoken file is "
                                 "damaged: download tokenizer.model again") from None
    return ranks


class TiktokenModel:
    """Meta's Llama 3 tokenizer: tiktoken ranks, Meta's pattern and special tokens."""

    kind = "tiktoken"

    def __init__(self, path: str):
        import tiktoken

        ranks = load_ranks(path)
        self.special_tokens = llama3_special_tokens(len(ranks))
        self.model = tiktoken.Encoding(name="llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.n_words = len(ranks) + len(self.special_tokens)

    def encode(self, s: str) -> list[int]:
        # disallowed_special=(): special-token text is encoded as the plain text it is.
        return [t for piece in split_long_text(s) for t in self.model.encode(piece, disallowed_special=())]

    def decode(self, t: list[int]) -> str:
        return self.model.decode(list(t))

    def id_to_piece(self, i: int) -> str:
        return self.model.decode_single_token_bytes(i).decode("utf-8", errors="replace")


class TokenizerJsonModel:
    """A Hugging Face tokenizer.json, read with the `tokenizers` library."""

    kind = "tokenizer.json"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.model = HFTokenizer.from_file(path)
        except Exception as e:  # the library raises a plain Exception for a malformed file
            raise ValueError(f"{path!r} is not a tokenizer.json the tokenizers library can read ({e})") from None
        self.model.encode_special_tokens = True  # special-token text in user text stays plain text
        added = self.model.get_added_tokens_decoder()
        self.special_tokens = {tok.content: i for i, tok in sorted(added.items()) if tok.special}
        self.n_words = self.model.get_vocab_size(with_added_tokens=True)

    def encode(self, s: str) -> list[int]:
        # One piece at a time: encode_batch would start the library's thread pool, which then
        # warns in every process forked later (torchrun workers, subprocesses).
        return [t for piece in split_long_text(s) for t in self.model.encode(piece, add_special_tokens=False).ids]

    def decode(self, t: list[int]) -> str:
        return self.model.decode(list(t), skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.model.id_to_token(i)
