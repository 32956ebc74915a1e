"""The memory plan (nanobumble/run/memory.py): exact parameter / gradient / optimizer terms,
activations equal to what autograd saves, auto checkpointing, refusal, and selective
checkpointing computing what no checkpointing computes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanobumble.base.errors import UserError
from nanobumble.model.lora import init_lora_weights, inject_lora
from nanobumble.model.transformer import ModelConfig, Transformer
from nanobumble.run.config import PretrainConfig, SFTConfig
from nanobumble.run.memory import choose_checkpointing, plan_memory
from nanobumble.run.optim import build_optimizer

from memory_peak import live_peak, plan_of  # tests/memory_peak.py

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


def saved_bytes(dtype, lora=None, mask=False, dpo=False, B=2, T=20, bf16_parameters=False):
    """Bytes autograd keeps for backward in one forward (unique storages, no parameters, no int ids).
    bf16_parameters: the model's parameters in bf16 and no autocast, as FSDP's mixed precision runs."""
    torch.manual_seed(0)
    model = Transformer(CFG)
    model.kernels = "torch"
    if bf16_parameters:
        model.to(torch.bfloat16)
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
    with torch.autocast("cpu", dtype, enabled=dtype != torch.float32 and not bf16_parameters), \
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


@pytest.mark.parametrize("kind, mode, dtype", [
    *(("pretrain", mode, dtype) for mode in ("none", "selective", "full") for dtype in ("fp32", "bf16")),
    ("lora", "full", "bf16"), ("lora", "selective", "fp32"), ("dpo", "none", "bf16"), ("dpo", "full", "fp32")])
def test_plan_matches_the_live_tensor_peak_of_each_phase(kind, mode, dtype):
    """The forward's peak (the LM head: logits chunk, logsumexp temporary, gradient buffers,
    autocast's weight cache) and the backward's (the top block: recomputed part, SwiGLU gradients,
    the tied weight's held gradient; DPO: the LM head's backward), each against the profiler's live
    tensor bytes of a real step (tests/memory_peak.py; lora and dpo as there)."""
    bf16 = dtype == "bf16"
    shape = dataclasses.asdict(CFG)
    measured = live_peak(shape, 4, 64, mode, bf16, kind)["phases"]
    plan = plan_of(shape, 4, 64, mode, bf16, kind)
    held = plan.parameters + plan.gradients + plan.optimizer + plan.activations + plan.other
    assert held + plan.end_of_forward == pytest.approx(measured["forward 1"], rel=0.03)
    assert held + plan.backward == pytest.approx(measured["backward 1"], rel=0.03)
    assert plan.training_bytes == pytest.approx(max(measured.values()), rel=0.03)


def test_one_rank_fsdp_plans_bf16_parameters_over_fp32_masters():
    """fsdp True on one rank: fp32 master weights, gradients and AdamW state whole; activations as a
    model with bf16 parameters saves them (no autocast copies, a bf16 residual stream); the gathered
    bf16 copies of the root and of two blocks."""
    plain = plan_memory(CFG, 2, 20, compute_dtype=torch.bfloat16)
    fsdp = plan_memory(CFG, 2, 20, compute_dtype=torch.bfloat16, fsdp=True)
    params, grads, state = trained_state_bytes(None)
    assert (fsdp.parameters, fsdp.gradients, fsdp.optimizer) == (params, grads, state)
    assert fsdp.activations == saved_bytes(torch.bfloat16, bf16_parameters=True)
    assert fsdp.activations < plain.activations and fsdp.autocast_cache == 0
    block = sum(p.numel() for p in Transformer(CFG).layers[0].parameters())
    assert fsdp.other - plain.other == 2 * (CFG.vocab_size * CFG.hidden_size + 2 * block)
    two = plan_memory(CFG, 2, 20, compute_dtype=torch.bfloat16, world_size=2)  # fsdp None: world_size > 1
    assert (two.parameters, two.activations, two.other) == (params // 2, fsdp.activations, fsdp.other)
    assert plan_memory(CFG, 2, 20, compute_dtype=torch.bfloat16, world_size=2, fsdp=False).activations \
        == plain.activations


# Shapes not used to find or check the terms (those: hidden 48 above; hidden 256 with vocab 1,024
# and 8,192 while measuring, tests/memory_peak.py). Each runs in a fresh process: peak RSS over a
# warm baseline in the same process, with glibc returning freed blocks (MALLOC_MMAP_THRESHOLD_):
# see tests/memory_peak.py for why both. With glibc's defaults the RSS was 33% above at both.
SHAPE_A = dict(vocab_size=6144, hidden_size=320, num_layers=5, num_heads=5, num_kv_heads=1, intermediate_size=896)
SHAPE_B = dict(vocab_size=12288, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2,
               intermediate_size=1024)


@pytest.mark.slow
@pytest.mark.parametrize("shape, B, T, mode", [
    (SHAPE_A, 3, 384, "none"), (SHAPE_A, 3, 384, "full"), (SHAPE_B, 2, 512, "selective"),
    (SHAPE_B, 2, 512, "none")], ids=["h320-none", "h320-full", "h384-selective", "h384-none"])
def test_plan_matches_the_measured_peak(shape, B, T, mode):
    """fp32, two optimizer steps of two micro-steps (the recipes accumulate); ~30 s each here."""
    script = Path(__file__).parent.parent / "memory_peak.py"
    out = subprocess.run([sys.executable, str(script), "rss", json.dumps([shape, B, T, mode, "fp32"])],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    result = json.loads(out.stdout.splitlines()[-1])
    plan = plan_memory(ModelConfig(**shape), B, T, checkpointing=mode)
    assert result["plan"] == plan.training_bytes
    print(f"\nplan {plan.training_bytes / 2**20:.1f} MiB (peak: {plan.peak_phase}), measured "
          f"{result['peak'] / 2**20:.1f} MiB over the warm baseline, ratio {result['ratio']:.3f}")
    # The issue asks for ~15%; 5% here, because under this measurement the plan before the backward
    # and LM-head terms were added was 7-11% low at three of these four and would have passed 15%.
    assert abs(plan.training_bytes / result["peak"] - 1) < 0.05
