"""Serve a trained model over HTTP: an OpenAI-compatible API and a chat page.

    python -m nanobumble.serve --model_path ./checkpoints/dpo/tiny_dpo_merged
    python -m nanobumble.serve --model_path ./checkpoints/sft/tiny_instruct \\
        --adapter_path ./checkpoints/dpo/tiny_dpo_lora --host 127.0.0.1 --port 8000

then open http://127.0.0.1:8000/ to chat in the browser, or use any OpenAI client:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    reply = client.chat.completions.create(model="tiny_dpo_merged", messages=[{"role": "user", "content": "Hi"}])

Endpoints:

    POST /v1/chat/completions  the messages rendered with the chat template, as chat.py renders them
                               (--system_prompt comes first unless the request has its own system message)
    POST /v1/completions       the prompt continued as it is (what a base model can do)
    GET  /v1/models            one model, whose id is the last directory name of model_path
    GET  /                     the chat page, nanobumble/web/chat.html

Both completion endpoints take `stream` (server-sent events ending in
`data: [DONE]`; `stream_options: {"include_usage": true}` adds the counts),
`max_tokens`, `temperature` (0: greedy), `top_p`, `stop` (up to 4 strings of
up to 1,000 characters; the answer ends before the first one), `seed` (the same
seed gives the same answer) and, named as vLLM names them, `top_k` and
`repetition_penalty`. Settings a request leaves out take the server's keys
below, whose defaults are chat.py's; fields it does not implement (UNSUPPORTED)
are refused, not ignored. A prompt that leaves no room for max_tokens in the
model's context is refused (400, context_length_exceeded), never cut.

Every refusal is a 4xx in OpenAI's error shape:
{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}: a body over
1 MB (413, read no further), JSON that is not standard (NaN, Infinity, numbers
beyond a float) or holds a lone UTF-16 surrogate (no text: "\\ud800"), wrong
types and values, and a conversation the model's chat template fails on (its
file named, see chat_template.py). The chat template is compiled, and the port
bound once, before the model loads: either failing is one line and exit code 2.

One generation at a time: an asyncio.Lock admits one request at a time to the
model, and the others wait their turn. The model work runs on a single worker
thread, so the event loop stays free to send tokens and to notice a client that
hangs up; its generation then stops after the current token and the next
request starts. On Ctrl-C, answers in progress end after their current token
(finish_reason "length") and the server exits; one still stuck in a long step
after SHUTDOWN_GRACE_SECONDS is cancelled.

FastAPI and uvicorn are needed only here (pip install fastapi uvicorn).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from nanobumble.base.errors import DataError, UserError, run_cli
from nanobumble.base.precision import resolve_precision
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT, check_template, render, shorten, validate_messages
from nanobumble.inference.generation import GenerationConfig, TextStreamer, generate_stream
from nanobumble.inference.loading import check_sampling_keys, load_model, log, resolve_device, resolve_mode
from nanobumble.run.config import check_numbers, parse_config

WEB_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "chat.html")
SHUTDOWN_GRACE_SECONDS = 5
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 1000  # each: holding back a possible start costs its length squared, under the model's lock
MAX_BODY_BYTES = 1 << 20  # a request body beyond this is refused unread (the context holds far less text)
# Request fields this server does not implement: refused rather than silently ignored (a value that
# means "off" -- false, 0, [] -- is no request, and passes).
UNSUPPORTED = ("logprobs", "top_logprobs", "logit_bias", "tools", "functions", "suffix", "echo", "best_of",
               "min_p", "min_tokens", "ignore_eos", "stop_token_ids")


@dataclass
class ServeConfig:
    model_path: str = "checkpoints/sft/tiny_instruct"  # a model directory (or a LoRA run's, as chat.py)
    adapter_path: str = ""  # a LoRA adapter directory, applied on top of model_path (not merged)
    host: str = "127.0.0.1"  # 0.0.0.0 to listen on every interface
    port: int = 8000
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # for chats without a system message; "" = none
    # Defaults for the settings a request leaves out (chat.py's):
    max_new_tokens: int = 512  # max_tokens; never beyond the room left in the context
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    repetition_penalty: float = 1.1
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:1 ...
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32

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
    max_tokens: int | None  # None: as many as fit, up to the server's max_new_tokens
    stop: list[str]
    stream: bool
    include_usage: bool  # streaming: a last chunk with the token counts


def read_settings(body: dict, cfg: ServeConfig) -> Settings:
    for key in UNSUPPORTED:
        require(not body.get(key), key, "not supported by this server.")
    response_format = field(body, "response_format", dict, {"type": "text"})
    require(response_format.get("type") == "text", "response_format", "only {\"type\": \"text\"} is supported.")
    for key in ("presence_penalty", "frequency_penalty"):
        require(not field(body, key, float), key, "not supported by this server; use 'repetition_penalty'.")
    require(field(body, "n", int, 1) == 1, "n", "this server gives one choice per request (n = 1).")
    temperature = field(body, "temperature", float, cfg.temperature)
    require(0 <= temperature <= 2, "temperature", f"must be between 0 and 2, got {temperature}.")
    top_p = field(body, "top_p", float, cfg.top_p)
    require(0 <= top_p <= 1, "top_p", f"must be between 0 and 1, got {top_p}.")
    top_k = field(body, "top_k", int, cfg.top_k)  # <= 0: off
    repetition_penalty = field(body, "repetition_penalty", float, cfg.repetition_penalty)
    require(repetition_penalty > 0, "repetition_penalty", f"must be > 0, got {repetition_penalty}.")
    max_tokens = field(body, "max_tokens", int, field(body, "max_completion_tokens", int))
    require(max_tokens is None or max_tokens >= 1, "max_tokens", f"must be at least 1, got {max_tokens}.")
    seed = field(body, "seed", int)
    require(seed is None or -2**63 <= seed < 2**63, "seed", "must be a 64-bit integer.")
    stop = field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    require(all(isinstance(s, str) for s in stop), "stop", "must be a string or an array of strings.")
    require(len(stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}.")
    require(all(len(s) <= MAX_STOP_CHARS for s in stop), "stop",
            f"a stop string may have at most {MAX_STOP_CHARS} characters, got {max(map(len, stop), default=0)}.")
    stream = field(body, "stream", bool, False)
    include_usage = stream and bool(field(body, "stream_options", dict, {}).get("include_usage"))
    generation = GenerationConfig(temperature=temperature, top_p=top_p, top_k=top_k,
                                  repetition_penalty=repetition_penalty, do_sample=temperature > 0, seed=seed)
    return Settings(generation, max_tokens, [s for s in stop if s], stream, include_usage)


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

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Engine:
    """The model and its tokenizer, used by one request at a time (see the module docstring)."""

    def __init__(self, model, tokenizer, model_id: str, cfg: ServeConfig):
        self.model, self.tokenizer, self.model_id, self.cfg = model, tokenizer, model_id, cfg
        self.context_len = model.config.max_position_embeddings
        self.lock = asyncio.Lock()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generation")
        self.created = int(time.time())
        self.closing = False  # the server is shutting down: answers end after their current token

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
            requested = requested or 1
            raise APIError(400, f"This model's maximum context length is {self.context_len} tokens. However, you "
                                f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
                                f"{requested} in the completion). Please reduce the length of the prompt or "
                                f"completion.", param=param, code="context_length_exceeded")
        return requested

    async def generate(self, prompt_ids: list[int], gen: GenerationConfig, stops: list[str],
                       answer: Answer) -> AsyncIterator[str]:
        """The answer's text in pieces of whole characters, cut before the first stop
        string. Waits its turn for the model; fills answer's counts and finish reason."""
        async with self.lock:
            loop = asyncio.get_running_loop()
            stats: dict = {}
            tokens = generate_stream(self.model, prompt_ids, gen, stats=stats, vocab_size=self.tokenizer.vocab_size,
                                     stop_ids=(self.tokenizer.im_end_id, self.tokenizer.eot_id))
            streamer, cutter = TextStreamer(self.tokenizer), StopStrings(stops)
            try:
                while not cutter.stopped and not self.closing:
                    token = await loop.run_in_executor(self.worker, next, tokens, None)  # one model step
                    if token is None:
                        text = cutter.push(streamer.flush(), last=True)
                    else:
                        text = cutter.push(streamer.put(token))
                    if text:
                        yield text
                    if token is None:
                        break
            finally:
                # Also when the client hung up: the worker closes the generation after the
                # step it may still be running, before any step of the next request.
                self.worker.submit(tokens.close)
            answer.completion_tokens = stats.get("new_tokens", 0)  # none when shutdown came first
            answer.finish_reason = "stop" if cutter.stopped or stats.get("stop") == "stop_id" else "length"


