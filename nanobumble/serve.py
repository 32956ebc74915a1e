"""Serve a trained model over HTTP: an OpenAI-compatible API and a chat page.

    python -m nanobumble.serve --model_path ./checkpoints/dpo/tiny_dpo_merged
    python -m nanobumble.serve --model_path ./checkpoints/sft/tiny_instruct \\
        --adapter_path ./checkpoints/dpo/tiny_dpo_lora --host 127.0.0.1 --port 8000 \\
        [--served_model_name bee] [--api_key KEY]

then open http://127.0.0.1:8000/ to chat in the browser, or use any OpenAI client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    reply = client.chat.completions.create(model="tiny_dpo_merged", messages=[{"role": "user", "content": "Hi"}])

Endpoints:

    POST /v1/chat/completions  the messages rendered with the chat template, as chat.py renders them
                               (--system_prompt comes first unless the request has its own system message)
    POST /v1/completions       the prompt (text, or token ids) continued as it is (what a base model can do)
    GET  /v1/models            one model: --served_model_name, else the last directory name of model_path
    GET  /health               200 {"status": "ok", "model": ...} while the model serves (503 shutting down)
    GET  /                     the chat page, nanobumble/web/chat.html

--api_key KEY (or the environment variable NANOBUMBLE_API_KEY, as vLLM reads
VLLM_API_KEY): every request under /v1 must carry "Authorization: Bearer KEY",
else 401 (invalid_api_key). As with vLLM's --api-key, only /v1 is guarded:
/health and the page stay open, and the page asks for the key when /v1 says 401.

Both completion endpoints take `stream` (server-sent events ending in
`data: [DONE]`; `stream_options: {"include_usage": true}` adds the counts),
`max_tokens`, `temperature` (0: greedy), `top_p`, `stop` (up to 4 strings of
up to 1,000 characters; the answer ends before the first one), `seed` (the same
seed gives the same answer), `n` (up to 8 choices; with a seed, choice i samples
with seed + i, so it is the answer that seed alone gives) and, named as vLLM
names them, `top_k` and `repetition_penalty`. /v1/completions also takes
`echo` (the prompt comes first in the text) and `logprobs` (0-5: OpenAI's legacy
layout, tokens / token_logprobs / top_logprobs / text_offset, from the model's
own distribution; with echo the prompt's tokens too, the first one null; not
streamed); `max_tokens: 0` with echo only scores the prompt (what
lm-evaluation-harness's local-completions asks for log-likelihoods). Settings a
request leaves out take the server's keys below, whose defaults are chat.py's.
Each endpoint has a list of the fields it implements (CHAT_FIELDS,
COMPLETION_FIELDS); any other field is refused (400 unsupported_parameter,
naming it), whatever its value, never ignored. A prompt that leaves no room for
max_tokens in the model's context is refused (400, context_length_exceeded),
never cut.

Every refusal is a 4xx in OpenAI's error shape:
{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}: a body over
1 MB (413, read no further), JSON that is not standard (NaN, Infinity, numbers
beyond a float) or holds a lone UTF-16 surrogate (no text: "\\ud800"), wrong
types and values, and a conversation the model's chat template fails on (its
file named, see chat_template.py). The chat template is compiled, and the port
bound once, before the model loads: either failing is one line and exit code 2.

Continuous batching: every answer, and each choice of one, is a row of one shared
Batcher (nanobumble/inference/batching.py), whose thread runs the model: a request
joins the running batch at its next step, and one forward per step serves every
answer in flight (up to --max_batch; more wait their turn). The event loop only
turns tokens into text and events, so it stays free to stream and to notice a
client that hangs up, whose row then frees before the next step. Prompt scoring
(logprobs) is one forward on a worker thread of its own, beside the batcher.
On Ctrl-C, answers in progress end after their current token (finish_reason
"length") and the server exits; one still stuck in a long step after
SHUTDOWN_GRACE_SECONDS is cancelled.

FastAPI and uvicorn are needed only here (pip install fastapi uvicorn).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from dataclasses import field as field_

import torch

from nanobumble.base.cpu import apply_num_threads, cpu_line
from nanobumble.base.errors import DataError, UserError, run_cli
from nanobumble.base.precision import resolve_precision
from nanobumble.base.reading import cut
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT, check_template, render, shorten, validate_messages
from nanobumble.inference.batching import Batcher
from nanobumble.inference.generation import GenerationConfig, TextStreamer
from nanobumble.inference.loading import check_sampling_keys, load_model, log, resolve_device, resolve_mode
from nanobumble.run.config import check_numbers, parse_config

WEB_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "chat.html")
SHUTDOWN_GRACE_SECONDS = 5
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 1000  # each: holding back a possible start costs its length squared, under the model's lock
MAX_BODY_BYTES = 1 << 20  # a request body beyond this is refused unread (the context holds far less text)
MAX_CHOICES = 8  # n
MAX_LOGPROBS = 5  # completions' logprobs (top alternatives per token), as OpenAI
API_KEY_ENV = "NANOBUMBLE_API_KEY"  # the key when --api_key is not given (as vLLM reads VLLM_API_KEY)
# The request fields each endpoint implements. Any other field is refused (400 naming it), whatever its
# value: a server that ignored response_format or min_p would answer something else than was asked.
SAMPLING_FIELDS = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k",
                   "repetition_penalty", "stop", "seed", "n", "presence_penalty", "frequency_penalty"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo", "logprobs"}


@dataclass
class ServeConfig:
    model_path: str = "checkpoints/sft/tiny_instruct"  # a model directory (or a LoRA run's, as chat.py)
    adapter_path: str = ""  # a LoRA adapter directory, applied on top of model_path (not merged)
    host: str = "127.0.0.1"  # 0.0.0.0 to listen on every interface
    port: int = 8000  # the TCP port to listen on
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # for chats without a system message; "" = none
    # Defaults for the settings a request leaves out (chat.py's):
    max_new_tokens: int = 512  # max_tokens; never beyond the room left in the context
    temperature: float = 0.7  # < 1 sharpens the next-token distribution, > 1 flattens it
    top_p: float = 0.8  # sample from the smallest set of tokens holding this much probability
    top_k: int = 20  # sample from the k likeliest tokens only (0: all)
    repetition_penalty: float = 1.1  # > 1 makes tokens already in the text less likely
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:1 ...
    precision: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | bf16 | fp32
    num_threads: int = 0  # CPU threads for PyTorch's operations; 0: the free physical cores at start (base/cpu.py)
    api_key: str = ""  # every /v1 request must send "Authorization: Bearer KEY"; "" = $NANOBUMBLE_API_KEY, or none
    # answers generated together, each a row of one forward; the KV cache holds this many whole contexts
    # (a 1.5B model at 32k context in bf16: about 0.9 GB each). More requests wait their turn.
    max_batch: int = 8
    served_model_name: str = ""  # the model id of /v1/models and requests; "" = the last directory of model_path

    def __post_init__(self):
        check_numbers(self)  # ranges (port, sampling): NUMBERS in run/config.py
        check_sampling_keys(self)  # the other keys shared with chat.py


class APIError(Exception):
    """A request the server refuses, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- reading requests

TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
              dict: "an object", type(None): "null"}


def field(body: dict, key: str, kind: type | tuple[type, ...], default=None):
    """body[key] checked against JSON types (an integer is a number too); default when absent or null."""
    value = body.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        require(abs(value) < 2**1023, key, "the number is too large.")  # float() would overflow
        value = float(value)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(TYPE_NAMES[k] for k in kinds)
        got = TYPE_NAMES.get(type(value), type(value).__name__)
        raise APIError(400, f"Invalid type for '{key}': expected {expected}, but got {got} instead.", param=key,
                       code="invalid_type")
    return value


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise APIError(400, f"Invalid value for '{key}': {message}", param=key, code="invalid_value")


@dataclass
class Settings:
    """How to answer one request."""
    generation: GenerationConfig
    max_tokens: int | None  # None: as many as fit, up to the server's max_new_tokens; 0: echo only
    stop: list[str]
    stream: bool
    include_usage: bool  # streaming: a last chunk with the token counts
    n: int = 1  # choices
    echo: bool = False  # completions: the prompt comes before the answer
    logprobs: int | None = None  # completions: log-probabilities of every token, with this many alternatives


def check_fields(body: dict, allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise APIError(400, f"Unsupported parameter: '{shorten(key)}' is not supported by this server.",
                           param=key, code="unsupported_parameter")


def read_settings(body: dict, cfg: ServeConfig, chat: bool) -> Settings:
    check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    for key in ("presence_penalty", "frequency_penalty"):
        require(not field(body, key, float), key, "not supported by this server; use 'repetition_penalty'.")
    n = field(body, "n", int, 1)
    require(1 <= n <= MAX_CHOICES, "n", f"must be between 1 and {MAX_CHOICES}, got {n}.")
    temperature = field(body, "temperature", float, cfg.temperature)
    require(0 <= temperature <= 2, "temperature", f"must be between 0 and 2, got {temperature}.")
    top_p = field(body, "top_p", float, cfg.top_p)
    require(0 <= top_p <= 1, "top_p", f"must be between 0 and 1, got {top_p}.")
    top_k = field(body, "top_k", int, cfg.top_k)  # <= 0: off
    repetition_penalty = field(body, "repetition_penalty", float, cfg.repetition_penalty)
    require(repetition_penalty > 0, "repetition_penalty", f"must be > 0, got {repetition_penalty}.")
    echo = field(body, "echo", bool, False)
    logprobs = field(body, "logprobs", int)
    require(logprobs is None or 0 <= logprobs <= MAX_LOGPROBS, "logprobs",
            f"must be between 0 and {MAX_LOGPROBS}, got {logprobs}.")
    max_tokens = field(body, "max_tokens", int, field(body, "max_completion_tokens", int))
    require(max_tokens is None or max_tokens >= 1 or (max_tokens == 0 and echo), "max_tokens",
            f"must be at least 1 (0 only with echo), got {max_tokens}.")
    seed = field(body, "seed", int)
    require(seed is None or -2**63 <= seed < 2**63, "seed", "must be a 64-bit integer.")
    stop = field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    require(all(isinstance(s, str) for s in stop), "stop", "must be a string or an array of strings.")
    require(len(stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}.")
    require(all(len(s) <= MAX_STOP_CHARS for s in stop), "stop",
            f"a stop string may have at most {MAX_STOP_CHARS} characters, got {max(map(len, stop), default=0)}.")
    stream = field(body, "stream", bool, False)
    require(not (stream and logprobs is not None), "logprobs", "not supported with stream.")
    include_usage = stream and bool(field(body, "stream_options", dict, {}).get("include_usage"))
    generation = GenerationConfig(temperature=temperature, top_p=top_p, top_k=top_k,
                                  repetition_penalty=repetition_penalty, do_sample=temperature > 0, seed=seed)
    return Settings(generation, max_tokens, [s for s in stop if s], stream, include_usage, n, echo, logprobs)


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request samples with seed + i (wrapped to 64 bits): the choices differ, and
    each is the answer a request with n = 1 and that seed gets."""
    return None if seed is None else (seed + index + 2**63) % 2**64 - 2**63


def read_prompt(body: dict, vocab_size: int) -> str | list[int]:
    """A completions prompt: text, or token ids (as lm-evaluation-harness sends them); an array of one
    of either is that prompt (OpenAI takes a batch of prompts; this server takes one per request)."""
    prompt = field(body, "prompt", (str, list))
    require(prompt is not None, "prompt", "a prompt is required.")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        require(all(isinstance(i, int) and not isinstance(i, bool) for i in prompt), "prompt",
                "expected a string, an array of token ids, or an array of one of either.")
        bad = [i for i in prompt if not 0 <= i < vocab_size]
        require(not bad, "prompt", f"token id {bad[0] if bad else 0} is not in the vocabulary (0..{vocab_size - 1}).")
    return prompt


def read_messages(body: dict) -> list[dict]:
    """OpenAI chat messages as the chat template takes them: text content only;
    'developer' (OpenAI's newer name for system) is a system message."""
    messages = field(body, "messages", list)
    require(bool(messages), "messages", "expected a non-empty array of messages.")
    plain = []
    for i, message in enumerate(messages):
        require(isinstance(message, dict), "messages", f"message {i} is not an object.")
        role, content = message.get("role"), message.get("content")
        if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            require(all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                        for part in content), "messages", f"message {i}: only text content parts are supported.")
            content = "".join(part["text"] for part in content)
        plain.append({"role": "system" if role == "developer" else role, "content": content})
    try:
        validate_messages(plain, "messages")
    except DataError as e:
        raise APIError(400, str(e), param="messages", code="invalid_value") from None
    require(plain[-1]["role"] == "user", "messages", "the last message must be the user's.")
    return plain


# ---------------------------------------------------------------- generating

class StopStrings:
    """Cuts streamed text before the first stop string. The end of the text that
    could be the start of a stop string is held back until later text settles it."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""  # everything generated so far
        self.sent = 0  # how much of it has been released
        self.stopped = False  # a stop string was found

    def push(self, piece: str, last: bool = False) -> str:
        """Add a piece of text; return the text that is now safe to release."""
        self.text += piece
        # A stop string never starts before self.sent: text that might begin one is held back.
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            end = min(found)
        elif last:
            end = len(self.text)
        else:
            end = len(self.text) - self.held_back()
        released, self.sent = self.text[self.sent:end], end
        return released

    def held_back(self) -> int:
        """Length of the longest end of the text that is the start of a stop string."""
        return max((n for stop in self.stops for n in range(1, len(stop)) if self.text.endswith(stop[:n])), default=0)


@dataclass
class Answer:
    """What a finished generation reports beside its text."""
    prompt_tokens: int
    completion_tokens: int = 0  # tokens generated (the end-of-turn token is not counted)
    finish_reason: str = "length"  # "stop": end of turn or a stop string; "length": max_tokens or the context
    token_ids: list[int] = field_(default_factory=list)  # the tokens generated


class Engine:
    """The model and its tokenizer, behind one continuous batcher that every answer shares
    (see the module docstring)."""

    def __init__(self, model, tokenizer, model_id: str, cfg: ServeConfig, api_key: str = ""):
        self.model, self.tokenizer, self.model_id, self.cfg = model, tokenizer, model_id, cfg
        self.api_key = api_key  # "" = no key
        self.context_len = model.config.max_position_embeddings
        self.batcher = Batcher(model, max_batch=cfg.max_batch)  # its own thread runs the model for every answer
        self.lock = asyncio.Lock()  # prompt scoring (logprobs), one at a time on the worker thread
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring")
        self.created = int(time.time())
        self.closing = False  # the server is shutting down: answers end after their current token

    def busy_rows(self) -> int:
        """Answers being generated now (rows of the batch)."""
        return len(self.batcher.decoder.active)

    def check_model(self, body: dict) -> None:
        name = field(body, "model", str)
        require(name is not None, "model", "a model id is required.")
        if name != self.model_id:
            raise APIError(404, f"The model `{shorten(name)}` does not exist. This server has `{self.model_id}`.",
                           param="model", code="model_not_found")

    def max_tokens(self, prompt_tokens: int, requested: int | None, param: str) -> int:
        """The tokens to generate; refuse (never cut) a prompt that leaves no room for them."""
        room = self.context_len - prompt_tokens
        if requested is None and room > 0:
            return min(self.cfg.max_new_tokens, room)
        if requested is None or requested > room:
            requested = 1 if requested is None else requested
            # cut(): a max_tokens of 400 digits is shown shortened, not whole
            total, asked = cut(prompt_tokens + requested, 40), cut(requested, 40)
            raise APIError(400, f"This model's maximum context length is {self.context_len} tokens. However, you "
                                f"requested {total} tokens ({prompt_tokens} in the prompt, {asked} in the completion). "
                                f"Please reduce the length of the prompt or completion.", param=param,
                           code="context_length_exceeded")
        return requested

    @torch.inference_mode()
    def score(self, ids: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """For each token after the first: its log-probability given the tokens before it, and the `top`
        most likely tokens there with theirs. The model's own distribution (no temperature, penalty or
        filter) over its whole vocabulary, padding ids included, as nanobumble.evals.scoring normalizes it
        (the alternatives are tokenizer ids only), in float64 from one forward pass over the sequence."""
        device = next(self.model.parameters()).device
        logits = self.model(torch.tensor(ids[:-1], device=device)[None])[0]
        scored = []
        for start in range(0, logits.shape[0], 64):  # float64 a few positions at a time: vocabularies are large
            logprobs = torch.log_softmax(logits[start:start + 64].double(), dim=-1).cpu()
            targets = torch.tensor(ids[start + 1:start + 1 + len(logprobs)])
            chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
            values, indices = logprobs[:, :self.tokenizer.vocab_size].topk(top, dim=-1)
            scored += [(c, list(zip(i, v))) for c, i, v in zip(chosen, indices.tolist(), values.tolist())]
        return scored

    async def run(self, function, *args):
        """function(*args) on the model's worker thread, in its turn."""
        async with self.lock:
            return await asyncio.get_running_loop().run_in_executor(self.worker, function, *args)

    async def generate(self, prompt_ids: list[int], gen: GenerationConfig, stops: list[str],
                       answer: Answer) -> AsyncIterator[str]:
        """The answer's text in pieces of whole characters, cut before the first stop string.
        Joins the batch at the batcher's next step; fills answer's tokens, counts and finish reason."""
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()  # set (from the batcher thread) when new tokens or the end arrive

        def notify() -> None:
            try:
                loop.call_soon_threadsafe(arrived.set)
            except RuntimeError:  # the loop has closed (shutdown) while a step was under way: no one waits
                pass

        handle = self.batcher.submit(prompt_ids, gen, stop_ids=(self.tokenizer.im_end_id, self.tokenizer.eot_id),
                                     vocab_size=self.tokenizer.vocab_size, notify=notify)
        streamer, cutter = TextStreamer(self.tokenizer), StopStrings(stops)
        try:
            while not self.closing:
                ended = handle.done  # before poll: every token of an ended answer is queued by then
                for token in handle.poll():
                    answer.token_ids.append(token)
                    if text := cutter.push(streamer.put(token)):
                        yield text
                    if cutter.stopped:
                        break
                if cutter.stopped:  # (no more tokens may come to wake the wait below)
                    break
                if ended:
                    if text := cutter.push(streamer.flush(), last=True):
                        yield text
                    break
                await arrived.wait()
                arrived.clear()
        finally:
            handle.cancel()  # a stop string, shutdown or a client that hung up: its row frees before the next step
        answer.completion_tokens = len(answer.token_ids)  # those the answer used
        answer.finish_reason = "stop" if cutter.stopped or handle.stats.get("stop") == "stop_id" else "length"


# ---------------------------------------------------------------- the HTTP layer

def server_sent_event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class ClientGone(Exception):
    """The client hung up before its (not streamed) answer was ready."""


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds to the decoded sequence, in whole characters: a character made of
    several byte tokens belongs to its last one. They join to the decoded text."""
    streamer = TextStreamer(tokenizer)
    texts = [streamer.put(i) for i in ids]
    if texts:
        texts[-1] += streamer.flush()
    return texts


def logprobs_layout(engine: Engine, prompt_ids: list[int], answer: Answer, text: str, echo: bool,
                    scored: list) -> dict:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs (null for the first token of an
    echoed prompt, which nothing predicts), top_logprobs ({token: logprob}, the most likely tokens and the
    chosen one) and text_offset (where each token starts in the choice's text). Where a stop string cut
    the answer, the tokens end with the one the cut falls in (its text cut there too)."""
    ids = prompt_ids + answer.token_ids
    texts = token_texts(engine.tokenizer, ids)
    prompt = texts[:len(prompt_ids)]
    released = len(text) - (len("".join(prompt)) if echo else 0)  # of the answer's text
    completion = texts[len(prompt_ids):]
    if len("".join(completion)) > released:
        kept, start = [], 0
        for piece in completion:
            if start >= released:
                break
            kept.append(piece[:released - start])
            start += len(piece)
        completion = kept
    first = 0 if echo else len(prompt_ids)
    layout: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for position, piece in zip(range(first, len(prompt_ids) + len(completion)), (prompt if echo else []) + completion):
        logprob, top = None, None
        if position > 0:
            logprob, alternatives = scored[position - 1]
            top = {engine.tokenizer.decode([i]): v for i, v in alternatives}
            top.setdefault(engine.tokenizer.decode([ids[position]]), logprob)
        layout["tokens"].append(piece)
        layout["token_logprobs"].append(logprob)
        layout["top_logprobs"].append(top)
        layout["text_offset"].append(offset)
        offset += len(piece)
    return layout


async def respond(request, engine: Engine, prompt_ids: list[int], settings: Settings, chat: bool):
    """The choices as one JSON object, or streamed as server-sent events."""
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    max_new = engine.max_tokens(len(prompt_ids), settings.max_tokens, param="messages" if chat else "prompt")
    answers = [Answer(prompt_tokens=len(prompt_ids)) for _ in range(settings.n)]
    echoed = "".join(token_texts(engine.tokenizer, prompt_ids)) if settings.echo else ""

    async def pieces(i: int) -> AsyncIterator[str]:
        """Choice i's text in pieces (the echoed prompt first)."""
        if echoed:
            yield echoed
        if max_new == 0:  # echo only: score the prompt
            return
        gen = replace(settings.generation, max_new_tokens=max_new, seed=choice_seed(settings.generation.seed, i))
        async with contextlib.aclosing(engine.generate(prompt_ids, gen, settings.stop, answers[i])) as generated:
            async for piece in generated:
                yield piece

    kind = ("chat.completion.chunk" if settings.stream else "chat.completion") if chat else "text_completion"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
            "created": int(time.time()), "model": engine.model_id}

    def usage() -> dict:  # the prompt counts once, as OpenAI counts it
        completion = sum(answer.completion_tokens for answer in answers)
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                "total_tokens": len(prompt_ids) + completion}

    if not settings.stream:
        async def collect(i: int) -> dict:
            text = []
            async with contextlib.aclosing(pieces(i)) as generated:
                async for piece in generated:
                    text.append(piece)
                    if await request.is_disconnected():  # nobody is waiting for the rest
                        raise ClientGone
            text = "".join(text)
            logprobs = None
            if settings.logprobs is not None:
                ids = prompt_ids + answers[i].token_ids
                scored = await engine.run(engine.score, ids, settings.logprobs) if len(ids) > 1 else []
                logprobs = logprobs_layout(engine, prompt_ids, answers[i], text, settings.echo, scored)
            choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            return {"index": i, **choice, "logprobs": logprobs, "finish_reason": answers[i].finish_reason}

        gone = False
        try:
            async with asyncio.TaskGroup() as group:  # the first to fail cancels the others
                tasks = [group.create_task(collect(i)) for i in range(settings.n)]
        except* ClientGone:
            gone = True
        if gone:
            return Response(status_code=499)  # (nginx's "client closed request", for the log)
        return JSONResponse({**head, "choices": [task.result() for task in tasks], "usage": usage()})

    def chunk(i: int, choice: dict, finish_reason: str | None = None) -> str:
        return server_sent_event({**head, "choices": [{"index": i, **choice, "logprobs": None,
                                                       "finish_reason": finish_reason}]})

    async def events() -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:  # choice i's pieces into the queue, then (i, None, error or None)
            error = None
            try:
                async with contextlib.aclosing(pieces(i)) as generated:
                    async for piece in generated:
                        queue.put_nowait((i, piece, None))
            except Exception as e:  # a bug: the response ends with it
                error = e
            queue.put_nowait((i, None, error))

        tasks = [asyncio.create_task(pump(i)) for i in range(settings.n)]
        try:  # a client that hangs up cancels this generator, and so the generations (finally)
            if chat:
                for i in range(settings.n):
                    yield chunk(i, {"delta": {"role": "assistant", "content": ""}})
            for _ in range(settings.n):
                while (item := await queue.get())[1] is not None:
                    yield chunk(item[0], {"delta": {"content": item[1]}} if chat else {"text": item[1]})
                i, _, error = item
                if error:
                    raise error
                yield chunk(i, {"delta": {}} if chat else {"text": ""}, answers[i].finish_reason)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if settings.include_usage:
            yield server_sent_event({**head, "choices": [], "usage": usage()})
        yield server_sent_event("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def read_body(request) -> bytes:
    """The request body, refused (413) beyond MAX_BODY_BYTES: by its Content-Length before
    reading any of it, and while reading (a chunked body has no length)."""
    too_large = APIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes, the most this server "
                              f"reads.", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def not_json(constant: str):
    """NaN, Infinity and -Infinity: Python's JSON parser takes them, JSON does not."""
    raise APIError(400, f"{constant} is not a JSON number. The body must be valid JSON.", code="invalid_json")


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400
        raise APIError(400, f"The number {shorten(text)} is beyond a float. The body must be valid JSON.",
                       code="invalid_json")
    return value


def check_text(body: dict) -> None:
    """Refuse a lone UTF-16 surrogate ("\\ud800" in JSON): valid JSON, but no text that
    a tokenizer (or the UTF-8 of an answer) can take."""
    for key, value in body.items():
        try:
            json.dumps([key, value], ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            clean = key.encode("utf-8", "replace").decode("utf-8")
            raise APIError(400, f"Invalid value for '{shorten(clean)}': it holds a lone UTF-16 surrogate, "
                                f"which is not text.", param=clean, code="invalid_value") from None


def create_app(engine: Engine):
    """The FastAPI app. Its routes take the request as it comes (Starlette style) and
    read the JSON themselves, so that every refusal has OpenAI's error shape."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="nanobumble", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    async def api_error(request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    async def server_error(request, error: Exception):  # a bug: still OpenAI's shape (uvicorn logs the traceback)
        return JSONResponse(APIError(500, "The server had an error while processing your request.",
                                     kind="server_error").body(), status_code=500)

    async def http_error(request, error: HTTPException):  # unknown paths and methods, in the same shape
        return JSONResponse(APIError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    async def read_json(request) -> dict:
        try:
            body = json.loads(await read_body(request), parse_constant=not_json, parse_float=finite_float)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise APIError(400, "We could not parse the JSON body of your request. The body must be valid JSON.",
                           code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "The JSON body must be an object.", code="invalid_json")
        check_text(body)
        return body

    def model_card() -> dict:
        return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "nanobumble"}

    async def list_models(request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request):
        engine.check_model({"model": request.path_params["name"]})
        return JSONResponse(model_card())

    async def health(request):  # for load balancers and scripts: the model is loaded (and not shutting down)
        if engine.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "model": engine.model_id})

    async def chat_completions(request):
        body = await read_json(request)
        engine.check_model(body)
        messages = read_messages(body)
        settings = read_settings(body, engine.cfg, chat=True)
        try:
            prompt_ids, _ = render(messages, engine.tokenizer, system_prompt=engine.cfg.system_prompt,
                                   add_generation_prompt=True, context_len=engine.context_len)
        except DataError as e:  # a Hugging Face template may refuse (or fail on) a conversation
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        return await respond(request, engine, prompt_ids, settings, chat=True)

    async def completions(request):
        body = await read_json(request)
        engine.check_model(body)
        prompt = read_prompt(body, engine.tokenizer.vocab_size)
        settings = read_settings(body, engine.cfg, chat=False)
        prompt_ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        # An empty prompt starts a new document: what follows <|endoftext|> in pretraining.
        prompt_ids = prompt_ids or [engine.tokenizer.eot_id]
        return await respond(request, engine, prompt_ids, settings, chat=False)

    async def chat_page(request):
        with open(WEB_PAGE, encoding="utf-8") as f:  # read every time: edit the page, reload the browser
            return HTMLResponse(f.read())

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(Exception, server_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_route("/v1/models", list_models, methods=["GET"])
    app.add_route("/v1/models/{name:path}", get_model, methods=["GET"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/v1/completions", completions, methods=["POST"])
    app.add_route("/", chat_page, methods=["GET"])
    app.add_route("/health", health, methods=["GET"])
    if engine.api_key:
        app.add_middleware(KeyCheck, key=engine.api_key)
    return app


class KeyCheck:
    """Every request under /v1 must carry "Authorization: Bearer KEY", else 401 in OpenAI's error
    shape. As vLLM's --api-key: only /v1 is guarded; /health and the chat page (which asks for the
    key and sends it) stay open. A plain ASGI middleware, so that streaming and the notice of a client
    that hangs up pass through untouched."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/")):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # in constant time
                from fastapi.responses import JSONResponse

                error = APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.",
                                 code="invalid_api_key")
                response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def model_id(model_path: str) -> str:
    return os.path.basename(os.path.normpath(model_path))


