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

A template is code from the model's authors, run in transformers' sandbox, and
bounded: at most MAX_TEMPLATE_BYTES of Jinja; its output stops (and is refused)
once it holds more characters than the model's context could (CHARS_PER_TOKEN a
token), and one +, * or ** may not build a value beyond MAX_TEMPLATE_CHARS. Any
failure of it (bad Jinja, an undefined name, a sandbox refusal, raise_exception,
no output) is a DataError naming the template's file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import TYPE_CHECKING

from nanobumble.base.errors import DataError

if TYPE_CHECKING:  # only named in annotations: loading the config need not load sentencepiece
    from nanobumble.data.tokenizer import Tokenizer

DEFAULT_SYSTEM_PROMPT = "You are Bumblebee, a helpful AI assistant."
ROLES = ("system", "user", "assistant")
# Names the output of render_turn in the SFT/DPO token cache keys: change it when that output changes.
CHATML_RENDERER = "nanobumble ChatML, version 1"
MAX_TEMPLATE_BYTES = 1 << 20  # a chat template is a page of Jinja, not megabytes
MAX_TEMPLATE_CHARS = 1 << 24  # the most any rendering may hold (16M characters: millions of tokens)
CHARS_PER_TOKEN = 256  # more than any token stands for: a longer text cannot fit the context


def shorten(text: str, limit: int = 200) -> str:
    """text cut to at most limit characters, for error messages that quote a value."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
           add_generation_prompt: bool = False, context_len: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and the mask of the tokens to train on.

    messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
    A system message in the data is always kept; otherwise system_prompt (when
    not None or "") becomes the first turn. add_generation_prompt appends the
    assistant header for the model to continue (used when chatting). With a
    model's own template, DEFAULT_SYSTEM_PROMPT means the template's default,
    and context_len (the model's, in tokens) bounds what the template may render.
    """
    if tokenizer.chat_template:
        if system_prompt == DEFAULT_SYSTEM_PROMPT:
            system_prompt = None
        max_chars = min(MAX_TEMPLATE_CHARS, context_len * CHARS_PER_TOKEN) if context_len else MAX_TEMPLATE_CHARS
        return render_with_template(with_system_prompt(messages, system_prompt), tokenizer, add_generation_prompt,
                                    max_chars)
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


def template_file(tokenizer) -> str:
    """The file the tokenizer's chat template came from, to name in errors."""
    name = "chat_template.jinja" if "chat_template.jinja" in getattr(tokenizer, "files", {}) else \
        "tokenizer_config.json"
    return os.path.join(os.path.dirname(tokenizer.model_file), name)


@contextlib.contextmanager
def _template_errors(tokenizer):
    """Whatever the template raises, as one DataError naming its file."""
    try:
        yield
    except DataError as e:
        raise DataError(f"{template_file(tokenizer)}: {e}") from None
    except Exception as e:  # the template is code: anything it raises is its (or the conversation's) fault
        line = f":{e.lineno}" if isinstance(getattr(e, "lineno", None), int) else ""  # a Jinja syntax error's
        raise DataError(f"{template_file(tokenizer)}{line}: the chat template failed: "
                        f"{shorten(f'{type(e).__name__}: {e}')}") from None


def _result_size(operator: str, left, right) -> int:
    """About how many characters (items, bytes of an integer) `left operator right` would hold."""
    def size(value) -> int:
        if isinstance(value, (str, list, tuple)):
            return len(value)
        return value.bit_length() // 8 if isinstance(value, int) else 0

    sequence = (str, list, tuple)
    if operator == "*" and isinstance(left, int) and isinstance(right, sequence):
        left, right = right, left
    if operator == "*" and isinstance(left, sequence) and isinstance(right, int):
        return len(left) * right
    if operator == "**" and isinstance(left, int) and isinstance(right, int):
        return left.bit_length() * right // 8
    return size(left) + size(right)


def _bounded_binop(env, context, operator: str, left, right):
    """The sandbox's +, * and **, refused before they build a value beyond MAX_TEMPLATE_CHARS
    ('x' * 10**9 would allocate a gigabyte before any output is counted)."""
    if _result_size(operator, left, right) > MAX_TEMPLATE_CHARS:
        raise DataError(f"the chat template builds a value of more than {MAX_TEMPLATE_CHARS} characters "
                        f"(with {operator})")
    return env.binop_table[operator](left, right)


@functools.lru_cache(maxsize=4)
def _compiled_template(template: str):
    """A Jinja chat template compiled the way transformers compiles it (once per template)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if len(template.encode("utf-8", "replace")) > MAX_TEMPLATE_BYTES:
        raise DataError(f"the chat template is larger than {MAX_TEMPLATE_BYTES >> 20} MB")

    def raise_exception(message):
        raise DataError(f"the chat template refused the conversation: {shorten(str(message))}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.intercepted_binops = frozenset(("+", "*", "**"))  # read when compiling: these call env.call_binop
    env.call_binop = functools.partial(_bounded_binop, env)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def check_template(tokenizer) -> None:
    """Compile the tokenizer's chat template, if it has one: a broken one is refused
    (DataError naming its file) before a program loads or serves anything else."""
    if tokenizer.chat_template:
        with _template_errors(tokenizer):
            _compiled_template(tokenizer.chat_template)


def _template_text(tokenizer, messages: list[dict], add_generation_prompt: bool, max_chars: int) -> str:
    """The template's output. Rendering stops once it exceeds max_chars: a loop cannot fill the memory."""
    with _template_errors(tokenizer):
        pieces, size = [], 0
        for piece in _compiled_template(tokenizer.chat_template).generate(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None):
            size += len(piece)
            if size > max_chars:
                raise DataError(f"the chat template's output exceeds {max_chars} characters, more than the "
                                f"model's context can hold")
            pieces.append(piece)
        return "".join(pieces)


def render_with_template(messages: list[dict], tokenizer, add_generation_prompt: bool,
                         max_chars: int = MAX_TEMPLATE_CHARS) -> tuple[list[int], list[bool]]:
    """render() for a tokenizer that carries its model's chat template."""
    text = _template_text(tokenizer, messages, add_generation_prompt, max_chars)
    ids, offsets = tokenizer.encode_with_offsets(text)
    if not ids:  # nothing for the model to read (or to learn)
        raise DataError(f"{template_file(tokenizer)}: the chat template rendered nothing for this conversation")
    answers = []  # character spans of the assistant turns
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _template_text(tokenizer, messages[:i], True, max_chars)
        through = _template_text(tokenizer, messages[:i + 1], False, max_chars)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(f"{template_file(tokenizer)}: the chat template does not render a conversation turn "
                            f"by turn; cannot tell the assistant's tokens from the rest")
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
            raise DataError(f"{where}: message {i} has role {shorten(repr(role))}, expected one of {', '.join(ROLES)}")
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
