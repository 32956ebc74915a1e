"""Pretraining benchmarks: `python -m pytest -m bench tests/bench/test_bench_pretrain.py`.

They print tables and assert nothing about speed (machines here are noisy):
training tokens/s, the data loader's share of a step, and shard preparation
throughput with one process against all cores. On CUDA they add tokens/s and
MFU for the tiny model and for bumblebee-1.5b. Side by side with transformers'
Qwen2ForCausalLM of the same shape, both in the same precision (fp32, and bf16
autocast over fp32 weights), training tokens/s on CPU (and CUDA when there is one).
"""

import json
import os
import time

import pytest
import torch
from conftest import REPO_ROOT, print_table

from nanobumble.base.precision import autocast, resolve_precision
from nanobumble.data.records import iter_text_records, list_data_files
from nanobumble.data.shards import TokenShards, prepare_shards
from nanobumble.data.tokenizer import Tokenizer, train_tokenizer
from nanobumble.model.mfu import device_peak_flops, training_flops_per_token
from nanobumble.model.transformer import PRESETS, ModelConfig, Transformer
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
    dtype = resolve_precision("auto", device)  # as a run with the default train_model_precision
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
    precision = str(resolve_precision("auto", device)).removeprefix("torch.")
    rows.append(["tiny", f"cpu {precision}", f"{batch}x{seq}", f"{batch * seq / step_time:,.0f}",
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


SHAPES = {  # mid: the 26.8M-parameter shape of issue 25's CPU measurements
    "tiny": (PRESETS["tiny"], 4096),
    "mid": (dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1408,
                 max_position_embeddings=1024), 8192),
}


def twin_models(shape: str) -> tuple[Transformer, torch.nn.Module]:
    """nanobumble's Transformer and transformers' Qwen2ForCausalLM of one shape (tied embeddings, q/k/v biases)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dims, vocab = SHAPES[shape]
    cfg = ModelConfig(vocab_size=vocab, **dims)
    torch.manual_seed(0)
    ours = Transformer(cfg)
    hf_config = Qwen2Config(vocab_size=vocab, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                            intermediate_size=cfg.intermediate_size,
                            max_position_embeddings=cfg.max_position_embeddings,
                            rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=True,
                            use_sliding_window=False, attn_implementation="sdpa")
    return ours, Qwen2ForCausalLM(hf_config)


def train_seconds(model, is_ours: bool, x, y, device, dtype, steps: int) -> float:
    """Median seconds of a step (forward, backward, AdamW) after one warm-up step."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with autocast(device, dtype):
            loss = model(x, y) if is_ours else model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[steps // 2]


def test_bench_training_against_transformers(capsys):
    """Both implementations in the same precision, one after the other per row."""
    devices = [(torch.device("cpu"), 4, 128)] + ([(torch.device("cuda"), 16, 512)] if torch.cuda.is_available() else [])
    rows = []
    for device, batch, seq in devices:
        auto = resolve_precision("auto", device)
        for shape in SHAPES:
            ours, theirs = twin_models(shape)
            x = torch.randint(0, SHAPES[shape][1], (batch, seq), generator=torch.Generator().manual_seed(0))
            # transformers shifts labels itself: y is x moved one token left, as our loss expects
            y = torch.cat([x[:, 1:], torch.full((batch, 1), -100)], dim=1)
            x, y = x.to(device), y.to(device)
            for dtype in (torch.float32, torch.bfloat16):
                ours_s = train_seconds(ours, True, x, y, device, dtype, steps=3)
                theirs_s = train_seconds(theirs, False, x, y, device, dtype, steps=3)
                name = str(dtype).removeprefix("torch.") + (" (auto)" if dtype == auto else "")
                rows.append([shape, device.type, name, f"{batch}x{seq}", f"{batch * seq / ours_s:,.0f}",
                             f"{batch * seq / theirs_s:,.0f}", f"{theirs_s / ours_s:.2f}"])
            del ours, theirs
    with capsys.disabled():
        print_table("training tokens/s side by side with transformers (same precision; bf16: autocast over fp32 "
                    "weights, AdamW)", ["shape", "device", "precision", "batch", "nanobumble", "transformers",
                                        "speed ratio"], rows)