def check_port(host: str, port: int) -> None:
    """Bind the address as uvicorn will (reusing TIME_WAIT addresses), and let it go:
    a busy port is one line before the model loads, not after."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, protocol, _, address in addresses:
            with socket.socket(family, kind, protocol) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def create_server(cfg: ServeConfig):
    """Load the model and build the (not yet started) uvicorn server. cfg.max_batch 1 answers
    one request at a time (the benchmark's baseline)."""
    try:
        import fastapi  # noqa: F401  (imported where used; checked here to fail before loading the model)
        import uvicorn
    except ImportError:
        raise UserError("serving needs FastAPI and uvicorn: pip install fastapi uvicorn") from None
    check_port(cfg.host, cfg.port)
    device = resolve_device(cfg.device)
    if cfg.num_threads or device.type == "cpu":
        apply_num_threads(cfg.num_threads)
    dtype = resolve_precision(cfg.precision, device)
    start = time.time()
    model, tokenizer, model_path, adapter_path = load_model(cfg.model_path, cfg.adapter_path, device, dtype)
    check_template(tokenizer)  # a template that is not Jinja would fail every chat
    mode, why = resolve_mode("auto", model_path, adapter_path)
    api_key = cfg.api_key or os.environ.get(API_KEY_ENV, "")
    engine = Engine(model, tokenizer, cfg.served_model_name or model_id(cfg.model_path), cfg, api_key)
    if device.type == "cpu":
        log(cpu_line())  # cpu: ..., native bf16: no (flags: avx2); threads: ...
    log(f"model: {engine.model_id} from {model_path} ({model.num_parameters() / 1e6:.1f}M parameters, context "
        f"{engine.context_len}) on {device} {str(dtype).removeprefix('torch.')}, loaded in "
        f"{time.time() - start:.1f}s")
    if mode == "completion":
        log(f"note: a base model ({why}): /v1/completions continues text; chats may make little sense")
    log(f"chat page: http://{cfg.host}:{cfg.port}/   API: http://{cfg.host}:{cfg.port}/v1"
        + (f" (API key required: {'--api_key' if cfg.api_key else '$' + API_KEY_ENV})" if api_key else ""))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # Ctrl-C: let the answers in progress end first
            engine.closing = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(engine), host=cfg.host, port=cfg.port,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS, log_level="info")
    return Server(config)


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, ServeConfig)
    server = create_server(cfg)
    engine = server.config.app.state.engine
    try:
        server.run()  # until Ctrl-C
    finally:
        engine.worker.shutdown(wait=False, cancel_futures=True)
        engine.batcher.close()  # after its current step
    # uvicorn re-raises the signal after its shutdown, but inside asyncio's runner, which
    # can lose it when the signal arrives as the last task ends: say so here instead.
    if engine.closing:
        raise KeyboardInterrupt  # run_cli: "interrupted", exit code 130


if __name__ == "__main__":
    run_cli(main)
