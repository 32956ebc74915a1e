"""The memory plan (nanobumble/run/memory.py): exact parameter / gradient / optimizer terms,
activations equal to what autograd saves, auto checkpointing, refusal, and selective
checkpointing computing what no checkpointing computes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nanobumble.base.errors import UserError
from nanobumble.model.lora import init_lora_weights, inject_lora
from nanobumble.model.transformer import ModelConfig, Transformer
from nanobumble.run.config import PretrainConfig, SFTConfig
from nanobumble.run.memory import choose_checkpointing, plan_memory
from nanobumble.run.optim import build_optimizer

CFG = ModelConfig(vocab_size=300, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=160)
LORA = dict(rank=4, alpha=8.0, dropout=0.1, target_modules="all")


def trained_state_bytes(lora):
    """Real parameter, gradient and AdamW state bytes after one step of a tiny model."""
    torch.manual_seed(0)
    model = Transformer(CFG)
    if lora:
        inject_lora(model, **lora)
        init_lora_weights(model)
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    x = torch.randint(0, CFG.vocab_size, (2, 16))
    model(x, x).backward()
    optimizer.step()
    params = {id(p): p for p in model.parameters()}.values()
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    state = sum(size(v) for s in optimizer.state.values() for v in s.values() if v.dim() > 0)
    return sum(size(p) for p in params), sum(size(p.grad) for p in params if p.grad is not None), state


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_state_terms_equal_the_real_tensors(lora):
    params, grads, state = trained_state_bytes(lora)
    plan = plan_memory(CFG, 2, 16, lora=lora)
    assert (plan.parameters, plan.gradients, plan.optimizer) == (params, grads, state)
    half = plan_memory(CFG, 2, 16, lora=lora, world_size=2)  # FSDP over 2: each rank holds half
    assert (half.parameters, half.gradients, half.optimizer) == (params // 2, grads // 2, state // 2)


def saved_bytes(dtype, lora=None, mask=False, dpo=False, B=2, T=20):
    """Bytes autograd keeps for backward in one forward (unique storages, no parameters, no int ids)."""
    torch.manual_seed(0)
    model = Transformer(CFG)
    model.kernels = "torch"
    if lora:
        inject_lora(model, **lora)
        init_lora_weights(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and t.dtype != torch.int64:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    rows = B * (2 if dpo else 1)
    x = torch.randint(0, CFG.vocab_size, (rows, T))
    attention_mask = torch.ones(rows, T, dtype=torch.long) if mask else None
    with torch.autocast("cpu", dtype, enabled=dtype != torch.float32), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x, attention_mask=attention_mask, reduction="none" if dpo else "mean")
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["pretrain", "masked", "lora", "lora-no-dropout"])
def test_activations_equal_what_autograd_saves(dtype, kind):
    lora = {"lora": LORA, "lora-no-dropout": dict(LORA, dropout=0.0)}.get(kind)
    mask = kind == "masked"
    plan = plan_memory(CFG, 2, 20, compute_dtype=dtype, lora=lora, padded_rows=mask)
    assert plan.activations == saved_bytes(dtype, lora, mask)


def test_dpo_activations_equal_what_autograd_saves():
    plan = plan_memory(CFG, 2, 20, dpo=True, padded_rows=True)
    assert plan.activations == saved_bytes(torch.float32, mask=True, dpo=True)


def test_checkpointing_modes_order_the_activations():
    sizes = [plan_memory(CFG, 4, 64, checkpointing=mode).activations for mode in ("none", "selective", "full")]
    assert sizes[0] > sizes[1] > sizes[2]


def config(cls=PretrainConfig, **keys):
    return cls(**{"max_steps": 1, **keys})


def test_auto_picks_none_with_plenty_and_full_when_tight():
    cfg = config(enable_gradient_checkpointing="auto", train_micro_batch_size_per_gpu=8, cutoff_len=256)
    args = (CFG, 1, torch.float32, "cpu", "torch")
    plans = {mode: plan_memory(CFG, 8, 256, checkpointing=mode) for mode in ("none", "selective", "full")}
    assert choose_checkpointing(cfg, *args, device_bytes=10**12)[0] == "none"
    tight = int(plans["full"].total / 0.9) + 1  # room for full only
    assert plans["selective"].total > 0.9 * tight
    assert choose_checkpointing(cfg, *args, device_bytes=tight)[0] == "full"
    between = int(plans["selective"].total / 0.9) + 1
    assert choose_checkpointing(cfg, *args, device_bytes=between)[0] == "selective"


def test_true_is_full_and_false_is_none():
    args = (CFG, 1, torch.float32, "cpu", "torch", 10**12)
    assert choose_checkpointing(config(enable_gradient_checkpointing=True), *args)[0] == "full"
    assert choose_checkpointing(config(enable_gradient_checkpointing="false"), *args)[0] == "none"
    assert config(enable_gradient_checkpointing=True).enable_gradient_checkpointing == "true"


def test_a_plan_that_cannot_fit_is_refused_with_the_keys_named():
    cfg = config(SFTConfig, enable_gradient_checkpointing="false", finetuning_type="full")
    with pytest.raises(UserError) as refused:
        choose_checkpointing(cfg, CFG, 1, torch.float32, "cpu", "torch", 10**6)
    message = str(refused.value)
    for key in ("train_micro_batch_size_per_gpu", "cutoff_len", "enable_gradient_checkpointing",
                "finetuning_type lora", "more ranks", "memory_check"):
        assert key in message
    unchecked = config(SFTConfig, enable_gradient_checkpointing="false", memory_check=False)
    assert choose_checkpointing(unchecked, CFG, 1, torch.float32, "cpu", "torch", 10**6)[0] == "none"


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_gives_the_same_loss_and_gradients(mode):
    torch.manual_seed(0)
    model = Transformer(CFG).double()
    model.kernels = "torch"
    x = torch.randint(0, CFG.vocab_size, (2, 24))
    results = []
    for setting in ("none", mode):
        model.gradient_checkpointing = setting
        model.zero_grad(set_to_none=True)
        loss = model(x, x)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


# One subprocess's peak RSS: build, then two optimizer steps of two micro-steps (the
# recipes accumulate), fp32 on CPU; the baseline runs the same code on a model of a few kB,
# so that the libraries' code and thread buffers the step pages in are not counted as the plan's.
_MEASURE = """
import json, resource, sys
import torch
from nanobumble.model.transformer import ModelConfig, Transformer
from nanobumble.run.optim import build_optimizer
shape, B, T, baseline = json.loads(sys.argv[1])
torch.set_num_threads(1)
if baseline:
    shape, B, T = dict(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                       intermediate_size=32), 1, 8
