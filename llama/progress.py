"""Progress bars: shown on a terminal by rank 0 for work big enough to wait for, silent otherwise."""

import sys

from tqdm import tqdm

from llama.parallel import rank


def progress(iterable=None, total=None, desc: str | None = None, show: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr; a silent pass-through unless `show`, stderr is a terminal and rank is 0."""
    enabled = show and sys.stderr.isatty() and rank() == 0
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, file=sys.stderr, **kwargs)
