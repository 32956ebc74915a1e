"""Decode speed with and without the KV cache (pytest -m bench -s)."""


import pytest
import torch
from conftest import print_table
from helpers import generate

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
