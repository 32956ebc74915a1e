"""The chat template: messages -> token ids, plus a mask of the tokens to train on.

One renderer serves SFT, DPO and chat, so a model is always trained on exactly
the layout it later sees. The layout is ChatML:

    <|im_start|>system\\n{system prompt}<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

<|im_start|> and <|im_end|> enter only as their fixed ids (encode() never
produces them, so text in the data cannot forge a turn). The header
"role\\n" and the content are encoded separately: the boundary between prompt
and answer is then the same token boundary whatever the text, and BPE never
merges a header piece with the first piece of the content.

The mask is True on the tokens an assistant "says": its content and its
closing <|im_end|> (so the model learns to stop). Headers, the newline after
<|im_end|>, and system/user turns are context only.
"""

from __future__ import annotations

from nanobumble.data import DataError
from nanobumble.tokenizer import IM_END_ID, IM_START_ID, Tokenizer

DEFAULT_SYSTEM_PROMPT = "You are Bumblebee, a helpful AI assistant."
ROLES = ("system", "user", "assistant")


def render_turn(role: str, content: str, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """One turn: <|im_start|> role\\n content <|im_end|> \\n, with its training mask."""
    header = [IM_START_ID] + tokenizer.encode(f"{role}\n")
    body = tokenizer.encode(content) + [IM_END_ID]
    newline = tokenizer.encode("\n")
    trained = role == "assistant"
    return header + body + newline, [False] * len(header) + [trained] * len(body) + [False] * len(newline)


def generation_prompt(tokenizer: Tokenizer) -> list[int]:
    """The header that asks the model to answer: <|im_start|> assistant\\n."""
    return [IM_START_ID] + tokenizer.encode("assistant\n")


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend a system turn unless the conversation has one or system_prompt is empty/None."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": system_prompt}] + list(messages)


def render(messages: list[dict], tokenizer: Tokenizer, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
           add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and the mask of the tokens to train on.

    messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
    A system message in the data is always kept; otherwise system_prompt (when
    not None or "") becomes the first turn. add_generation_prompt appends the
    assistant header for the model to continue (used when chatting).
    """
    ids: list[int] = []
    mask: list[bool] = []
    for message in with_system_prompt(messages, system_prompt):
        turn_ids, turn_mask = render_turn(message["role"], message["content"], tokenizer)
        ids += turn_ids
        mask += turn_mask
    if add_generation_prompt:
        header = generation_prompt(tokenizer)
        ids += header
        mask += [False] * len(header)
    return ids, mask


def validate_messages(messages: object, where: str) -> None:
    """Raise DataError (naming `where`, e.g. file:line) unless messages is a list of
    {"role", "content": str} with an optional system turn first, then user and
    assistant turns alternating, starting with user."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {i} is {type(message).__name__}, expected an object")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}, expected one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {i} ({role}) content must be a string, "
                            f"got {type(message.get('content')).__name__}")
        if role == "system" and i != 0:
            raise DataError(f"{where}: message {i}: a system message may only come first")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            index = i + len(messages) - len(turns)
            raise DataError(f"{where}: message {index} is {message['role']!r} where {expected!r} was expected "
                            f"(turns must alternate user, assistant, ...)")
