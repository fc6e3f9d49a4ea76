"""Chat prompt formats, picked from the tokenizer: Llama 3's header format, whose turns are
`<|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>`, and Llama 2's `[INST] ... [/INST]`
turns with a `<<SYS>>` block. `encode_dialog` is the one entry for both.
"""

from typing import Literal, TypedDict

from llama.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant", "ipython", "tool"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = list[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
# Llama 3's header tokens; a tool's answer has the header "ipython" (Meta's "tool" role).
START_HEADER, END_HEADER, END_OF_TURN = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
LLAMA3_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "ipython": "ipython", "tool": "ipython"}


def chat_format(tokenizer: Tokenizer) -> str:
    """"llama3" when the tokenizer has Llama 3's header tokens, else "llama2"."""
    return "llama3" if START_HEADER in tokenizer.special_tokens else "llama2"


def check_dialog(dialog: Dialog, tokenizer: Tokenizer | None = None) -> None:
    """Raise ValueError for a dialog the tokenizer's chat format cannot encode (Llama 2's
    format when no tokenizer is given)."""
    if not dialog:
        raise ValueError("empty dialog; a dialog needs at least one user message")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or "role" not in msg or not isinstance(msg.get("content"), str):
            raise ValueError(f"message {i} must be a dict with 'role' and a str 'content', got {msg!r}")
    if tokenizer is not None and chat_format(tokenizer) == "llama3":
        return _check_llama3(dialog)
    for i, msg in enumerate(dialog):
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


def _check_llama3(dialog: Dialog) -> None:
    for i, msg in enumerate(dialog):
        if msg["role"] not in LLAMA3_ROLES:
            raise ValueError(f"message {i} has role {msg['role']!r}; Llama 3 roles are {', '.join(LLAMA3_ROLES)}")
    if all(msg["role"] == "system" for msg in dialog):
        raise ValueError("the dialog has only a system message; add a user message after it")
    if dialog[-1]["role"] == "assistant":
        raise ValueError("the last message is the assistant's; end the dialog with the user's message")


def _header(tokenizer: Tokenizer, role: str) -> list[int]:
    special = tokenizer.special_tokens
    return ([special[START_HEADER]] + tokenizer.encode(role, bos=False, eos=False) + [special[END_HEADER]]
            + tokenizer.encode("\n\n", bos=False, eos=False))


def _encode_llama3(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """BOS, then each message as header + content + <|eot_id|>, then the assistant's header.
    The content is encoded as it is (not stripped), as Meta's llama-models ChatFormat does."""
    tokens = [tokenizer.bos_id]
    for msg in dialog:
        tokens += _header(tokenizer, LLAMA3_ROLES[msg["role"]])
        tokens += tokenizer.encode(msg["content"], bos=False, eos=False)
        tokens.append(tokenizer.special_tokens[END_OF_TURN])
    return tokens + _header(tokenizer, "assistant")


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """Token ids of a dialog in the tokenizer's chat format (Llama 3's header format or Llama 2's
    [INST] template), ending where the assistant's answer begins.

    Raises ValueError (one line) for a dialog that format cannot encode.
    """
    check_dialog(dialog, tokenizer)
    if chat_format(tokenizer) == "llama3":
        return _encode_llama3(tokenizer, dialog)
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