# ---------------------------------------------------------------- the HTTP layer

def server_sent_event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def respond(request, engine: Engine, prompt_ids: list[int], settings: Settings, chat: bool):
    """The whole answer as one JSON object, or streamed as server-sent events."""
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    settings.generation.max_new_tokens = engine.max_tokens(len(prompt_ids), settings.max_tokens,
                                                           param="messages" if chat else "prompt")
    answer = Answer(prompt_tokens=len(prompt_ids))
    pieces = engine.generate(prompt_ids, settings.generation, settings.stop, answer)
    kind = ("chat.completion.chunk" if settings.stream else "chat.completion") if chat else "text_completion"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
            "created": int(time.time()), "model": engine.model_id}

    if not settings.stream:
        text = []
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                text.append(piece)
                if await request.is_disconnected():  # nobody is waiting for the rest
                    return Response(status_code=499)  # (nginx's "client closed request", for the log)
        choice = {"message": {"role": "assistant", "content": "".join(text)}} if chat else {"text": "".join(text)}
        return JSONResponse({**head, "choices": [{"index": 0, **choice, "logprobs": None,
                                                  "finish_reason": answer.finish_reason}],
                             "usage": answer.usage()})

    def chunk(choice: dict, finish_reason: str | None = None) -> str:
        return server_sent_event({**head, "choices": [{"index": 0, **choice, "logprobs": None,
                                                       "finish_reason": finish_reason}]})

    async def events() -> AsyncIterator[str]:
        async with contextlib.aclosing(pieces):  # a client that hangs up stops the generation here
            if chat:
                yield chunk({"delta": {"role": "assistant", "content": ""}})
            async for piece in pieces:
                yield chunk({"delta": {"content": piece}} if chat else {"text": piece})
        yield chunk({"delta": {}} if chat else {"text": ""}, answer.finish_reason)
        if settings.include_usage:
            yield server_sent_event({**head, "choices": [], "usage": answer.usage()})
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

    async def chat_completions(request):
        body = await read_json(request)
        engine.check_model(body)
        messages = read_messages(body)
        settings = read_settings(body, engine.cfg)
        try:
            prompt_ids, _ = render(messages, engine.tokenizer, system_prompt=engine.cfg.system_prompt,
                                   add_generation_prompt=True, context_len=engine.context_len)
        except DataError as e:  # a Hugging Face template may refuse (or fail on) a conversation
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        return await respond(request, engine, prompt_ids, settings, chat=True)

    async def completions(request):
        body = await read_json(request)
        engine.check_model(body)
        prompt = field(body, "prompt", (str, list))
        if isinstance(prompt, list):  # OpenAI takes a batch of prompts; this server answers one at a time
            require(len(prompt) == 1 and isinstance(prompt[0], str), "prompt",
                    "expected a string (or an array of one string).")
            prompt = prompt[0]
        require(prompt is not None, "prompt", "a prompt is required.")
        settings = read_settings(body, engine.cfg)
        # An empty prompt starts a new document: what follows <|endoftext|> in pretraining.
        prompt_ids = engine.tokenizer.encode(prompt) or [engine.tokenizer.eot_id]
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
    return app


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
    """Load the model and build the (not yet started) uvicorn server."""
    try:
        import fastapi  # noqa: F401  (imported where used; checked here to fail before loading the model)
        import uvicorn
    except ImportError:
        raise UserError("serving needs FastAPI and uvicorn: pip install fastapi uvicorn") from None
    check_port(cfg.host, cfg.port)
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    start = time.time()
    model, tokenizer, model_path, adapter_path = load_model(cfg.model_path, cfg.adapter_path, device, dtype)
    check_template(tokenizer)  # a template that is not Jinja would fail every chat
    mode, why = resolve_mode("auto", model_path, adapter_path)
    engine = Engine(model, tokenizer, model_id(cfg.model_path), cfg)
    log(f"model: {engine.model_id} from {model_path} ({model.num_parameters() / 1e6:.1f}M parameters, context "
        f"{engine.context_len}) on {device} {str(dtype).removeprefix('torch.')}, loaded in "
        f"{time.time() - start:.1f}s")
    if mode == "completion":
        log(f"note: a base model ({why}): /v1/completions continues text; chats may make little sense")
    log(f"chat page: http://{cfg.host}:{cfg.port}/   API: http://{cfg.host}:{cfg.port}/v1")

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
    # uvicorn re-raises the signal after its shutdown, but inside asyncio's runner, which
    # can lose it when the signal arrives as the last task ends: say so here instead.
    if engine.closing:
        raise KeyboardInterrupt  # run_cli: "interrupted", exit code 130


if __name__ == "__main__":
    run_cli(main)
