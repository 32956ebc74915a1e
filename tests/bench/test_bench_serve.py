"""The server answering 1 and 8 concurrent streaming clients, one request at a time
(a batcher of one row: the server before continuous batching) and batched (rows
join the running batch, one forward per step for all of them), side by side
(pytest -m bench -s tests/bench/test_bench_serve.py).

Each client streams a greedy completion of NEW_TOKENS tokens (the end-of-turn ids
are forbidden, so that every answer has its full length). Throughput: all the
clients' tokens over the wall time from the first request to the last token; time to
first token: from sending a request to its first text, mean and worst over clients.
Each row is the best throughput of REPEATS runs (with its times to first token)."""

import http.client
import json
import socket
import threading
import time

import pytest
import torch
from chat_helpers import save_tiny_chat_model
from conftest import print_table

from nanobumble import serve
from nanobumble.data.tokenizer import EOT_ID, IM_END_ID
from nanobumble.model.transformer import Transformer

NEW_TOKENS = 64
REPEATS = 3
CORPUS = ("user: where do bees live?\nassistant: bees live in a hive and make honey from flowers.\n" * 5 +
          "蜜蜂住在蜂巢里，用花酿蜜。\n") * 3
PROMPTS = ["bees live in", "honey is made", "where do bees", "a hive of", "flowers and", "蜜蜂住在", "the queen",
           "make honey"]


def bigger_model(root):
    """The tests' tiny chat model, at a size where a forward costs more than the HTTP around it."""
    import chat_helpers

    config = chat_helpers.ModelConfig

    def sized(**keys):  # hidden 64 -> 256 on CPU, 1024 on CUDA
        big = torch.cuda.is_available()
        keys.update(hidden_size=1024 if big else 256, num_layers=8 if big else 4, num_heads=8, num_kv_heads=4,
                    intermediate_size=2816 if big else 704)
        return config(**keys)

    chat_helpers.ModelConfig = sized
    try:
        save_tiny_chat_model(root, CORPUS, 512, {"bee": "model_name_or_path: tiny\nstage: sft\n"})
    finally:
        chat_helpers.ModelConfig = config
    return root / "bee"


def stream_one(port: int, prompt: str, result: dict) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    connection.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                       body=json.dumps({"model": "bee", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                                        "stream": True, "stream_options": {"include_usage": True}}))
    response = connection.getresponse()
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[len(b"data: "):])
        if chunk["choices"] and chunk["choices"][0]["text"] and "first" not in result:
            result["first"] = time.perf_counter() - start
        if chunk.get("usage"):
            result["tokens"] = chunk["usage"]["completion_tokens"]
    result["end"] = time.perf_counter()
    connection.close()


def measure(port: int, clients: int) -> tuple[float, float, float]:
    """(tokens/s over all clients, mean and worst time to first token in s)."""
    results = [{} for _ in range(clients)]
    threads = [threading.Thread(target=stream_one, args=(port, PROMPTS[i % len(PROMPTS)], results[i]))
               for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.get("tokens") == NEW_TOKENS for r in results), results
    wall = max(r["end"] for r in results) - start
    firsts = [r["first"] for r in results]
    return sum(r["tokens"] for r in results) / wall, sum(firsts) / len(firsts), max(firsts)


@pytest.mark.bench
def test_bench_serve_one_at_a_time_and_batched(tmp_path, monkeypatch, capsys):
    model_dir = bigger_model(tmp_path)
    forward = Transformer.forward

    def no_end_of_turn(self, *args, **kwargs):  # every answer its full length
        logits = forward(self, *args, **kwargs)
        if logits.dim() >= 2:  # [batch, vocab] from the cached decoder, [batch, seq, vocab] otherwise
            logits[..., [IM_END_ID, EOT_ID]] = float("-inf")
        return logits

    monkeypatch.setattr(Transformer, "forward", no_end_of_turn)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    servers = {}  # both up at once, measured in turns: a busy machine slows both alike
    for mode, max_batch in (("one at a time", 1), ("batched", serve.ServeConfig.max_batch)):
        cfg = serve.ServeConfig(model_path=str(model_dir), port=free_port(), device=device, max_new_tokens=NEW_TOKENS,
                                max_batch=max_batch)
        server = serve.create_server(cfg)
        server.config.log_level, server.config.access_log = "warning", False
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers[mode] = (server, thread, cfg.port)
    parameters = sum(p.numel() for p in server.config.app.state.engine.model.parameters())
    results = {}
    try:
        for server, _, port in servers.values():
            while not server.started:
                time.sleep(0.02)
            measure(port, 2)  # warm-up
        for _ in range(REPEATS):  # the best of REPEATS (the machine may be shared)
            for clients in (1, 8):
                for mode, (_, _, port) in servers.items():
                    result = measure(port, clients)
                    if result[0] > results.get((mode, clients), (0,))[0]:
                        results[mode, clients] = result
    finally:
        for server, thread, _ in servers.values():
            server.should_exit = True
            thread.join(timeout=30)
            server.config.app.state.engine.batcher.close()
    rows = []
    for clients in (1, 8):
        before, after = results["one at a time", clients], results["batched", clients]
        rows.append([clients, f"{before[0]:.0f}", f"{after[0]:.0f}", f"{after[0] / before[0]:.2f}x",
                     f"{before[1] * 1000:.0f} / {before[2] * 1000:.0f}",
                     f"{after[1] * 1000:.0f} / {after[2] * 1000:.0f}"])
    with capsys.disabled():
        title = f"server, {NEW_TOKENS} greedy tokens per streaming client, {device}, {parameters / 1e6:.1f}M parameters"
        print_table(title,
                    ["clients", "tok/s one at a time", "tok/s batched", "speed-up", "TTFT ms mean / max (one)",
                     "TTFT ms mean / max (batched)"], rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
