"""Command-line flags made from the option dataclasses, all checked before any work is done.

Every command of the package (the `llama` subcommands, the examples, `python -m llama.memory`,
`llama.quantize`, `llama.convert`) parses with `Parser`: an unknown flag, a stray word or a value
of the wrong type is one error line with the valid flags, exit code 2. `run` turns the errors a
user can cause into one line and exit code 1, and Ctrl-C into exit code 130.
"""

import argparse
import ast
import dataclasses
import difflib
import logging
import os
import sys

from llama.options import REQUIRED, BuildOptions, GenerationOptions
from llama.progress import set_quiet

log = logging.getLogger(__name__)
# The build and sampling flags of the commands that generate (Meta's flag names).
BUILD = ("ckpt_dir", "tokenizer_path", "max_seq_len", "max_batch_size", "device", "dtype", "quantize",
         "group_size", "compile", "memory_limit", "seed", "threads")
SAMPLING = ("temperature", "top_p", "max_gen_len", "stop", "stop_token_ids")
USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError)


class Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for a misspelled flag, and no abbreviated flags (a prefix such as
    --max_gen would otherwise be taken silently for --max_gen_len)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        if "unrecognized arguments:" in message:
            words = message.split(":", 1)[1].split()
            near = [m for w in words if w.startswith("--")
                    for m in difflib.get_close_matches(w.split("=")[0], flags, n=1)]
            if near:
                message += f" (did you mean {', '.join(near)}?)"
        self.exit(2, f"{self.format_usage()}{self.prog}: error: {message}\n  valid flags: {' '.join(sorted(flags))}\n")


class ListValue(argparse.Action):
    """A flag that may repeat; each value is one item, or a list written as '["a", "b"]'."""

    def __init__(self, *args, item=str, **kwargs):
        self.item = item
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        items = [value]
        if value.strip().startswith("["):
            try:
                items = list(ast.literal_eval(value))
            except (ValueError, SyntaxError):
                parser.error(f"{option_string} {value!r} is not a list like '[\"a\", \"b\"]'")
        try:
            items = [self.item(v) for v in items]
        except (TypeError, ValueError):
            parser.error(f"{option_string} {value!r}: each value must be a {self.item.__name__}")
        current = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, [*(current or []), *items])


def add_options(parser: argparse.ArgumentParser, cls, names: tuple[str, ...], **defaults) -> None:
    """A flag --NAME for each named field of the options dataclass cls (defaults may differ)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        meta, default = fields[name].metadata, defaults.get(name, fields[name].default)
        shown = "" if default in (None, (), False, REQUIRED) else f" (default: {default})"
        flag = f"--{name}"
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default, help=meta["help"] + shown)
            parser.add_argument(f"--no{name}", dest=name, action="store_false", help=argparse.SUPPRESS)
        elif "list" in meta:
            parser.add_argument(flag, action=ListValue, item=meta["list"], default=None, help=meta["help"])
        else:
            parser.add_argument(flag, type=meta.get("type", str), choices=meta.get("choices"),
                                required=default is REQUIRED, default=None if default is REQUIRED else default,
                                help=meta["help"] + shown)


def pick(cls, namespace: argparse.Namespace) -> dict:
    """The fields of cls that namespace has (lists of None left out, so the default applies)."""
    fields = [f for f in dataclasses.fields(cls) if hasattr(namespace, f.name)]
    return {f.name: getattr(namespace, f.name) for f in fields
            if getattr(namespace, f.name) is not None or "list" not in f.metadata}


def generation_flags(parser: argparse.ArgumentParser, build: tuple[str, ...] = BUILD, **defaults) -> None:
    """The build and sampling flags (--ckpt_dir required) and --log_level."""
    names = {f.name for f in dataclasses.fields(GenerationOptions)}
    add_options(parser, BuildOptions, build, ckpt_dir=REQUIRED,
                **{k: v for k, v in defaults.items() if k not in names})
    add_options(parser, GenerationOptions, SAMPLING, **{k: v for k, v in defaults.items() if k in names})
    add_logging(parser)


def start(args: argparse.Namespace, **build) -> tuple:
    """Logging set up, the Llama built from the flags, and the generation options the flags give."""
    from llama.generation import Llama
    from llama.parallel import rank

    setup_logging(args, rank())
    generator = Llama.build(**pick(BuildOptions, args), **build)
    options = pick(GenerationOptions, args)
    options.pop("seed", None)  # the build's seed seeds sampling
    return generator, options


def add_logging(parser: argparse.ArgumentParser, default: str = "warning") -> None:
    parser.add_argument("--log_level", default=default, choices=("debug", "info", "warning", "error"),
                        help=f"what the library logs to stderr (default: {default})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or status lines on stderr")


def setup_logging(args: argparse.Namespace, rank: int = 0) -> None:
    """Logs (rank 0 only, but errors) and progress on stderr as the flags say."""
    level = logging.ERROR if rank != 0 else getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    set_quiet(args.quiet)


def run(main, argv: list[str] | None = None) -> None:
    """Call main(argv); a user error ends with one line on stderr (exit 1), Ctrl-C with exit 130.
    LLAMA_DEBUG=1 shows the traceback instead."""
    try:
        main(argv)
    except KeyboardInterrupt:
        if os.environ.get("LLAMA_DEBUG") == "1":
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        if os.environ.get("LLAMA_DEBUG") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
