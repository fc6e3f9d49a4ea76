"""The `llama` command: complete, chat and download (convert and bench where installed).

    llama complete --ckpt_dir llama-2-7b/ "The capital of France is"
    llama chat --ckpt_dir llama-2-7b-chat/ --system_prompt "Answer briefly."
    llama download 7B-chat          # Meta's signed URL flow; or: llama download stories15M
"""

import importlib
import importlib.util
import logging
import runpy
import sys

import fire

from llama.parallel import rank

# Subcommands that live in other modules, added when those modules are installed.
OPTIONAL_COMMANDS = {"convert": "llama.convert", "bench": "llama.bench"}


def setup_logging(log_level: str) -> None:
    level = getattr(logging, str(log_level).upper(), None)
    if not isinstance(level, int):
        raise ValueError(f"--log_level {log_level!r} is not one of debug, info, warning, error")
    if rank() != 0:
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device, dtype, seed, **options):
    from llama.generation import Llama

    return Llama.build(ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path,
                       max_seq_len=max_seq_len, max_batch_size=max_batch_size, seed=seed,
                       device=device, dtype=dtype, **options)


def complete(
    ckpt_dir: str,
    prompt: str | None = None,
    tokenizer_path: str | None = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_gen_len: int = 256,
    stop: str | list[str] | None = None,
    stop_token_ids: int | list[int] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str | None = None,
    compile: bool = False,
    memory_limit: str | None = None,
    seed: int = 1,
    echo: bool = True,
    log_level: str = "warning",
):
    """Continue a prompt, printing the text as it is generated.

    Args:
        ckpt_dir: checkpoint directory (params.json + consolidated.NN.pth).
        prompt: the text to continue; read from stdin when left out.
        tokenizer_path: tokenizer.model; found next to the checkpoint when left out.
        temperature: 0 for greedy decoding.
        top_p: nucleus sampling mass.
        max_seq_len: longest prompt + completion.
        max_gen_len: most tokens to generate.
        stop: a string or list of strings that end the completion (not printed).
        stop_token_ids: token ids that end the completion besides EOS (stories models: 1).
        device: auto, cpu, cuda, cuda:N or mps.
        dtype: auto, float32, float16 or bfloat16.
        quantize: int8 or int4 weight-only quantization while loading (7B fits a 12 GB GPU).
        compile: run the model through torch.compile.
        memory_limit: check the build against this size (e.g. 12GB) instead of the free memory.
        seed: sampling seed.
        echo: print the prompt before its continuation (--noecho: the new text only).
        log_level: debug, info, warning or error.
    """
    setup_logging(log_level)
    if prompt is None:
        if sys.stdin.isatty():
            raise ValueError("give a prompt: llama complete --ckpt_dir DIR \"text\" (or pipe it on stdin)")
        prompt = sys.stdin.read().removesuffix("\n")
    generator = build(ckpt_dir, tokenizer_path, max_seq_len, 1, device, dtype, seed,
                      quantize=quantize, compile=compile, memory_limit=memory_limit)
    pieces = generator.stream_text_completion(
        str(prompt), temperature=temperature, top_p=top_p, max_gen_len=max_gen_len, stop=stop,
        stop_token_ids=[int(t) for t in as_list(stop_token_ids)], echo=echo,
    )
    for piece in pieces:
        if rank() == 0:
            print(piece, end="", flush=True)
    if rank() == 0:
        print()


