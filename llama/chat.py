"""The Llama 2 chat prompt format: [INST] ... [/INST] turns with a <<SYS>> block."""

from typing import Literal, TypedDict

from llama.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = list[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]


def check_dialog(dialog: Dialog) -> None:
    """Raise ValueError for a dialog the Llama 2 template cannot encode."""
    if not dialog:
        raise ValueError("empty dialog; a dialog needs at least one user message")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {msg!r}")
        for tag in SPECIAL_TAGS:
            if tag in msg["content"]:
                raise ValueError(
                    f"message {i} ({msg['role']}) contains the special tag {tag!r}; remove it"
                )
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    if not turns:
        raise ValueError("the dialog has only a system message; add a user message after it")
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            where = i + (len(dialog) - len(turns))
            raise ValueError(
                f"message {where} has role {msg['role']!r} but {expected!r} was expected: after an "
                "optional system message, roles must alternate user/assistant"
            )
    if turns[-1]["role"] != "user":
        raise ValueError("the last message must be from the user")


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """Token ids of a dialog in the Llama 2 chat template, ready for the assistant's answer."""
    check_dialog(dialog)
    if dialog[0]["role"] == "system":
        first = dialog[1]
        merged = B_SYS + dialog[0]["content"] + E_SYS + first["content"]
        dialog = [{"role": first["role"], "content": merged}] + list(dialog[2:])
    tokens: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        exchange = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        tokens += tokenizer.encode(exchange, bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens
