"""python -m nanobumble.serve on a tiny model: the official openai client (streaming
and not), answers equal to chat.py's greedy ones, usage counts, stop strings and
seeds, OpenAI-shaped errors (every bad request a 4xx, bounded: the body, stop
strings, a model's chat template), concurrent clients, a client that hangs up,
Ctrl-C, a busy port, and the web page driven in a headless Chromium."""

import asyncio
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import torch
import pytest
from chat_helpers import save_tiny_chat_model
from conftest import REPO_ROOT
from helpers import generate, stream_text

from nanobumble import serve
from nanobumble.base.errors import DataError, UserError
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT, render
from nanobumble.data.tokenizer import EOT_ID, IM_END_ID, load_tokenizer
from nanobumble.inference.generation import GenerationConfig, apply_repetition_penalty
from nanobumble.inference.loading import load_model
from nanobumble.model.transformer import Transformer
from nanobumble.store.adapter import load_adapter
from nanobumble.store.model_dir import load_model_dir

REPO = REPO_ROOT
CORPUS = ("user: where do bees live?\nassistant: bees live in a hive and make honey from flowers.\n" * 5 +
          "蜜蜂住在蜂巢里，用花酿蜜。\n") * 3
MAX_NEW = 8  # the server's max_new_tokens: the answer length when a request leaves max_tokens out
CONTEXT = 128
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def user(text):
    return {"role": "user", "content": text}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    save_tiny_chat_model(root, CORPUS, CONTEXT, {"bee-sft": "model_name_or_path: tiny\nstage: sft\n"})
    return root / "bee-sft"


class Reference:
    """What chat.py computes for the same model: the functions it calls, in this process."""

    def __init__(self, model_dir, adapter=None):
        self.model, _ = load_model_dir(str(model_dir))
        if adapter:
            load_adapter(self.model, str(adapter))
        self.tokenizer = load_tokenizer(str(model_dir))

    def prompt(self, messages=None, text=None) -> list[int]:
        if messages is not None:
            return render(messages, self.tokenizer, system_prompt=DEFAULT_SYSTEM_PROMPT, add_generation_prompt=True)[0]
        return self.tokenizer.encode(text)

    def answer(self, messages=None, text=None, **settings) -> tuple[str, list[int], list[int]]:
        """(text, prompt ids, new ids); greedy with chat.py's defaults unless settings say otherwise."""
        prompt = self.prompt(messages, text)
        gen = GenerationConfig(**{"do_sample": False, "max_new_tokens": MAX_NEW, **settings})
        new = generate(self.model, prompt, gen, vocab_size=self.tokenizer.vocab_size)
        return "".join(stream_text(self.tokenizer, new)), prompt, new


@pytest.fixture(scope="module")
def reference(model_dir):
    return Reference(model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir, **keys):
    """The server in a background thread of this process (uvicorn installs no signal handlers there). fp32:
    answers are compared with fp32 references (precision auto is bf16 on a CPU with native bf16)."""
    cfg = serve.ServeConfig(model_path=str(model_dir), port=free_port(), max_new_tokens=MAX_NEW, device="cpu",
                            precision="fp32", **keys)
    uvicorn_server = serve.create_server(cfg)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uvicorn_server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    uvicorn_server.port = cfg.port
    uvicorn_server.engine = uvicorn_server.config.app.state.engine
    yield uvicorn_server
    uvicorn_server.should_exit = True
    thread.join(timeout=10)
    uvicorn_server.engine.batcher.close()


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir) as uvicorn_server:
        yield uvicorn_server


def openai_client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def client(server):
    return openai_client(server)


def post(server, path: str, body, method: str = "POST") -> tuple[int, dict]:
    """A raw request (bytes or a JSON-able body): status and parsed JSON answer."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    status, answer = response.status, json.loads(response.read())
    connection.close()
    return status, answer


def finish_reason(new_ids) -> str:
    return "length" if len(new_ids) == MAX_NEW else "stop"


def test_models_lists_the_model_directory_name(client):
    assert [m.id for m in client.models.list().data] == ["bee-sft"]
    assert client.models.retrieve("bee-sft").id == "bee-sft"


def test_greedy_chat_answer_and_usage_equal_chat_py(client, reference):
    messages = [user("where do bees live?")]
    reply = client.chat.completions.create(model="bee-sft", messages=messages, temperature=0)
    text, prompt, new = reference.answer(messages)
    assert reply.choices[0].message.content == text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == finish_reason(new)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (len(prompt), len(new), len(prompt) + len(new))


def test_streamed_chat_with_system_prompt_and_history(client, reference):
    messages = [{"role": "system", "content": "You are a bee."}, user("hello bees"),
                {"role": "assistant", "content": "bzz"}, user("and honey?")]
    stream = client.chat.completions.create(model="bee-sft", messages=messages, temperature=0, max_tokens=5,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text, prompt, new = reference.answer(messages, max_new_tokens=5)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ("length" if len(new) == 5 else "stop")
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == len(new)
    assert chunks[-1].usage.prompt_tokens == len(prompt)


def test_completions_continue_the_text(client, reference):
    text, prompt, new = reference.answer(text="bees live in")
    reply = client.completions.create(model="bee-sft", prompt="bees live in", temperature=0)
    assert reply.choices[0].text == text
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(new))
    stream = client.completions.create(model="bee-sft", prompt="bees live in", temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == text


def test_a_seed_makes_sampling_reproducible(client, reference):
    messages = [user("tell me about honey")]
    answers = [client.chat.completions.create(model="bee-sft", messages=messages, temperature=1.0, seed=7)
               .choices[0].message.content for _ in range(2)]
    # chat.py's sampling defaults for what the request leaves out (top_p 0.8, top_k 20, penalty 1.1)
    expected, _, _ = reference.answer(messages, do_sample=True, temperature=1.0, seed=7)
    assert answers == [expected, expected]


def test_stop_strings_cut_the_answer(client, reference):
    messages = [user("where do bees live?")]
    full, _, _ = reference.answer(messages)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert len(stop) == 2, f"the tiny model's answer is too short to test: {full!r}"
    cut = full[:full.find(stop)]
    reply = client.chat.completions.create(model="bee-sft", messages=messages, temperature=0, stop=[stop, "zzz"])
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="bee-sft", messages=messages, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == cut


def test_stop_strings_hold_back_what_may_begin_one():
    cutter = serve.StopStrings(["abc"])
    assert cutter.push("xa") == "x"  # "a" may begin "abc"
    assert cutter.push("b") == ""
    assert cutter.push("x") == "abx"  # it did not
    assert cutter.push("ab") == ""
    assert cutter.push("cdef") == "" and cutter.stopped
    assert serve.StopStrings(["abc"]).push("zab", last=True) == "zab"  # the end: nothing more can come


def test_errors_have_openai_shape_and_status(server, client, model_dir):
    def check(status, body, expected_status, param=None, code=None):
        assert status == expected_status, body
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
        assert (body["error"]["param"], body["error"]["code"]) == (param, code), body

    check(*post(server, "/v1/chat/completions", b"{not json"), 400, code="invalid_json")
    check(*post(server, "/v1/chat/completions", [1, 2]), 400, code="invalid_json")
    check(*post(server, "/v1/chat/completions", {"model": "gpt-4", "messages": [user("hi")]}), 404, "model",
          "model_not_found")
    good = {"model": "bee-sft", "messages": [user("hi")]}
    for bad, param, code in [({"temperature": 5}, "temperature", "invalid_value"),
                             ({"temperature": "hot"}, "temperature", "invalid_type"),
                             ({"max_tokens": 0}, "max_tokens", "invalid_value"),
                             ({"top_p": 1.5}, "top_p", "invalid_value"),
                             ({"n": 9}, "n", "invalid_value"),
                             ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
                             ({"messages": []}, "messages", "invalid_value"),
                             ({"messages": [user("a"), user("b")]}, "messages", "invalid_value"),
                             ({"model": None}, "model", "invalid_value")]:
        check(*post(server, "/v1/chat/completions", {**good, **bad}), 400, param, code)
    check(*post(server, "/v1/completions", {"model": "bee-sft", "prompt": ["a", "b"]}), 400, "prompt",
          "invalid_value")
    check(*post(server, "/v1/nowhere", good), 404)
    check(*post(server, "/v1/models", good), 405)

    # a prompt that leaves no room for max_tokens is refused, not cut
    long_chat = [user("bees live in a hive " * 40)]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="bee-sft", messages=long_chat)
    assert error.value.status_code == 400 and error.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as error:  # fits alone, not with the answer
        client.completions.create(model="bee-sft", prompt="bees " * 20, max_tokens=CONTEXT)
    assert error.value.code == "context_length_exceeded" and f"{CONTEXT} tokens" in str(error.value)
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="bee", messages=[user("hi")])
    assert error.value.code == "model_not_found"


def check_error(status, body, expected_status, param=None, code=None, message=""):
    """An answer in OpenAI's error shape, with this status, param, code and words in its message."""
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert (body["error"]["param"], body["error"]["code"]) == (param, code), body
    assert message in body["error"]["message"] and len(body["error"]["message"]) < 400, body


GOOD = {"model": "bee-sft", "messages": [user("hi")], "max_tokens": 1}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", b'{"model": "bee-sft", "messages": [{"role": "user", "content": "bees \\ud800"}]}',
     "messages"),
    ("/v1/completions", b'{"model": "bee-sft", "prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", b'{"model": "bee-sft", "prompt": "bees", "stop": ["\\udc00"]}', "stop"),
    ("/v1/completions", b'{"model": "\\ud800", "prompt": "bees"}', "model"),
])
def test_a_lone_surrogate_is_a_400(server, path, body, param):
    check_error(*post(server, path, body), 400, param, "invalid_value", "lone UTF-16 surrogate")


def test_a_stop_string_has_at_most_1000_characters(server):
    status, body = post(server, "/v1/completions", {"model": "bee-sft", "prompt": "bees", "stop": ["x" * 1000]})
    assert status == 200, body
    check_error(*post(server, "/v1/completions", {"model": "bee-sft", "prompt": "bees", "stop": ["a", "x" * 1001]}),
                400, "stop", "invalid_value", "at most 1000 characters, got 1001")


def test_a_max_tokens_of_400_digits_is_refused_in_a_short_message(server):
    status, body = post(server, "/v1/completions", {"model": "bee-sft", "prompt": "bees", "max_tokens": 10**400})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert len(body["error"]["message"]) < 300, body["error"]["message"]  # the number shortened, not 400 digits


def test_a_body_over_1_mb_is_refused_unread(server):
    # Its Content-Length is enough: the server answers without waiting for a byte of it.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(2 << 20))
    connection.endheaders()
    response = connection.getresponse()
    check_error(response.status, json.loads(response.read()), 413, code="request_too_large", message="1048576 bytes")
    connection.close()
    # Chunked, with no length: the reading stops at 1 MB.
    text = json.dumps({"model": "bee-sft", "prompt": "bees " * 210_000, "max_tokens": 1}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/completions", body=(text[i:i + 65536] for i in range(0, len(text), 65536)),
                       headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    check_error(response.status, json.loads(response.read()), 413, code="request_too_large")
    connection.close()


@pytest.mark.parametrize("path, body, status, param, code", [
    # JSON that Python's parser takes but JSON does not: NaN, Infinity, numbers beyond a float
    ("/v1/completions", b'{"model": "bee-sft", "prompt": "bees", "repetition_penalty": Infinity}', 400, None,
     "invalid_json"),
    ("/v1/completions", b'{"model": "bee-sft", "prompt": "bees", "top_p": NaN}', 400, None, "invalid_json"),
    ("/v1/completions", b'{"model": "bee-sft", "prompt": "bees", "repetition_penalty": 1e400}', 400, None,
     "invalid_json"),
    ("/v1/completions", b'{"model": "bee-sft", "prompt": "bees", "temperature": 1' + b"0" * 400 + b"}", 400,
     "temperature", "invalid_value"),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, None, "invalid_json"),  # nested past the stack
    ("/v1/chat/completions", {**GOOD, "response_format": "json"}, 400, "response_format", "unsupported_parameter"),
    # wrong types and values
    ("/v1/chat/completions", {**GOOD, "n": 10**30}, 400, "n", "invalid_value"),
    ("/v1/chat/completions", {**GOOD, "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
    ("/v1/chat/completions", {**GOOD, "top_k": 1.5}, 400, "top_k", "invalid_type"),
    ("/v1/chat/completions", {**GOOD, "stream": "yes"}, 400, "stream", "invalid_type"),
    ("/v1/chat/completions", {**GOOD, "seed": 2**64}, 400, "seed", "invalid_value"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages", "invalid_value"),
    ("/v1/chat/completions", {**GOOD, "messages": [{"role": "x" * 10_000, "content": "hi"}]}, 400, "messages",
     "invalid_value"),
    ("/v1/completions", {"model": "bee-sft", "prompt": [1, 2.5, 3]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": "bee-sft", "prompt": [1, 10**6]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": "bee-sft", "prompt": "bees", "max_tokens": 0}, 400, "max_tokens",
     "invalid_value"),  # 0 only with echo
    ("/v1/completions", {"model": "bee-sft", "prompt": "bees", "logprobs": 6}, 400, "logprobs", "invalid_value"),
    ("/v1/completions", {"model": "bee-sft", "prompt": "bees", "logprobs": 1, "stream": True}, 400, "logprobs",
     "invalid_value"),
    ("/v1/chat/completions", {**GOOD, "echo": True}, 400, "echo", "unsupported_parameter"),  # completions only
    ("/v1/completions", {"model": "x" * 10_000, "prompt": "bees"}, 404, "model", "model_not_found"),
])
def test_every_bad_request_is_a_4xx_in_openai_shape(server, path, body, status, param, code):
    check_error(*post(server, path, body), status, param, code)


def test_an_adapter_is_applied_on_top_of_the_model(model_dir):
    messages = [user("where do bees live?")]
    with running_server(model_dir, adapter_path=str(model_dir.parent / "adapter")) as server:
        reply = openai_client(server).chat.completions.create(model="bee-sft", messages=messages, temperature=0)
    with_adapter = Reference(model_dir, adapter=model_dir.parent / "adapter").answer(messages)[0]
    assert with_adapter != Reference(model_dir).answer(messages)[0]  # the adapter changes the answer
    assert reply.choices[0].message.content == with_adapter


def test_concurrent_clients_each_get_their_own_answer(server, reference):
    questions = ["where do bees live?", "hello bees", "what is honey?", "蜜蜂住在哪里？"]
    expected = [reference.answer([user(q)])[0] for q in questions]
    answers = [None] * len(questions)

    def ask(i):  # a client of its own per thread; half of them stream
        client = openai_client(server)
        for _ in range(3):
            if i % 2:
                stream = client.chat.completions.create(model="bee-sft", messages=[user(questions[i])],
                                                        temperature=0, stream=True)
                answer = "".join(c.choices[0].delta.content or "" for c in stream)
            else:
                answer = client.chat.completions.create(model="bee-sft", messages=[user(questions[i])],
                                                        temperature=0).choices[0].message.content
            assert answers[i] in (None, answer)
            answers[i] = answer

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert answers == expected


def slow_down(monkeypatch, seconds: float) -> list:
    """Every forward pass takes `seconds` longer and the model never ends its turn: long
    answers to interrupt. Returns the list that gets one entry per forward pass."""
    forward = Transformer.forward
    calls = []

    def slow_forward(self, *args, **kwargs):
        time.sleep(seconds)
        calls.append(time.time())
        logits = forward(self, *args, **kwargs)
        logits[..., [IM_END_ID, EOT_ID]] = float("-inf")
        return logits

    monkeypatch.setattr(Transformer, "forward", slow_forward)
    return calls


@pytest.fixture
def slow_model(monkeypatch):
    return slow_down(monkeypatch, 0.05)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_frees_the_model(server, slow_model, stream):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                       body=json.dumps({"model": "bee-sft", "prompt": "bees", "max_tokens": 100, "stream": stream}))
    if stream:
        response = connection.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: ")  # the request is in (its 100 tokens take 5 s)
    else:
        time.sleep(0.3)  # the answer is under way
        assert slow_model
    connection.close()  # hang up
    start = time.time()
    status, body = post(server, "/v1/completions", {"model": "bee-sft", "prompt": "honey", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    assert time.time() - start < 2.0, "the next request waited for the abandoned answer"
    calls = len(slow_model)
    time.sleep(0.3)
    assert len(slow_model) == calls  # nothing generates any more
    assert server.engine.busy_rows() == 0


def test_a_step_that_ends_after_the_event_loop_has_closed_does_not_kill_the_batcher(model_dir, monkeypatch):
    """Shutdown closes the server's event loop while the batcher thread may be inside a
    step for an answer of that loop: its token then arrives for a loop that is gone. The
    batcher must go on (no traceback, the next answer still comes), not die."""
    model, tokenizer, _, _ = load_model(str(model_dir), "", torch.device("cpu"), torch.float32)
    engine = serve.Engine(model, tokenizer, "bee-sft", serve.ServeConfig(model_path=str(model_dir)))
    prompt = render([user("bees")], tokenizer, add_generation_prompt=True)[0]
    gen = GenerationConfig(max_new_tokens=20, temperature=0)
    in_step = threading.Event()
    forward = Transformer.forward

    def slow_forward(self, *args, **kwargs):
        in_step.set()
        time.sleep(0.3)  # long enough for the loop below to close while this step runs
        logits = forward(self, *args, **kwargs)
        logits[..., [IM_END_ID, EOT_ID]] = float("-inf")
        return logits

    failures = []
    monkeypatch.setattr(threading, "excepthook", lambda info: failures.append(info.exc_value))
    monkeypatch.setattr(Transformer, "forward", slow_forward)

    async def first_piece():
        async for _ in engine.generate(prompt, gen, [], serve.Answer(len(prompt))):
            in_step.clear()
            in_step.wait(5)  # the next step has begun: leave with it under way (the loop closes)
            return

    try:
        asyncio.run(first_piece())
        time.sleep(0.6)  # the step in flight ends, and delivers to the closed loop
        monkeypatch.setattr(Transformer, "forward", forward)
        assert not failures, failures
        handle = engine.batcher.submit(prompt, GenerationConfig(max_new_tokens=3, temperature=0),
                                       stop_ids=(IM_END_ID, EOT_ID), vocab_size=tokenizer.vocab_size)
        deadline = time.time() + 30
        while not handle.done and time.time() < deadline:
            time.sleep(0.05)
        assert handle.done and len(handle.poll()) == 3
    finally:
        engine.batcher.close()


def test_ctrl_c_stops_a_running_answer_and_the_server(model_dir):
    """A server process (with the slow model) interrupted in the middle of an answer exits promptly."""
    port = free_port()
    script = ("import sys, time, torch\n"
              "from nanobumble import serve\n"
              "from nanobumble.model.transformer import Transformer\n"
              "forward = Transformer.forward\n"
              "def slow_forward(self, *args, **kwargs):\n"
              "    time.sleep(0.05)\n"
              "    logits = forward(self, *args, **kwargs)\n"
              "    logits[..., [1, 3]] = float('-inf')\n"
              "    return logits\n"
              "Transformer.forward = slow_forward\n"
              "sys.argv[1:] = " + repr(["--model_path", str(model_dir), "--port", str(port), "--device", "cpu"]) + "\n"
              "serve.run_cli(serve.main)\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                connection.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                                   body=json.dumps({"model": "bee-sft", "prompt": "bees", "max_tokens": 100,
                                                    "stream": True}))
                response = connection.getresponse()
                break
            except ConnectionRefusedError:
                assert process.poll() is None and time.time() < deadline, process.stdout.read().decode()
                time.sleep(0.1)
        assert response.readline().startswith(b"data: ")  # under way: 100 tokens would take 5 s
        start = time.time()
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=30)[0].decode()
        assert time.time() - start < 4, output  # not the 5 s the answer had left
        assert process.returncode == 130 and "interrupted" in output and "Traceback" not in output, output
    finally:
        if process.poll() is None:
            process.kill()


def run_main(monkeypatch, capsys, argv: list[str]) -> tuple[int, list[str]]:
    """serve.main as `python -m nanobumble.serve ARGV` runs it: the exit code and the stderr lines."""
    monkeypatch.setattr(sys, "argv", ["serve", *argv])
    with pytest.raises(SystemExit) as exit_:
        serve.run_cli(serve.main)
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()


def test_a_busy_port_is_one_line_before_the_model_loads(monkeypatch, capsys, model_dir):
    def load_model(*args):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(serve, "load_model", load_model)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, lines = run_main(monkeypatch, capsys, ["--model_path", str(model_dir), "--port", str(port)])
    assert (code, lines) == (2, [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"])


def test_without_fastapi_one_line_says_what_to_install(monkeypatch, model_dir, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    with pytest.raises(UserError, match="pip install fastapi uvicorn"):
        serve.create_server(serve.ServeConfig(model_path=str(model_dir)))
    monkeypatch.setattr(sys, "argv", ["serve", "--model_path", str(model_dir)])
    with pytest.raises(SystemExit) as exit_:
        serve.run_cli(serve.main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: serving needs FastAPI and uvicorn: pip install fastapi uvicorn"]


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason=f"Chromium not installed ({CHROMIUM}, {CHROMEDRIVER}): "
                           f"apt-get install -y chromium chromium-driver")
def test_web_chat_in_headless_chromium(server, reference, tmp_path, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,720"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        browser.get(f"http://127.0.0.1:{server.port}/?temperature=0")  # greedy
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: b.find_element(By.ID, "model").text == "bee-sft")
        browser.find_element(By.ID, "system").send_keys("You are a bee.")
        conversation = [{"role": "system", "content": "You are a bee."}]
        for turn, question in enumerate(["where do bees live?", "and honey?"]):
            browser.find_element(By.ID, "message").send_keys(question)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".message.assistant")) == turn + 1
                       and b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
            conversation.append(user(question))
            expected = reference.answer(conversation)[0]
            shown = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1].get_attribute("textContent")
            assert shown == expected
            conversation.append({"role": "assistant", "content": expected})
        screenshot = tmp_path / "web_chat.png"
        browser.save_screenshot(str(screenshot))
        print(f"screenshot: {screenshot}")

        # Stop: the answer ends where it was, and the model is free again.
        calls = slow_down(monkeypatch, 0.2)  # 8 tokens: 1.6 s
        browser.find_element(By.ID, "message").send_keys("tell me more")
        browser.find_element(By.ID, "send").click()
        bubbles = lambda: browser.find_elements(By.CSS_SELECTOR, ".message.assistant")
        wait.until(lambda b: len(bubbles()) == 3 and bubbles()[-1].get_attribute("textContent"))
        browser.find_element(By.ID, "stop").click()
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
        deadline = time.time() + 1
        while server.engine.busy_rows():
            assert time.time() < deadline, "the stopped answer still holds the model"
            time.sleep(0.02)
        assert len(calls) < MAX_NEW  # a whole answer: MAX_NEW forward passes (the prompt, then a token each)
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from hf_qwen2 import make_qwen2_dir, tokenizer_texts

    return make_qwen2_dir(str(tmp_path_factory.mktemp("hf") / "qwen"), tokenizer_texts())


def with_template(qwen_dir, directory, template: str) -> str:
    """A copy of the Qwen2 directory with another chat template."""
    shutil.copytree(qwen_dir, directory)
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    return str(directory)


def test_a_hugging_face_qwen2_directory_is_served(qwen_dir):
    qwen = qwen_dir
    messages = [user("copy:\nabc")]
    text, prompt, new = Reference(qwen).answer(messages)  # its tokenizer.json and Jinja chat template
    with running_server(qwen) as qwen_server:
        reply = openai_client(qwen_server).chat.completions.create(model="qwen", messages=messages, temperature=0)
    assert reply.choices[0].message.content == text
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(new))


def test_a_chat_template_that_fails_on_a_conversation_is_a_400(qwen_dir, tmp_path):
    from hf_qwen2 import CHAT_TEMPLATE

    template = ("{%- set last = messages[-1]['content'] -%}"
                "{%- if last == 'undefined' -%}{{ nothing.at_all }}"
                "{%- elif last == 'sandbox' -%}{{ messages.append(1) }}"
                "{%- elif last == 'empty' -%}"
                "{%- elif last == 'huge' -%}{% for i in range(100000) %}"  # 5M characters, if nothing stops it
                "{{ raise_exception('rendered it all') if i == 50000 else 'bees ' * 20 }}{% endfor %}"
                "{%- else -%}" + CHAT_TEMPLATE + "{%- endif -%}")
    model = with_template(qwen_dir, tmp_path / "qwen", template)
    with running_server(model) as qwen_server:
        for content, message in (("undefined", "UndefinedError: 'nothing' is undefined"),
                                 ("sandbox", "SecurityError: access to attribute 'append'"),
                                 ("empty", "rendered nothing"),
                                 ("huge", "exceeds 65536 characters")):  # the 256-token context, 256 a token
            status, body = post(qwen_server, "/v1/chat/completions", {"model": "qwen", "messages": [user(content)]})
            check_error(status, body, 400, "messages", "invalid_value", message)
            assert "chat_template.jinja" in body["error"]["message"]
        status, body = post(qwen_server, "/v1/chat/completions", {"model": "qwen", "messages": [user("copy:\nab")],
                                                                   "max_tokens": 2})
        assert status == 200, body


def test_a_chat_template_that_is_not_jinja_stops_the_server_before_it_starts(qwen_dir, tmp_path, monkeypatch,
                                                                              capsys):
    import uvicorn

    model = with_template(qwen_dir, tmp_path / "qwen", "{% for message in messages %}{{ message }")
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: pytest.fail("the server started"))
    with pytest.raises(DataError, match="chat_template.jinja:1: the chat template failed: TemplateSyntaxError"):
        serve.create_server(serve.ServeConfig(model_path=model, port=free_port(), device="cpu"))
    code, lines = run_main(monkeypatch, capsys, ["--model_path", model, "--port", str(free_port())])
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {model}/chat_template.jinja:1: "), lines


# ---------------------------------------------------------------- health, key, model name, n, echo/logprobs

def get(port: int, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    status, data = response.status, response.read()
    connection.close()
    return status, data


def test_health_answers_while_the_model_is_loaded(server):
    status, data = get(server.port, "/health")
    assert (status, json.loads(data)) == (200, {"status": "ok", "model": "bee-sft"})


KEY = "sk-bees-7f3a"


@pytest.fixture(scope="module")
def keyed_server(model_dir):
    with running_server(model_dir, api_key=KEY, served_model_name="honey-1") as uvicorn_server:
        yield uvicorn_server


def test_an_api_key_guards_every_v1_request(keyed_server, reference):
    port = keyed_server.port
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        for path in ("/v1/models", "/v1/models/honey-1", "/v1/nowhere"):
            status, data = get(port, path, headers)
            check_error(status, json.loads(data), 401, code="invalid_api_key", message="API key")
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as error:
        wrong.chat.completions.create(model="honey-1", messages=[user("hi")])
    assert error.value.status_code == 401 and error.value.code == "invalid_api_key"
    # /health and the page stay open (as vLLM leaves all but /v1 open); the page asks for the key
    assert get(port, "/health")[0] == 200 and get(port, "/")[0] == 200
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="honey-1", messages=[user("where do bees live?")], temperature=0)
    assert reply.choices[0].message.content == reference.answer([user("where do bees live?")])[0]