def chat(
    ckpt_dir: str,
    tokenizer_path: str | None = None,
    system_prompt: str | None = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 2048,
    max_gen_len: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: int | list[int] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str | None = None,
    compile: bool = False,
    memory_limit: str | None = None,
    seed: int = 1,
    log_level: str = "warning",
):
    """Chat with a Llama 2 chat model: keeps the conversation, /reset, /exit, Ctrl-C stops an answer.

    The oldest exchanges (never the system prompt) are dropped when the conversation would
    no longer fit max_seq_len.

    Args:
        ckpt_dir: checkpoint directory (params.json + consolidated.NN.pth).
        tokenizer_path: tokenizer.model; found next to the checkpoint when left out.
        system_prompt: instructions kept at the start of the conversation.
        temperature: 0 for greedy decoding.
        top_p: nucleus sampling mass.
        max_seq_len: longest conversation + answer the model sees.
        max_gen_len: most tokens per answer; by default up to a quarter of max_seq_len is kept free.
        stop: a string or list of strings that end an answer.
        stop_token_ids: token ids that end an answer besides EOS.
        device: auto, cpu, cuda, cuda:N or mps.
        dtype: auto, float32, float16 or bfloat16.
        quantize: int8 or int4 weight-only quantization while loading (7B fits a 12 GB GPU).
        compile: run the model through torch.compile.
        memory_limit: check the build against this size (e.g. 12GB) instead of the free memory.
        seed: sampling seed.
        log_level: debug, info, warning or error.
    """
    from llama.interactive import chat_loop

    setup_logging(log_level)
    generator = build(ckpt_dir, tokenizer_path, max_seq_len, 1, device, dtype, seed,
                      quantize=quantize, compile=compile, memory_limit=memory_limit)
    chat_loop(generator, system_prompt, max_gen_len, temperature=temperature, top_p=top_p, stop=stop,
              stop_token_ids=[int(t) for t in as_list(stop_token_ids)])


def download(
    models: str | list[str] | None = None,
    url: str | None = None,
    target_folder: str = ".",
    log_level: str = "warning",
):
    """Download Llama 2 weights with Meta's signed URL, or a tinyllamas stories model by name.

    Files are resumed when a download was interrupted, checked against Meta's md5 checklists
    and only given their final name once complete and verified.

    Args:
        models: comma-separated Llama 2 models (7B,13B,70B,7B-chat,13B-chat,70B-chat; all when
            left empty) or stories models (stories15M, stories42M, stories110M, stories260K).
        url: the signed URL from Meta's email; asked for when needed and left out.
        target_folder: where the files go.
        log_level: debug, info, warning or error.
    """
    from llama import download as dl

    setup_logging(log_level)
    names = [m.strip() for item in as_list(models) for m in str(item).split(",") if m.strip()]
    stories = [n for n in names if n in dl.STORIES]
    if stories and len(stories) != len(names):
        raise ValueError("download stories models and Llama 2 models in separate commands")
    if stories:
        for name in stories:
            print(f"{name}: downloaded to {dl.download_stories(name, target_folder)}")
        return
    if (url is None or not names) and not sys.stdin.isatty():
        raise ValueError("pass --url (the URL from Meta's email) and the models, e.g. "
                         "llama download 7B-chat --url URL")
    if url is None:
        url = input("Enter the URL from email: ").strip()
    if not names:
        answer = input(f"Enter the list of models to download without spaces ({','.join(dl.META_MODELS)}), "
                       "or press Enter for all: ").strip()
        names = [m for m in answer.split(",") if m] or list(dl.META_MODELS)
    for name, folder in zip(names, dl.download_meta(url, names, target_folder)):
        print(f"{name}: downloaded and verified in {folder}")


def _delegate(module_name: str, argv: list[str], name: str) -> None:
    """Run `python -m module_name ARGV` in this process, whatever parser the module uses."""
    sys.argv = [name, *argv]
    runpy.run_module(module_name, run_name="__main__", alter_sys=True)


def _listed(command: str, module_name: str):
    def run():
        pass  # never called: main() hands these commands to their module

    run.__doc__ = f"Same as python -m {module_name}; see: llama {command} --help"
    return run


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in OPTIONAL_COMMANDS:
        module_name = OPTIONAL_COMMANDS[argv[0]]
        if importlib.util.find_spec(module_name) is None:
            sys.exit(f"llama {argv[0]} is not available in this install ({module_name} is missing)")
        return _delegate(module_name, argv[1:], f"llama {argv[0]}")
    commands = {"complete": complete, "chat": chat, "download": download}
    for command, module_name in OPTIONAL_COMMANDS.items():
        if importlib.util.find_spec(module_name) is not None:
            commands[command] = _listed(command, module_name)
    try:
        fire.Fire(commands, command=argv, name="llama")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
