"""Pretraining benchmarks: `python -m pytest -m bench tests/bench/test_bench_pretrain.py`.

They print tables and assert nothing about speed (machines here are noisy):
training tokens/s, the data loader's share of a step, and shard preparation
throughput with one process against all cores. On CUDA they add tokens/s and
MFU for the tiny model and for bumblebee-1.5b.
"""

import json
import os
import time

import pytest
import torch
from conftest import REPO_ROOT, print_table

from nanobumble.base.precision import autocast
from nanobumble.data.records import iter_text_records, list_data_files
from nanobumble.data.shards import TokenShards, prepare_shards
from nanobumble.data.tokenizer import Tokenizer, train_tokenizer
from nanobumble.model.mfu import device_peak_flops, training_flops_per_token
from nanobumble.model.transformer import Transformer
from nanobumble.run.optim import build_optimizer
from nanobumble.store.model_dir import model_config_for

pytestmark = pytest.mark.bench
DATA = os.path.join(REPO_ROOT, "datasets", "pretrain")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    files = list_data_files(DATA)
    tokenizer = Tokenizer(train_tokenizer(iter_text_records(files), 4096, str(tmp / "tok.model")))
    prepare_shards(files, tokenizer, str(tmp / "shards"), num_workers=1)
    return tokenizer, str(tmp / "shards")


def time_training(model_name, vocab_size, data, batch, seq, device, steps, warmup=3, checkpointing=False):
    """Median step time of forward+backward+AdamW, and the loader's time per batch."""
    torch.manual_seed(0)
    cfg = model_config_for(model_name, vocab_size)
    model = Transformer(cfg).to(device)
    model.gradient_checkpointing = checkpointing
    optimizer = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    step_times, load_times = [], []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        if data is not None:
            x, y = data.batch(0, range(step * batch, (step + 1) * batch), seq)
        else:
            x = torch.randint(0, cfg.vocab_size, (batch, seq))
            y = torch.randint(0, cfg.vocab_size, (batch, seq))
        x, y = x.to(device), y.to(device)
        t1 = time.perf_counter()
        with autocast(device, dtype):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if step >= warmup:
            step_times.append(t2 - t0)
            load_times.append(t1 - t0)
    step_time = sorted(step_times)[len(step_times) // 2]
    load_time = sorted(load_times)[len(load_times) // 2]
    return cfg, step_time, load_time


def test_bench_training_throughput(tiny_setup, capsys):
    tokenizer, shard_dir = tiny_setup
    data = TokenShards(shard_dir)
    rows = []
    device = torch.device("cpu")
    batch, seq = 8, 256
    cfg, step_time, load_time = time_training("tiny", tokenizer.vocab_size, data, batch, seq, device, steps=10)
    rows.append(["tiny", "cpu fp32", f"{batch}x{seq}", f"{batch * seq / step_time:,.0f}",
                 f"{1000 * load_time:.2f}", f"{100 * load_time / step_time:.2f}%", "-"])
    if torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name()
        peak = device_peak_flops(device)
        for model_name, vocab, batch, seq, ckpt in [("tiny", tokenizer.vocab_size, 64, 256, False),
                                                    ("bumblebee-1.5b", 151936, 4, 2048, True)]:
            use_data = data if model_name == "tiny" else None
            cfg, step_time, load_time = time_training(model_name, vocab, use_data, batch, seq, device, steps=10,
                                                      checkpointing=ckpt)
            tps = batch * seq / step_time
            mfu = f"{100 * training_flops_per_token(cfg, seq) * tps / peak:.1f}%" if peak else "unknown GPU"
            rows.append([model_name, f"{name} bf16", f"{batch}x{seq}", f"{tps:,.0f}", f"{1000 * load_time:.2f}",
                         f"{100 * load_time / step_time:.2f}%", mfu])
            torch.cuda.empty_cache()
    with capsys.disabled():
        print_table("training throughput (median step; loader = sampling a batch and moving it to the device)",
                    ["model", "device", "batch", "tokens/s", "loader ms", "loader share", "MFU"], rows)
        if not torch.cuda.is_available():
            print("(no CUDA here: GPU tokens/s and MFU need a GPU)")


def test_bench_shard_preparation(tiny_setup, tmp_path, capsys):
    tokenizer, _ = tiny_setup
    # ~20 MB of text: the bundled corpus repeated, so the numbers are not start-up noise.
    texts = list(iter_text_records(list_data_files(DATA)))
    big = tmp_path / "big.jsonl"
    with open(big, "w", encoding="utf-8") as f:
        for i in range(32):
            for text in texts:
                f.write(json.dumps({"text": f"{i} {text}"}, ensure_ascii=False) + "\n")
    megabytes = sum(len(t.encode()) + 2 for t in texts) * 32 / 1e6
    rows, token_counts = [], []
    cores = os.cpu_count() or 1
    for workers in sorted({1, cores}):
        start = time.perf_counter()
        meta = prepare_shards([str(big)], tokenizer, str(tmp_path / f"shards{workers}"), num_workers=workers)
        seconds = time.perf_counter() - start
        rows.append([workers, f"{megabytes:.1f}", f"{seconds:.2f}", f"{megabytes / seconds:.1f}"])
        token_counts.append((meta["train_tokens"], meta["val_tokens"]))
    with capsys.disabled():
        print_table("shard preparation (tokenize + write)", ["processes", "MB of text", "seconds", "MB/s"], rows)
    assert len(set(token_counts)) == 1  # the process count changes the speed, not the shards
