"""Tokenizer: a thin wrapper over a sentencepiece model, with Meta's method names."""

import logging
import os

from sentencepiece import SentencePieceProcessor

log = logging.getLogger(__name__)


class Tokenizer:
    """Encodes and decodes text with a sentencepiece `tokenizer.model`."""

    def __init__(self, model_path: str):
        if os.path.isdir(model_path):
            raise ValueError(f"--tokenizer_path {model_path!r} is a folder; pass the tokenizer.model file in it")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer file {model_path!r} not found; pass --tokenizer_path")
        self.path = model_path
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(model_path)
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"{model_path!r} is not a sentencepiece model ({e}); pass the tokenizer.model "
                "that came with the checkpoint as --tokenizer_path"
            ) from None
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        log.debug("tokenizer %s: %d words, bos %d, eos %d", model_path, self.n_words, self.bos_id, self.eos_id)

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
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: list[int]) -> str:
        """Text of the token ids t."""
        return self.sp_model.decode(list(t))

    def id_to_piece(self, i: int) -> str:
        return self.sp_model.id_to_piece(i)

    def decode_pieces(self, t: list[int]) -> list[str]:
        """The text each token adds, with the spaces a lone-token decode would drop."""
        pieces, prev = [], ""
        for i in range(len(t)):
            text = self.decode(t[: i + 1])
            pieces.append(text[len(prev):] if text.startswith(prev) else text)
            prev = text
        return pieces
