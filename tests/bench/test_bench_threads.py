"""Decode speed by CPU thread count, idle and beside a busy process, and what num_threads 0
chooses (pytest -m bench -s tests/bench/test_bench_threads.py).

For each thread count from 1 to the usable cores: greedy decode tokens/s of a small
model (the median of 3 alternated runs), first with nothing of ours running beside it,
then beside one busy process (a subprocess multiplying 1024 x 1024 matrices in a loop
with torch's default threads: another training job). "chosen" is what a program started
at that moment picks for num_threads 0 (base/cpu.py, run in a fresh process); "/ best"
is its speed over the best thread count's (issue 25 wants >= 0.8). No timing asserts:
the table is printed.
"""

import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT, print_table
from helpers import generate

from nanobumble.base.cpu import usable_cores
from nanobumble.inference.generation import GenerationConfig
from nanobumble.model.transformer import PRESETS, ModelConfig, Transformer

pytestmark = pytest.mark.bench

MODELS = {  # name: (shape, vocab); mid is the 26.8M-parameter shape of issue 25's CPU measurements
    "tiny": (PRESETS["tiny"], 4096),
    "mid": (dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1408,
                 max_position_embeddings=1024), 8192),
}
BUSY = "import torch\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"
CHOOSE = "from nanobumble.base.cpu import choose_num_threads\nprint(*choose_num_threads(0), sep='|')"


def build(name: str) -> Transformer:
    shape, vocab = MODELS[name]
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, **shape)).eval()


def decode_tokens_per_second(model: Transformer, threads: int, new_tokens: int = 48) -> float:
    torch.set_num_threads(threads)
    prompt = torch.randint(4, 1000, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    stats: dict = {}
    generate(model, prompt, GenerationConfig(do_sample=False, max_new_tokens=new_tokens), stop_ids=(), stats=stats)
    return stats["new_tokens"] / stats["decode_seconds"]


def chosen_threads() -> tuple[int, str]:
    """What num_threads 0 picks in a program starting now."""
    out = subprocess.run([sys.executable, "-c", CHOOSE], capture_output=True, text=True, cwd=REPO_ROOT, check=True,
                         env={**os.environ, "PYTHONPATH": REPO_ROOT})
    threads, why = out.stdout.strip().split("|")
    return int(threads), why


def measure(models: dict, counts: list[int], condition: str, rows: list, verdicts: list) -> None:
    threads, why = chosen_threads()
    load = open("/proc/loadavg").read().split()[:4] if os.path.exists("/proc/loadavg") else ["?"] * 4
    for name, model in models.items():
        decode_tokens_per_second(model, 1, new_tokens=4)  # warm-up
        speeds: dict[int, list[float]] = {n: [] for n in counts}
        for _ in range(3):  # alternated, so a change in the machine's load hits every count alike
            for n in counts:
                speeds[n].append(decode_tokens_per_second(model, n))
        median = {n: sorted(s)[1] for n, s in speeds.items()}
        best = max(median.values())
        for n in counts:
            rows.append([condition, name, n, f"{median[n]:.1f}", f"{median[n] / best:.2f}",
                         "chosen" if n == threads else "", " ".join(load)])
        got = median.get(threads) or decode_tokens_per_second(model, threads)
        verdicts.append(f"{condition} / {name}: num_threads 0 chose {threads} ({why}): {got:.1f} tok/s, "
                        f"{got / best:.2f} of the best ({max(median, key=median.get)} threads, {best:.1f} tok/s)")


def test_bench_decode_by_thread_count(capsys):
    before = torch.get_num_threads()
    cores = usable_cores()
    counts = sorted({1, *range(2, cores + 1, max(1, cores // 4)), cores})
    models = {name: build(name) for name in MODELS}
    rows: list = []
    verdicts: list[str] = []
    try:
        measure(models, counts, "idle", rows, verdicts)
        busy = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(4)  # importing torch, then spinning
            measure(models, counts, "busy", rows, verdicts)
        finally:
            busy.kill()
            busy.wait()
    finally:
        torch.set_num_threads(before)
    with capsys.disabled():
        print_table(f"greedy decode, batch 1, prompt 32, 48 new tokens, fp32; {cores} usable cores "
                    "(busy: beside a process spinning a 1024^3 matmul)",
                    ["condition", "model", "threads", "tok/s", "/ best", "num_threads 0", "/proc/loadavg"], rows)
        print("\n".join(verdicts))
