"""Tokenizer: Meta's method names over the three kinds of tokenizer file Llama checkpoints come with.

  sentencepiece   Llama 2's tokenizer.model (a protobuf)
  tiktoken        Llama 3's tokenizer.model (base64 token + rank lines; `llama.bpe`)
  tokenizer.json  Hugging Face's tokenizer file (`llama.bpe`, read with the `tokenizers` library)

and the tokenizer embedded in a GGUF file (`llama.gguf_vocab`), which works as one of the first two.

The kind is found from the file's contents, never from its name.
"""

import logging
import os
import re

log = logging.getLogger(__name__)

KINDS = ("sentencepiece", "tiktoken", "tokenizer.json")
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2}[ \t]+[0-9]+\r?$")
# (BOS, EOS, pad, stop tokens after EOS) of a BPE tokenizer, by Meta's special-token names.
LLAMA3_IDS = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", ("<|eom_id|>", "<|eot_id|>"))
LLAMA2_IDS = ("<s>", "</s>", None, ())


def tokenizer_kind(path: str) -> str:
    """"sentencepiece", "tiktoken" or "tokenizer.json", from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.lstrip().startswith(b"{"):
        return "tokenizer.json"
    if _TIKTOKEN_LINE.match(head.split(b"\n", 1)[0]):
        return "tiktoken"
    return "sentencepiece"


def file_name(path: str) -> str:
    """The name a tokenizer file goes by beside a checkpoint: tokenizer.json or tokenizer.model."""
    return "tokenizer.json" if tokenizer_kind(path) == "tokenizer.json" else "tokenizer.model"


class SentencePieceModel:
    """Llama 2's sentencepiece tokenizer.model."""

    kind = "sentencepiece"

    def __init__(self, path: str):
        from sentencepiece import SentencePieceProcessor

        self.model = SentencePieceProcessor()
        try:
            self.model.Load(path)
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"{path!r} is not a sentencepiece model ({e}), nor a Llama 3 tiktoken file or a "
                "tokenizer.json; pass the tokenizer.model that came with the checkpoint as --tokenizer_path"
            ) from None
        self.n_words = self.model.vocab_size()
        self.special_tokens: dict[str, int] = {}
        self.ids = (self.model.bos_id(), self.model.eos_id(), self.model.pad_id(), [])

    def encode(self, s: str) -> list[int]:
        return self.model.encode(s)

    def decode(self, t: list[int]) -> str:
        return self.model.decode(list(t))

    def id_to_piece(self, i: int) -> str:
        return self.model.id_to_piece(i)


def _bpe_ids(model, path: str) -> tuple[int, int, int, list[int]]:
    """(bos, eos, pad, stop tokens after EOS) of a BPE tokenizer from its special tokens."""
    vocab = {**model.special_tokens}
    if model.kind == "tokenizer.json":
        vocab = {**model.model.get_vocab(with_added_tokens=True), **vocab}
    for bos, eos, pad, stops in (LLAMA3_IDS, LLAMA2_IDS):
        if bos in vocab and eos in vocab:
            return vocab[bos], vocab[eos], vocab.get(pad, -1), [vocab[s] for s in stops if s in vocab]
    raise ValueError(f"{path!r} has neither Llama 3's <|begin_of_text|> / <|end_of_text|> nor Llama 2's "
                     "<s> / </s> tokens; pass the tokenizer that came with the checkpoint as --tokenizer_path")


def open_model(path: str):
    """The tokenizer model of a file, by its kind."""
    from llama.bpe import TiktokenModel, TokenizerJsonModel
    from llama.formats.gguf import is_gguf, read_vocab_fields

    if is_gguf(path):  # the tokenizer embedded in a GGUF file's metadata
        from llama.gguf_vocab import read_vocab

        # The weights are read from the same reader after, without its per-token arrays.
        return read_vocab_fields(path, lambda reader: read_vocab(path, reader))
    kind = tokenizer_kind(path)
    model = {"sentencepiece": SentencePieceModel, "tiktoken": TiktokenModel,
             "tokenizer.json": TokenizerJsonModel}[kind](path)
    if kind != "sentencepiece":
        model.ids = _bpe_ids(model, path)
    return model


class Tokenizer:
    """Encodes and decodes text with a checkpoint's tokenizer: Llama 2's sentencepiece
    `tokenizer.model`, Llama 3's tiktoken `tokenizer.model`, or a Hugging Face `tokenizer.json`.

    `kind` says which. `stop_tokens` are the ids that end a generation (Meta's name): EOS, and
    for Llama 3 also `<|eom_id|>` and `<|eot_id|>`. `special_tokens` maps special-token text to
    its id (empty for sentencepiece). `encode` treats special-token text in `s` as plain text.
    """

    def __init__(self, model_path: str):
        if os.path.isdir(model_path):
            raise ValueError(f"--tokenizer_path {model_path!r} is a folder; pass the tokenizer.model "
                             "(or tokenizer.json) file in it")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer file {model_path!r} not found; pass --tokenizer_path")
        self.path = model_path
        self.backend = open_model(model_path)
        self.kind: str = self.backend.kind
        # The library's own object under Meta's names: `sp_model` (Llama 2), `model` (Llama 3).
        self.model = self.backend.model
        if self.kind == "sentencepiece":
            self.sp_model = self.model
        self.n_words: int = self.backend.n_words
        self.bos_id, self.eos_id, self.pad_id, stops = self.backend.ids
        self.stop_tokens: list[int] = [self.eos_id, *stops]
        self.special_tokens: dict[str, int] = self.backend.special_tokens
        log.debug("tokenizer %s (%s): %d words, bos %d, eos %d, stop %s", model_path, self.kind, self.n_words,
                  self.bos_id, self.eos_id, self.stop_tokens)

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of s, with BOS and/or EOS added."""
        if not isinstance(s, str):
            raise TypeError(f"text to encode must be a str, not {type(s).__name__}")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the text has a lone surrogate {s[e.start]!r} at character {e.start} (not "
                             "valid Unicode, often from a bad decode); fix the text or decode it with "
                             "errors='replace'") from None
        t = self.backend.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: list[int]) -> str:
        """Text of the token ids t."""
        return self.backend.decode(t)

    def id_to_piece(self, i: int) -> str:
        return self.backend.id_to_piece(i)

    def decode_pieces(self, t: list[int]) -> list[str]:
        """The text each token adds, with the spaces a lone-token decode would drop."""
        pieces, prev = [], ""
        for i in range(len(t)):
            text = self.decode(t[: i + 1])
            pieces.append(text[len(prev):] if text.startswith(prev) else text)
            prev = text
        return pieces