def test_served_model_name_is_the_only_model_id(keyed_server):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{keyed_server.port}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["honey-1"]
    assert client.completions.create(model="honey-1", prompt="bees", max_tokens=1).model == "honey-1"
    with pytest.raises(openai.NotFoundError):  # the directory name is no longer an id
        client.completions.create(model="bee-sft", prompt="bees", max_tokens=1)
    assert json.loads(get(keyed_server.port, "/health")[1])["model"] == "honey-1"


def test_the_api_key_can_come_from_the_environment(model_dir, monkeypatch):
    monkeypatch.setenv("NANOBUMBLE_API_KEY", KEY)
    with running_server(model_dir) as env_server:
        assert get(env_server.port, "/v1/models")[0] == 401
        assert get(env_server.port, "/v1/models", {"Authorization": f"Bearer {KEY}"})[0] == 200


@pytest.mark.parametrize("chat", [True, False])
def test_n_choices_each_seeded_with_seed_plus_index(client, reference, chat):
    messages, prompt = [user("tell me about honey")], "bees live in"

    def create(seed=7, **settings):
        ask = dict(model="bee-sft", temperature=1.0, seed=seed, top_p=1.0, extra_body={"top_k": 0}, **settings)
        if chat:
            return client.chat.completions.create(messages=messages, **ask)
        return client.completions.create(prompt=prompt, **ask)

    def text(choice):
        return choice.message.content if chat else choice.text

    reply = create(n=4)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    texts = [text(c) for c in reply.choices]
    expected = [reference.answer(messages if chat else None, None if chat else prompt, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, seed=7 + i) for i in range(4)]
    assert texts == [e[0] for e in expected] and len(set(texts)) > 1  # reproducible, and they differ
    assert text(create(seed=9).choices[0]) == texts[2]  # choice 2 is seed 9's answer
    assert reply.usage.completion_tokens == sum(len(e[2]) for e in expected)  # the prompt counts once:
    assert reply.usage.prompt_tokens == len(expected[0][1])
    # streamed: the same texts, each choice ending once
    chunks = list(create(n=4, stream=True, stream_options={"include_usage": True}))
    streamed, ends = [""] * 4, [0] * 4
    for c in chunks:
        for choice in c.choices:
            streamed[choice.index] += (choice.delta.content or "") if chat else choice.text
            ends[choice.index] += choice.finish_reason is not None
    assert streamed == texts and ends == [1] * 4
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def scoring_reference(reference, ids: list[int]) -> list[float]:
    """nanobumble's own scoring (nanobumble.evals.scoring) of every token of ids after the first."""
    from nanobumble.evals.scoring import target_logprobs

    return target_logprobs(reference.model, [(ids[:-1], ids[1:])], torch.device("cpu"), torch.float32, 1)[0].tolist()


