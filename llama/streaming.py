"""Text of a generating row: stop strings and the text deltas a stream emits.

A row's text is always `decode(all its tokens)`, cut before the first stop string; a stream
emits the growth of that text, holding back an incomplete UTF-8 character (decoded as U+FFFD)
and any tail that could still become a stop string, so the deltas add up to the final text.
"""

from llama.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


def as_stop_list(stop) -> list[str]:
    """None, one string or a list of strings -> a list of non-empty stop strings."""
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else list(stop)
    for s in items:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    return items


def cut_at_stop(text: str, stop: list[str], start: int = 0) -> tuple[str, bool]:
    """(text before the earliest stop string found at or after `start`, whether one was found)."""
    hits = [i for s in stop if (i := text.find(s, start)) != -1]
    if not hits:
        return text, False
    return text[: min(hits)], True


def held_back(text: str, stop: list[str]) -> int:
    """Number of trailing characters that may still change: U+FFFD run or a stop-string prefix."""
    n = len(text) - len(text.rstrip(REPLACEMENT_CHAR))
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


class RowText:
    """The text of one row as its tokens grow; `skip` tokens (an echoed prompt) are never searched."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], skip: int = 0):
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip = skip
        self.n_tokens = -1
        self.text = ""
        self.stopped = False
        self.emitted = 0
        self._skip_chars = 0
        self._searched = 0

    def update(self, tokens: list[int]) -> bool:
        """Decode `tokens` (the row so far); returns True once a stop string has appeared."""
        if self.stopped or len(tokens) == self.n_tokens:
            return self.stopped
        if self.n_tokens == -1 and self.skip:
            self._skip_chars = self._searched = len(self.tokenizer.decode(tokens[: self.skip]))
        self.n_tokens = len(tokens)
        full = self.tokenizer.decode(tokens)
        if self.stop:
            # A stop string can only start in the last max(len(stop)) - 1 characters searched.
            start = max(self._skip_chars, self._searched - max(map(len, self.stop)) + 1)
            full, self.stopped = cut_at_stop(full, self.stop, start)
            self._searched = len(full)
        self.text = full
        return self.stopped

    def delta(self, final: bool = False) -> str:
        """Text not emitted yet; with final=False, minus the tail that may still change."""
        end = len(self.text) if final or self.stopped else len(self.text) - held_back(self.text, self.stop)
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
