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

A model imported from Hugging Face brings its own chat template (Jinja, in
tokenizer_config.json). Its conversations are rendered with that template, so
the training tokens are exactly what transformers' apply_chat_template gives,
its default system prompt included; the mask marks each assistant turn's text
as the template writes it (found by rendering the conversation up to that turn
with and without the answer), without the whitespace after it.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

from nanobumble.base.errors import DataError

if TYPE_CHECKING:  # only named in annotations: loading the config need not load sentencepiece
    from nanobumble.data.tokenizer import Tokenizer

DEFAULT_SYSTEM_PROMPT = "You are Bumblebee, a helpful AI assistant."
ROLES = ("system", "user", "assistant")
# Names the output of render_turn in the SFT/DPO token cache keys: change it when that output changes.
CHATML_RENDERER = "nanobumble ChatML, version 1"


def render_turn(role: str, content: str, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """One turn: <|im_start|> role\\n content <|im_end|> \\n, with its training mask."""
    header = [tokenizer.im_start_id] + tokenizer.encode(f"{role}\n")
    body = tokenizer.encode(content) + [tokenizer.im_end_id]
    newline = tokenizer.encode("\n")
    trained = role == "assistant"
    return header + body + newline, [False] * len(header) + [trained] * len(body) + [False] * len(newline)


def generation_prompt(tokenizer: Tokenizer) -> list[int]:
    """The header that asks the model to answer: <|im_start|> assistant\\n."""
    return [tokenizer.im_start_id] + tokenizer.encode("assistant\n")


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
    assistant header for the model to continue (used when chatting). With a
    model's own template, DEFAULT_SYSTEM_PROMPT means the template's default.
    """
    if tokenizer.chat_template:
        if system_prompt == DEFAULT_SYSTEM_PROMPT:
            system_prompt = None
        return render_with_template(with_system_prompt(messages, system_prompt), tokenizer, add_generation_prompt)
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


@functools.lru_cache(maxsize=4)
def _compiled_template(template: str):
    """A Jinja chat template compiled the way transformers compiles it (once per template)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise DataError(f"the model's chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _template_text(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return _compiled_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               tools=None, documents=None)


def render_with_template(messages: list[dict], tokenizer, add_generation_prompt: bool) -> tuple[list[int], list[bool]]:
    """render() for a tokenizer that carries its model's chat template."""
    text = _template_text(tokenizer.chat_template, messages, add_generation_prompt)
    ids, offsets = tokenizer.encode_with_offsets(text)
    answers = []  # character spans of the assistant turns
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _template_text(tokenizer.chat_template, messages[:i], add_generation_prompt=True)
        through = _template_text(tokenizer.chat_template, messages[:i + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError("the model's chat template does not render a conversation turn by turn; "
                            "cannot tell the assistant's tokens from the rest")
        answers.append((len(before), len(through.rstrip())))
    mask = [any(start <= a and b <= end and a < b for start, end in answers) for a, b in offsets]
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
