"""What a person sees while waiting: progress bars and status lines on stderr.

Shown only on a terminal, by rank 0, and not after `set_quiet()` (the commands' --quiet); never
on stdout, which carries the generated text alone. Both appear only for work that lasts longer
than DELAY seconds, so quick steps stay silent.
"""

import sys
import threading
import time
from contextlib import contextmanager

from tqdm import tqdm

from llama.parallel import rank

DELAY = 1.0
_quiet = False


def set_quiet(quiet: bool = True) -> None:
    global _quiet
    _quiet = quiet


def visible() -> bool:
    return not _quiet and sys.stderr.isatty() and rank() == 0


def progress(iterable=None, total=None, desc: str | None = None, show: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr that appears after DELAY seconds; a silent pass-through unless `show`
    and visible()."""
    return tqdm(iterable, total=total, desc=desc, disable=not (show and visible()), file=sys.stderr,
                delay=DELAY, **kwargs)


def note(message: str) -> None:
    """One line on stderr, when visible()."""
    if visible():
        print(message, file=sys.stderr, flush=True)


@contextmanager
def status(message: str):
    """'message ...' on stderr if the work inside takes longer than DELAY, then how long it took."""
    shown = threading.Event()
    start = time.time()

    def show():
        print(f"{message} ...", end="", file=sys.stderr, flush=True)
        shown.set()

    timer = threading.Timer(DELAY, show)
    if visible():
        timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if shown.is_set():
            print(f" {time.time() - start:.0f} s", file=sys.stderr, flush=True)
