"""Decode speed with and without the KV cache, and batched (pytest -m bench -s)."""


import time

import pytest
import torch
from conftest import print_table
from helpers import generate

from nanobumble.base.precision import autocast
from nanobumble.evals.scoring import greedy_generate
from nanobumble.inference.batching import generate_batch
from nanobumble.inference.generation import GenerationConfig
from nanobumble.model.transformer import PRESETS, ModelConfig, Transformer, pad_vocab_size


def build(preset: str, vocab_size: int, device: torch.device, dtype: torch.dtype) -> Transformer:
    cfg = ModelConfig(vocab_size=pad_vocab_size(vocab_size), **PRESETS[preset])
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.lm_head.weight = model.embed_tokens.weight  # to_empty gives each module its own tensor
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.to(dtype).eval()


def decode_speed(model: Transformer, prompt_len: int, new_tokens: int, use_cache: bool) -> tuple[float, float]:
    prompt = torch.randint(4, 1000, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    cfg = GenerationConfig(do_sample=False, max_new_tokens=new_tokens)
    generate(model, prompt, GenerationConfig(do_sample=False, max_new_tokens=4), stop_ids=(), use_cache=use_cache)
    stats = {}
    generate(model, prompt, cfg, stop_ids=(), use_cache=use_cache, stats=stats)
    return stats["new_tokens"] / stats["decode_seconds"], stats["prefill_seconds"]


@pytest.mark.bench
def test_bench_decode_tokens_per_second(capsys):
    cases = [("tiny", 4096, torch.device("cpu"), torch.float32, 64, 64)]
    if torch.cuda.is_available():
        cases.append(("bumblebee-1.5b", 151936, torch.device("cuda"), torch.bfloat16, 512, 128))
    rows = []
    for preset, vocab, device, dtype, prompt_len, new_tokens in cases:
        model = build(preset, vocab, device, dtype)
        cached, prefill = decode_speed(model, prompt_len, new_tokens, use_cache=True)
        recomputed, _ = decode_speed(model, prompt_len, new_tokens, use_cache=False)
        rows.append([preset, f"{device.type} {str(dtype).removeprefix('torch.')}", prompt_len, new_tokens,
                     f"{cached:.1f}", f"{recomputed:.1f}", f"{cached / recomputed:.1f}x", f"{prefill * 1000:.0f}"])
        del model
    with capsys.disabled():
        print_table("greedy decode, batch 1", ["model", "device", "prompt", "new tokens", "tok/s cache",
                                                "tok/s no cache", "speed-up", "prefill ms"], rows)


@torch.no_grad()
def greedy_generate_recompute(model, prompts, max_new_tokens, device, dtype, batch_size, vocab_size, finished):
    """evaluate's greedy_generate before the batched KV cache (kept here to compare):
    a left-padded buffer, recomputed whole at every step."""
    context_len = model.config.max_position_embeddings
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    outputs = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        prompt_len = len(prompts[batch[0]])
        width = min(-(-(prompt_len + max_new_tokens) // 64) * 64, context_len)
        buffer = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            buffer[row, prompt_len - len(prompts[i]):prompt_len] = torch.tensor(prompts[i])
            mask[row, prompt_len - len(prompts[i]):] = 1
        buffer, mask = buffer.to(device), mask.to(device)
        new = [[] for _ in batch]
        for step in range(min(max_new_tokens, width - prompt_len)):
            with autocast(device, dtype):
                logits = model(buffer, attention_mask=mask)[:, prompt_len + step - 1, :vocab_size]
            buffer[:, prompt_len + step] = logits.float().argmax(-1)
            new = buffer[:, prompt_len:prompt_len + step + 1].tolist()
            if all(finished(ids) for ids in new):
                break
        for row, i in enumerate(batch):
            outputs[i] = new[row]
    return outputs


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


@pytest.fixture
def one_cpu_thread():
    """CPU timings with one thread: on a shared 2-core machine two OpenMP threads that
    wait for each other made every step 5-15x slower, and the numbers random."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bench_cases():
    cases = [("tiny", 4096, torch.device("cpu"), torch.float32, 64, 64)]
    if torch.cuda.is_available():
        cases.append(("bumblebee-1.5b", 151936, torch.device("cuda"), torch.bfloat16, 512, 128))
    return cases


@pytest.mark.bench
def test_bench_batched_decoding(capsys, one_cpu_thread):
    """The batched decoder (generate_batch: N sequences, one forward a step) against
    generate_stream one sequence after another."""
    rows = []
    for preset, vocab, device, dtype, prompt_len, new_tokens in bench_cases():
        model = build(preset, vocab, device, dtype)
        generator = torch.Generator().manual_seed(0)
        prompts = [torch.randint(4, 1000, (prompt_len - 4 * i,), generator=generator).tolist() for i in range(8)]
        cfg = GenerationConfig(do_sample=False, max_new_tokens=new_tokens)
        generate_batch(model, prompts[:2], GenerationConfig(do_sample=False, max_new_tokens=4), stop_ids=())  # warm
        for n in (1, 4, 8):
            results, batched = timed(lambda: generate_batch(model, prompts[:n], cfg, stop_ids=(), max_batch=n))
            one_by_one = timed(lambda: [generate(model, p, cfg, stop_ids=()) for p in prompts[:n]])[1]
            tokens = sum(len(ids) for ids, _ in results)
            rows.append([preset, f"{device.type} {str(dtype).removeprefix('torch.')}", n, prompt_len, new_tokens,
                         f"{tokens / batched:.1f}", f"{tokens / one_by_one:.1f}", f"{one_by_one / batched:.1f}x"])
    with capsys.disabled():
        print_table("greedy decode: N sequences batched vs one at a time (tokens/s of all N together; CPU: 1 thread)",
                    ["model", "device", "N", "prompt", "new tokens", "tok/s batched", "tok/s one by one",
                     "speed-up"], rows)


@pytest.mark.bench
def test_bench_evaluate_greedy_generate(capsys, one_cpu_thread):
    """evaluate's greedy_generate, new (batched KV cache) against old (full recompute), on
    an evaluate-shaped batch: 16 prompts of different lengths, 32 new tokens, batches of 8,
    no early stop."""
    rows = []
    for preset, vocab, device, dtype, prompt_len, _ in bench_cases():
        model = build(preset, vocab, device, dtype).float()  # evaluate's model: fp32 weights, under autocast
        generator = torch.Generator().manual_seed(0)
        prompts = [torch.randint(4, 1000, (length,), generator=generator).tolist()
                   for length in torch.randint(prompt_len // 4, prompt_len * 2, (16,), generator=generator)]
        eval_dtype = dtype if device.type == "cuda" else torch.float32  # the autocast dtype evaluate passes
        args = (prompts, 32, device, eval_dtype, 8, vocab)
        old, old_seconds = timed(lambda: greedy_generate_recompute(model, *args, lambda ids: False))
        new, new_seconds = timed(lambda: greedy_generate(model, *args, lambda ids: False))
        same = sum(a == b for a, b in zip(old, new))
        rows.append([preset, f"{device.type} {str(eval_dtype).removeprefix('torch.')}", 16, 8, 32,
                     f"{old_seconds:.2f}", f"{new_seconds:.2f}", f"{old_seconds / new_seconds:.1f}x", f"{same}/16"])
    with capsys.disabled():
        print_table("evaluate's greedy_generate: full recompute (old) vs batched KV cache (new) (CPU: 1 thread)",
                    ["model", "device", "prompts", "batch", "new tokens", "old s", "new s", "speed-up",
                     "same output"], rows)
