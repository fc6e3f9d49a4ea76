"""Interactive chat: a REPL that keeps the dialog, fits it into max_seq_len and streams answers."""

import logging
import sys

import torch

from llama.chat import Dialog, Message, check_dialog, encode_dialog
from llama.generation import Llama
from llama.parallel import patient_group, rank, world_size

log = logging.getLogger(__name__)

HELP = (
    "Type a message and press Enter (end a line with \\ to continue it on the next).\n"
    "  /reset  forget the conversation (keeps the system prompt)\n"
    "  /exit   quit (Ctrl-D too); Ctrl-C stops the current answer"
)


class ChatSession:
    """The dialog so far; each `ask` trims the oldest exchanges until the prompt fits."""

    def __init__(self, generator: Llama, system_prompt: str | None = None,
                 max_gen_len: int | None = None, **sampling):
        self.generator = generator
        self.system: list[Message] = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.max_gen_len = max_gen_len
        self.sampling = sampling  # temperature, top_p, stop, stop_token_ids, seed
        self.history: list[Message] = []  # user, assistant, user, assistant, ...
        self.turn = 0
        self.dropped = 0  # exchanges dropped by the last fit
        max_seq_len = generator.model.max_seq_len
        # Room kept for the answer when deciding what to trim.
        self.reserve = min(max_gen_len or max_seq_len // 4, max_seq_len - 1)

    def reset(self) -> None:
        self.history = []

    def fit(self, user: str) -> tuple[Dialog, list[int]]:
        """The dialog for this message and its tokens, dropping the oldest exchanges to fit."""
        max_seq_len = self.generator.model.max_seq_len
        message: Message = {"role": "user", "content": user}
        check_dialog(self.system + [message], self.generator.tokenizer)
        self.dropped = 0
        while True:
            dialog = self.system + self.history + [message]
            tokens = encode_dialog(self.generator.tokenizer, dialog)
            if len(tokens) + self.reserve <= max_seq_len or not self.history:
                break
            del self.history[:2]
            self.dropped += 1
            log.info("dropped the oldest exchange to fit max_seq_len=%d (%d left)", max_seq_len,
                     len(self.history) // 2)
        if len(tokens) >= max_seq_len:
            raise ValueError(
                f"this message needs {len(tokens)} tokens with the system prompt, more than "
                f"max_seq_len={max_seq_len} allows; shorten it or raise --max_seq_len"
            )
        return dialog, tokens

    def ask(self, user: str):
        """Yield the answer in pieces; what was yielded is kept in the history, even if stopped early."""
        dialog, tokens = self.fit(user)
        self.turn += 1
        log.debug("turn %d: %d earlier exchanges, %d prompt tokens: %s", self.turn,
                  len(self.history) // 2, len(tokens), tokens)
        answer = []
        try:
            for piece in self.generator.stream_chat_completion(dialog, max_gen_len=self.max_gen_len,
                                                               **self.sampling):
                answer.append(piece)
                yield piece
        finally:
            text = "".join(answer)
            log.debug("turn %d answer: %r", self.turn, text)
            self.history += [dialog[-1], {"role": "assistant", "content": text}]


def read_message(prompt: str, echo: bool) -> str:
    """One message from stdin; a line ending in a backslash continues on the next."""
    lines = []
    while True:
        line = input(prompt if not lines else "... ")
        if echo:
            print(line)
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def _line_editing() -> None:
    """Arrow keys and history for input() on a terminal; input() then also writes its prompt to
    stdout (without readline, Python writes it to stderr)."""
    try:
        import readline  # noqa: F401
    except ImportError:  # Windows, or Python built without it
        pass


def _next_message(tty: bool, group) -> str | None:
    """The user's next message (None at the end of input). Under torchrun rank 0 reads it and
    every other rank receives it through `group`, so all ranks run the same turns."""
    text = None
    if rank() == 0:
        try:
            text = read_message("> ", echo=not tty).strip()
        except EOFError:
            print()
    if world_size() > 1:
        box = [text]
        torch.distributed.broadcast_object_list(box, src=0, group=group)
        text = box[0]
    return text


def _say(*args, **kwargs) -> None:
    if rank() == 0:
        print(*args, **kwargs)


def chat_loop(generator: Llama, system_prompt: str | None = None, max_gen_len: int | None = None,
              **sampling) -> None:
    """Run the REPL on stdin/stdout until /exit or end of input (under torchrun: rank 0's terminal;
    there Ctrl-C ends the chat, as every rank receives it)."""
    session = ChatSession(generator, system_prompt, max_gen_len, **sampling)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 become U+FFFD, not a crash
    tty = sys.stdin.isatty()
    group = patient_group() if world_size() > 1 else None  # waiting for a person never times out
    if tty:
        _line_editing()
        _say("Chat with the model. /help lists the commands.", file=sys.stderr)
    while True:
        try:
            text = _next_message(tty, group)
        except KeyboardInterrupt:
            if world_size() > 1:
                raise
            print()
            continue
        if text is None or text in ("/exit", "/quit"):
            return
        if not text:
            continue
        if text == "/reset":
            session.reset()
            _say("(conversation cleared)")
            continue
        if text == "/help" or text.startswith("/"):
            _say(HELP if text == "/help" else f"unknown command {text.split()[0]}; /help lists them")
            continue
        _answer(session, text)


def _answer(session: ChatSession, text: str) -> None:
    stream = session.ask(text)
    try:
        for i, piece in enumerate(stream):
            if i == 0 and session.dropped:
                _say(f"(forgot the {session.dropped} oldest exchange(s) to fit max_seq_len)")
            _say(piece, end="", flush=True)
    except KeyboardInterrupt:
        if world_size() > 1:
            raise
        stream.close()
        _say(" [stopped]", end="")
    except ValueError as e:
        _say(f"error: {e}", end="")
    _say("\n")