def test_echo_with_max_tokens_0_scores_the_prompt(client, reference):
    prompt = "bees live in a hive 蜜蜂"
    reply = client.completions.create(model="bee-sft", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice, ids = reply.choices[0], reference.prompt(text=prompt)
    layout = choice.logprobs
    assert choice.text == prompt and "".join(layout.tokens) == prompt and len(layout.tokens) == len(ids)
    assert layout.text_offset == [len("".join(layout.tokens[:i])) for i in range(len(ids))]
    assert layout.token_logprobs[0] is None and layout.top_logprobs[0] is None
    assert layout.token_logprobs[1:] == pytest.approx(scoring_reference(reference, ids), abs=1e-5)
    for logprob, top in zip(layout.token_logprobs[1:], layout.top_logprobs[1:]):
        assert 2 <= len(top) <= 3 and max(top.values()) >= logprob  # the 2 likeliest, and the chosen token
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 0)
    assert choice.finish_reason == "length"
    # the prompt as token ids: the same scores
    by_ids = client.completions.create(model="bee-sft", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert by_ids.choices[0].logprobs.token_logprobs == pytest.approx(layout.token_logprobs, abs=1e-9)


def test_logprobs_of_a_greedy_answer(client, reference):
    prompt = "bees live in"
    greedy = dict(model="bee-sft", prompt=prompt, temperature=0, extra_body={"repetition_penalty": 1.0}, max_tokens=5)
    text, ids, new = reference.answer(text=prompt, repetition_penalty=1.0, max_new_tokens=5)
    reply = client.completions.create(**greedy, logprobs=1)
    layout = reply.choices[0].logprobs
    assert reply.choices[0].text == text and "".join(layout.tokens) == text and len(layout.tokens) == len(new)
    assert layout.token_logprobs == pytest.approx(scoring_reference(reference, ids + new)[len(ids) - 1:], abs=1e-5)
    # greedy without a penalty: every chosen token is the likeliest
    assert all(lp == pytest.approx(max(top.values()), abs=1e-9) for lp, top in zip(layout.token_logprobs,
                                                                                   layout.top_logprobs))
    echoed = client.completions.create(**greedy, logprobs=1, echo=True).choices[0]
    assert echoed.text == prompt + text and len(echoed.logprobs.tokens) == len(ids) + len(new)
    assert echoed.logprobs.token_logprobs[len(ids):] == pytest.approx(layout.token_logprobs, abs=1e-9)
    streamed = client.completions.create(**greedy, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == prompt + text


@pytest.mark.parametrize("key, value", [("response_format", {"type": "text"}), ("min_p", 0), ("ignore_eos", False),
                                        ("min_tokens", 0), ("stop_token_ids", []), ("logit_bias", {}),
                                        ("user", "me"), ("response_format", None)])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_field_the_server_does_not_implement_is_refused_whatever_its_value(server, path, key, value):
    body = {"model": "bee-sft", "max_tokens": 1, **({"messages": [user("hi")]} if "chat" in path else
                                                    {"prompt": "bees"}), key: value}
    check_error(*post(server, path, body), 400, key, "unsupported_parameter", f"'{key}'")


LM_EVAL_TASK = """task: bees_served
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""
LM_EVAL_QUESTIONS = [("Bees live in a", ["hive", "cave", "copy of abc"], 0),
                     ("copy:\nabc ->", [" abc", " cba", " bac", "aaa"], 0),
                     ("Honey is made from", ["flowers", "stones"], 0),
                     ("蜜蜂住在", ["蜂巢里", "水里"], 0)]


@pytest.mark.slow
def test_lm_eval_local_completions_gets_nanobumbles_own_loglikelihoods(qwen_dir, tmp_path, monkeypatch):
    """lm-evaluation-harness's local-completions model (the OpenAI legacy completions API: echo,
    logprobs, token-id prompts) runs a multiple-choice task from a local task yaml against the server,
    with its key; each of its log-likelihoods is what nanobumble.evals.scoring computes in-process."""
    for key, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_HOME", str(tmp_path / "hf")),
                       ("OPENAI_API_KEY", KEY)):
        monkeypatch.setenv(key, value)
    import lm_eval
    from lm_eval.tasks import TaskManager

    from nanobumble.evals.scoring import encode_pair, scoring_row, target_logprobs

    data = tmp_path / "bees.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "gold": g}, ensure_ascii=False) + "\n"
                            for q, c, g in LM_EVAL_QUESTIONS), encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "bees_served.yaml").write_text(LM_EVAL_TASK.format(data=data), encoding="utf-8")
    with running_server(qwen_dir, api_key=KEY) as qwen_server:
        model_args = (f"model=qwen,base_url=http://127.0.0.1:{qwen_server.port}/v1/completions,"
                      f"tokenizer_backend=huggingface,tokenizer={qwen_dir},max_retries=1")
        theirs = lm_eval.simple_evaluate(model="local-completions", model_args=model_args, tasks=["bees_served"],
                                         task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                         log_samples=True, bootstrap_iters=0)
    reference = Reference(qwen_dir)
    samples = theirs["samples"]["bees_served"]
    assert len(samples) == len(LM_EVAL_QUESTIONS)
    largest, context_len = 0.0, reference.model.config.max_position_embeddings
    for sample in samples:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"], strict=True):
            row = scoring_row(*encode_pair(reference.tokenizer, context, continuation), context_len, "test")
            ours = target_logprobs(reference.model, [row], torch.device("cpu"), torch.float32, 1)[0].sum().item()
            assert response[0][0] == pytest.approx(ours, abs=1e-4), (context, continuation)
            largest = max(largest, abs(response[0][0] - ours))
    print(f"\nlm_eval local-completions: {sum(len(s['arguments']) for s in samples)} log-likelihoods, largest "
          f"difference from nanobumble's scoring {largest:.1e}")


def test_concurrent_requests_share_each_forward(server, reference, slow_model):
    """Three clients at once (and a request with n = 2): their tokens come from the same decode forwards
    (the batcher's rows per forward), and each still gets its own answer, as alone."""
    batcher = server.engine.batcher
    before = len(batcher.step_rows)
    prompts = ["bees live in", "honey is", "蜜蜂"]
    answers = [None] * len(prompts)

    def ask(i):
        client = openai_client(server)
        stream = client.completions.create(model="bee-sft", prompt=prompts[i], temperature=0, max_tokens=6,
                                           stream=True, n=2 if i == 0 else 1)
        texts = ["", ""]
        for c in stream:
            texts[c.choices[0].index] += c.choices[0].text
        answers[i] = texts

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    rows = batcher.step_rows[before:]
    print(f"\nrows per decode forward: {rows}")
    assert max(rows) >= 3  # 4 answers in flight: at least three of them in one forward
    # the slow model never ends its turn: each answer is its 6 greedy tokens without the end-of-turn token
    for prompt, texts in zip(prompts, answers):
        expected = "".join(stream_text(reference.tokenizer, greedy_without_end(reference, prompt, 6)))
        assert texts[0] == expected and texts[1] in ("", expected)
    assert answers[0][1] == answers[0][0]


def greedy_without_end(reference, prompt: str, count: int) -> list[int]:
    """Greedy ids with the end-of-turn ids forbidden (as slow_down makes the model), penalty 1.1."""
    ids = reference.prompt(text=prompt)
    new = []
    with torch.no_grad():
        for _ in range(count):
            logits = reference.model(torch.tensor([ids + new]))[0, -1, :reference.tokenizer.vocab_size].clone()
            logits[[IM_END_ID, EOT_ID]] = float("-inf")
            logits = apply_repetition_penalty(logits, torch.tensor(ids + new), 1.1)
            new.append(int(logits.argmax()))
    return new


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason=f"Chromium not installed ({CHROMIUM}, {CHROMEDRIVER})")
def test_web_chat_asks_for_the_api_key(keyed_server, reference):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        browser.get(f"http://127.0.0.1:{keyed_server.port}/?temperature=0")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: b.find_element(By.ID, "model").text == "API key needed")
        key_field = browser.find_element(By.ID, "api-key")
        assert key_field.is_displayed()
        key_field.send_keys("wrong" + Keys.ENTER)
        wait.until(lambda b: b.find_element(By.ID, "model").text == "wrong API key")
        key_field.send_keys(KEY + Keys.ENTER)
        wait.until(lambda b: b.find_element(By.ID, "model").text == "honey-1")
        assert not key_field.is_displayed()
        browser.find_element(By.ID, "message").send_keys("where do bees live?")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".message.assistant")
                   and b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
        shown = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1].get_attribute("textContent")
        assert shown == reference.answer([user("where do bees live?")])[0]
    finally:
        browser.quit()
