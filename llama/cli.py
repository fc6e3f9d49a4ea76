"""The `llama` command: complete, chat, download, and convert.

    llama complete --ckpt_dir llama-2-7b/ "The capital of France is"
    llama chat --ckpt_dir llama-2-7b-chat/ --system_prompt "Answer briefly."
    llama download 7B-chat          # Meta's signed URL flow (or Llama3.1-8B-Instruct); or: stories15M
    llama convert SRC DST --to hf
"""

import importlib
import importlib.util
import runpy
import sys

from llama import flags
from llama.options import GenerationOptions
from llama.parallel import rank

# Subcommands that live in other modules, added when those modules are installed.
OPTIONAL_COMMANDS = {"convert": "llama.convert"}
BUILD_FLAGS = tuple(f for f in flags.BUILD if f != "max_batch_size")  # one prompt at a time


def complete(args) -> None:
    """Continue a prompt, printing the text as it is generated."""
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise ValueError("give a prompt: llama complete --ckpt_dir DIR \"text\" (or pipe it on stdin)")
        prompt = sys.stdin.read().removesuffix("\n")
    generator, options = flags.start(args, max_batch_size=1)
    for piece in generator.stream_text_completion(prompt, **options):
        if rank() == 0:
            print(piece, end="", flush=True)
    if rank() == 0:
        print()


def chat(args) -> None:
    """Chat with a Llama 2 chat or Llama 3.x Instruct model: keeps the conversation, /reset, /exit,
    Ctrl-C stops an answer."""
    from llama.interactive import chat_loop

    generator, options = flags.start(args, max_batch_size=1)
    chat_loop(generator, args.system_prompt, **options)


def download(args) -> None:
    """Download Llama 2 or Llama 3.x weights with Meta's signed URL, or a tinyllamas stories model by name."""
    from llama import download as dl

    names = [m.strip() for item in args.models for m in str(item).split(",") if m.strip()]
    meta = {**dl.META_MODELS, **dl.LLAMA3_MODELS}
    unknown = [n for n in names if n not in dl.STORIES and n not in meta]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join([*meta, *dl.STORIES])}")
    stories = [n for n in names if n in dl.STORIES]
    if stories and len(stories) != len(names):
        raise ValueError("download stories models and Meta's Llama models in separate commands")
    if stories:
        for name in stories:
            print(f"{name}: downloaded to {dl.download_stories(name, args.target_folder)}")
        return
    url = args.url
    if (url is None or not names) and not sys.stdin.isatty():
        raise ValueError("pass --url (the URL from Meta's email) and the models, e.g. "
                         "llama download 7B-chat --url URL")
    if url is None:
        url = input("Enter the URL from email: ").strip()
    if not names:
        answer = input(f"Enter the list of models to download without spaces ({','.join(dl.META_MODELS)}, "
                       f"or Llama 3.x ids such as Llama3.1-8B-Instruct), or press Enter for all Llama 2 models: ")
        names = [m for m in answer.strip().split(",") if m] or list(dl.META_MODELS)
    for name, folder in zip(names, dl.download_meta(url, names, args.target_folder)):
        print(f"{name}: downloaded and verified in {folder}")


def parser() -> flags.Parser:
    top = flags.Parser(prog="llama", description="Run Llama checkpoints: complete, chat, download, convert.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=flags.Parser)
    p = commands.add_parser("complete", help=complete.__doc__, description=complete.__doc__)
    p.add_argument("prompt", nargs="?", help="the text to continue; read from stdin when left out")
    flags.generation_flags(p, BUILD_FLAGS, max_gen_len=256)
    flags.add_options(p, GenerationOptions, ("echo",), echo=True)
    p.set_defaults(run=complete)
    p = commands.add_parser("chat", help=chat.__doc__, description=chat.__doc__)
    flags.generation_flags(p, BUILD_FLAGS, max_seq_len=2048)
    p.add_argument("--system_prompt", help="instructions kept at the start of the conversation")
    p.set_defaults(run=chat)
    p = commands.add_parser("download", help=download.__doc__, description=download.__doc__)
    p.add_argument("models", nargs="*", help="Llama 2: 7B,13B,70B,7B-chat,13B-chat,70B-chat (all when left "
                   "out); Llama 3.x: Meta's model ids, e.g. Llama3.2-1B-Instruct, Llama3.1-8B, Llama-3-8B; or "
                   "stories15M, stories42M, stories110M, stories260K")
    p.add_argument("--url", help="the signed URL from Meta's email; asked for when needed and left out")
    p.add_argument("--target_folder", default=".", help="where the files go (default: .)")
    p.set_defaults(run=download)
    for name, module_name in OPTIONAL_COMMANDS.items():
        if importlib.util.find_spec(module_name) is not None:
            commands.add_parser(name, help=f"same as python -m {module_name}; see: llama {name} --help",
                                add_help=False)
    flags.add_logging(commands.choices["download"])
    top.commands = commands.choices
    return top


def _delegate(module_name: str, argv: list[str], name: str) -> None:
    """Run `python -m module_name ARGV` in this process."""
    sys.argv = [name, *argv]
    runpy.run_module(module_name, run_name="__main__", alter_sys=True)


def _main(argv: list[str]) -> None:
    if argv and argv[0] in OPTIONAL_COMMANDS:
        module_name = OPTIONAL_COMMANDS[argv[0]]
        if importlib.util.find_spec(module_name) is None:
            sys.exit(f"llama {argv[0]} is not available in this install ({module_name} is missing)")
        return _delegate(module_name, argv[1:], f"llama {argv[0]}")
    top = parser()
    if argv and argv[0] in top.commands:  # the subcommand's own parser names its own flags in errors
        args = top.commands[argv[0]].parse_args(argv[1:])
    else:
        args = top.parse_args(argv)  # help, or a usage error
    if argv[0] == "download":
        flags.setup_logging(args)
    args.run(args)


def main(argv: list[str] | None = None) -> None:
    flags.run(_main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