if True:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**shape))
    model.kernels = "torch"
    optimizer = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
    for step in range(2):
        for micro in range(2):
            x = torch.randint(0, shape["vocab_size"], (B, T))
            (model(x, x) / 2).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def peak_rss(shape: dict, B: int, T: int, baseline: bool) -> int:
    out = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps([shape, B, T, baseline])],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.slow
# Known to fail (issue 25, open): the plan does not yet count the backward's transient memory and
# measured 26-35% above it here. strict: the day it passes, this mark must go.
@pytest.mark.xfail(strict=True, reason="the memory plan misses the backward's transients (issue 25)")
@pytest.mark.parametrize("shape, B, T", [
    (dict(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768), 4, 256),
    (dict(vocab_size=16384, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2, intermediate_size=1024),
     2, 512),
], ids=["h256-b4-t256", "h384-b2-t512"])
def test_plan_matches_the_measured_peak(shape, B, T):
    """Shapes other than the one the activation count was taken at (hidden 48, 2 x 20 tokens)."""
    plan = plan_memory(ModelConfig(**shape), B, T)
    measured = peak_rss(shape, B, T, False) - peak_rss(shape, B, T, True)
    print(f"\nplan {plan.training_bytes / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB "
          f"(peak RSS minus the import-only baseline), ratio {plan.training_bytes / measured:.3f}")
    assert abs(plan.training_bytes / measured - 1) < 0.15
