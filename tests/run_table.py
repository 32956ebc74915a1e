"""The run table: what a training run achieves on this device, in one table.

tests/gpu/test_gpu.py prints it on a GPU at bumblebee-1.5b's shapes and the recipes' micro batches;
tests/gpu/test_run_table_cpu.py (-m slow) runs the same code at tiny shapes on the CPU, so the table's
code is tested where there is no GPU. Rows:

  pretrain   the shipped config (configs/pretrain/pretrain_full.yaml) and the recommended one for this
             device class (pretrain_1.5b_80gb / _141gb.yaml), each eager and with per-block compile:
             a few micro-steps and one optimizer step, at the config's micro batch and sequence
  sft        padded rows vs packed rows (the SFT recipe's micro batch) of conversations whose lengths
             are drawn like instruction data (lognormal, mean ~ shapes.doc_tokens): real tokens/s
  dpo-lora   one DPO step of the LoRA recipe: reference forward (adapters off), policy forward +
             backward on chosen + rejected, AdamW
  kernel     RMSNorm, RoPE and the cross-entropy rows, forward + backward: GB/s over the bytes that
             must move, and its share of the device's bandwidth

Columns: tokens/s counts real (non-padding) tokens; MFU is model FLOPs (nanobumble/model/mfu.py's
convention, printed under the table) over the dense bf16 peak, with the paper estimate of
nanobumble/estimate_speed.py beside it; peak GiB is torch.cuda.max_memory_allocated; fast paths name
the attention kernel the profiler saw, the LM head's gradient path and the kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import time
import traceback

import numpy as np
import torch
from conftest import REPO_ROOT

from nanobumble import estimate_speed as es
from nanobumble.base.distributed import DistInfo
from nanobumble.base.precision import autocast
from nanobumble.data.sft_data import SFTDataset
from nanobumble.model import lm_loss
from nanobumble.model.dpo import batch_logps, preference_loss
from nanobumble.model.layers import IGNORE_INDEX, rope_cos_sin
from nanobumble.model.lora import disable_adapters
from nanobumble.model.mfu import device_peak_flops, document_flops, training_flops_per_token
from nanobumble.model.transformer import PRESETS, ModelConfig
from nanobumble.run.build import build_model
from nanobumble.run.config import DPOConfig, PretrainConfig, SFTConfig, parse_config
from nanobumble.run.optim import build_optimizer

BF16 = torch.bfloat16
COLUMNS = ["row", "shape", "settings", "compile", "tokens/s (real)", "MFU (paper)", "GB/s (of peak)", "peak GiB",
           "fast paths"]
SHIPPED = "configs/pretrain/pretrain_full.yaml"


@dataclasses.dataclass
class Shapes:
    """What the table runs: the model, and caps that shrink the configs' shapes (the CPU twin)."""
    model: ModelConfig
    seq_len: int | None = None         # None: each config's cutoff_len
    micro_cap: int | None = None       # None: each config's micro batch
    warmup: int = 2                    # micro-steps (and one optimizer step) before timing; compiles
    timed: int = 4                     # micro-steps timed, then one optimizer step
    doc_tokens: int = 400              # mean conversation length of the SFT / DPO rows
    kernel_tokens: int = 16384         # rows of the kernel checks
    kernels: str = "auto"
    device_class: str = ""             # h100 | h200 | "" (CPU): the recipes and the paper estimate


def gpu_shapes(device: torch.device) -> Shapes:
    name = torch.cuda.get_device_name(device).lower()
    total = torch.cuda.get_device_properties(device).total_memory
    device_class = "h200" if "h200" in name else "h100" if "h100" in name else ""
    if not device_class:  # another GPU: the recipe of its memory class, no paper estimate
        device_class = "h200?" if total > 100 * 2**30 else "h100?"
    return Shapes(model=ModelConfig(vocab_size=151936, **PRESETS["bumblebee-1.5b"]), device_class=device_class)


def recipe(kind: str, device_class: str) -> str:
    size = "141gb" if device_class.startswith("h200") else "80gb"
    return {"pretrain": f"configs/pretrain/pretrain_1.5b_{size}.yaml", "sft": f"configs/sft/sft_1.5b_{size}.yaml",
            "dpo": "configs/dpo/dpo_lora_1.5b_80gb.yaml"}[kind]


def read_config(path: str, cls):
    return parse_config(["--yaml_config", os.path.join(REPO_ROOT, path), "--model_name_or_path", "bumblebee-1.5b"]
                        if cls is not PretrainConfig else ["--yaml_config", os.path.join(REPO_ROOT, path)], cls)


class Probe:
    """The device: synchronising, peak memory, peak FLOP/s and bandwidth (None where unknown)."""

    def __init__(self, device: torch.device, device_class: str):
        self.device = device
        self.cuda = device.type == "cuda"
        self.peak_flops = device_peak_flops(device)
        spec = es.DEVICES.get(device_class)
        self.bandwidth = spec.bandwidth if spec else None
        self.spec = spec

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> str:
        return f"{torch.cuda.max_memory_allocated(self.device) / 2**30:.1f}" if self.cuda else "-"


@contextlib.contextmanager
def one_rank(device: torch.device, fsdp: bool):
    """A DistInfo for one process: with fsdp, a one-rank process group and mesh (FSDP2 with bf16
    parameters, as single_process_fsdp auto runs one GPU); info.sharded says whether build_model shards."""
    if not fsdp:
        yield DistInfo(device=device)
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    started = not dist.is_initialized()
    if started:
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, **kwargs)
    try:
        yield DistInfo(device=device, mesh=init_device_mesh(device.type, (1,)))
    finally:
        if started:
            dist.destroy_process_group()


def sdpa_backend(events) -> str:
    """The attention kernel from the profiler's op names."""
    names = " ".join(sorted({e.name for e in events}))
    for key, label in [("flex_attention", "flex"), ("_scaled_dot_product_flash_attention_for_cpu", "flash (cpu)"),
                       ("_scaled_dot_product_flash_attention", "flash"), ("_scaled_dot_product_cudnn", "cudnn"),
                       ("_scaled_dot_product_efficient", "mem-efficient"), ("_scaled_dot_product_attention_math",
                                                                          "math"), ("FlexAttention", "flex")]:
        if key in names:
            return label
    return "?"


def lm_head_path() -> str:
    get = getattr(lm_loss, "lm_head_path", None)  # added with issue 25 item 5; "?" before
    return (get() or "?") if callable(get) else "?"


def fast_paths(model, x, y, pos, info) -> str:
    """One more micro-step (same shapes: nothing recompiles) under the profiler: which attention kernel
    ran, the LM head's gradient path, the kernels."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with autocast(info.device, torch.float32 if info.sharded else BF16):
            loss = model(x, y, position_ids=pos)
        loss.backward()
    model.zero_grad(set_to_none=True)
    backend = "triton" if model.kernels == "triton" or (model.kernels == "auto" and x.is_cuda) else "torch"
    return f"attn {sdpa_backend(prof.events())}, LM head {lm_head_path()}, kernels {backend}"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


# ---------------------------------------------------------------------------------------------
# Training rows


def micro_steps(model, optimizer, batches, info, probe: Probe) -> float:
    """Seconds for the batches' micro-steps and one clipped AdamW step."""
    probe.sync()
    start = time.perf_counter()
    for x, y, pos in batches:
        with autocast(info.device, torch.float32 if info.sharded else BF16):
            loss = model(x, y, position_ids=pos)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    probe.sync()
    if not torch.isfinite(loss.detach()).all():
        raise FloatingPointError(f"loss {loss.item()}")
    return time.perf_counter() - start


def checkpointing_of(cfg, model_cfg: ModelConfig, micro: int, seq: int, probe: Probe) -> str:
    mode = cfg.enable_gradient_checkpointing
    if mode != "auto":
        return {"true": "full", "false": "none"}.get(mode, mode)
    if probe.spec is None:  # no device class (the CPU twin): the cheapest
        return "none"
    small = dataclasses.replace(cfg, train_micro_batch_size_per_gpu=micro, cutoff_len=seq)
    setup, _ = es.setup_for_config(small, model_cfg, probe.spec)
    return setup.checkpointing


def train_row(label: str, path: str, compile: bool, shapes: Shapes, probe: Probe, kind: str = "pretrain",
              packing: bool | None = None) -> list:
    """Build the model as the config runs it (checkpointing, compile, FSDP2 or autocast), time it."""
    cls = {"pretrain": PretrainConfig, "sft": SFTConfig}[kind]
    cfg = read_config(path, cls)
    seq = shapes.seq_len or cfg.cutoff_len
    micro = min(cfg.train_micro_batch_size_per_gpu, shapes.micro_cap or 10**9)
    fsdp = getattr(cfg, "single_process_fsdp", "false") in ("auto", "true")
    mode = checkpointing_of(cfg, shapes.model, micro, seq, probe)
    gen = torch.Generator().manual_seed(0)
    if kind == "pretrain":
        data = torch.randint(0, shapes.model.vocab_size, (shapes.warmup + shapes.timed, micro, seq + 1), generator=gen)
        batches = [(b[:, :-1].to(probe.device), b[:, 1:].to(probe.device), None) for b in data]
        docs = [[seq] * micro for _ in batches]
    else:
        batches, docs = sft_batches(shapes, micro, seq, packing, probe.device, shapes.warmup + shapes.timed)
    probe.reset()
    with one_rank(probe.device, fsdp) as info:
        model = build_model(shapes.model, info, 0, None, BF16, mode, compile, None, shapes.kernels)
        model.train()
        optimizer = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
        micro_steps(model, optimizer, batches[:shapes.warmup], info, probe)  # compiles, allocates AdamW
        probe.reset()
        seconds = micro_steps(model, optimizer, batches[shapes.warmup:], info, probe)
        peak = probe.peak_gib()
        paths = fast_paths(model, *batches[0], info)
        sharded = info.sharded
        del model, optimizer
    if compile:
        torch._dynamo.reset()  # the next rows compile afresh (no recompile limit carried over)
    probe.reset()
    timed_docs = [d for row in docs[shapes.warmup:] for d in row]
    real = sum(timed_docs)
    flops = (training_flops_per_token(shapes.model, seq) * real if kind == "pretrain"
             else document_flops(shapes.model, timed_docs))
    mfu = flops / seconds / probe.peak_flops if probe.peak_flops else None
    paper = paper_mfu(cfg, shapes, micro, seq, mode, compile, sharded, probe, kind, packing)
    settings = (f"ckpt {mode}, {'FSDP2 bf16 params' if sharded else 'autocast fp32 weights'}"
                + ("" if kind == "pretrain" else f", {'packed' if packing else 'padded'}"))
    computed = sum(x.numel() for x, _, _ in batches[shapes.warmup:])
    shape = f"{micro}x{seq}" + (f", {real / computed:.0%} real" if kind != "pretrain" else "")
    return [label, shape, settings, "on" if compile else "off", f"{real / seconds:,.0f}",
            f"{percent(mfu)} ({paper})", "-", peak, paths]


def paper_mfu(cfg, shapes: Shapes, micro, seq, mode, compile, sharded, probe: Probe, kind: str, packing) -> str:
    if probe.spec is None:
        return "-"
    setup = es.Setup(model=shapes.model, stage=kind, micro_batch=micro, seq_len=seq,
                     accumulation=cfg.gradient_accumulation_steps, checkpointing=mode, compiled=compile,
                     bf16_params=sharded, doc_tokens=0 if kind == "pretrain" else shapes.doc_tokens,
                     packing=bool(packing))
    return percent(es.estimate(setup, probe.spec).mfu)


def conversation_lengths(n: int, mean: int, cap: int, seed: int) -> list[int]:
    """Lognormal lengths (sigma 0.8: instruction data's long tail), mean ~ `mean`, within [8, cap]."""
    rng = np.random.default_rng(seed)
    sigma = 0.8
    lengths = rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, n)
    return [int(min(cap, max(8, round(v)))) for v in lengths]


def sft_batches(shapes: Shapes, micro: int, seq: int, packing: bool, device, count: int):
    """`count` micro-batches of SFT rows (padded or packed) and the real tokens of each row's documents:
    two distinct batches taken in turn, so padded rows' widths are ones the warm-up has seen (flex
    attention compiles per width; the timing is the steady state, not compilation)."""
    lengths = conversation_lengths(count * micro * 8, shapes.doc_tokens, seq + 1, seed=1)
    rng = np.random.default_rng(2)
    samples = [(rng.integers(4, shapes.model.vocab_size, n).tolist(), [True] * n) for n in lengths]
    data = SFTDataset(samples, seq, packing=packing)
    batches, docs = [], []
    for i in range(count):
        x, y, pos = data.batch(0, range((i % 2) * micro, (i % 2 + 1) * micro))
        batches.append((x.to(device), y.to(device), None if pos is None else pos.to(device)))
        docs.append(document_lengths(y, pos))
    return batches, docs


def document_lengths(y: torch.Tensor, pos: torch.Tensor | None) -> list[int]:
    """Real tokens per document: targets that count (every token of these samples trains)."""
    if pos is None:
        return [int(n) for n in (y != IGNORE_INDEX).sum(-1).tolist()]
    out = []
    for row_y, row_pos in zip(y, pos):
        starts = (row_pos == 0).nonzero().flatten().tolist() + [len(row_pos)]
        for a, b in zip(starts[:-1], starts[1:]):
            n = int((row_y[a:b] != IGNORE_INDEX).sum())
            if n:
                out.append(n)
    return out


def dpo_row(shapes: Shapes, probe: Probe) -> list:
    """One DPO-LoRA step of the recipe: reference forward, policy forward + backward, AdamW."""
    cfg = read_config(recipe("dpo", shapes.device_class), DPOConfig)
    seq = shapes.seq_len or cfg.cutoff_len
    pairs = min(cfg.train_micro_batch_size_per_gpu, shapes.micro_cap or 10**9)
    fsdp = cfg.single_process_fsdp in ("auto", "true")
    lengths = conversation_lengths(2 * pairs, int(shapes.doc_tokens * 1.5), seq, seed=3)
    width = max(lengths)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(4, shapes.model.vocab_size, (2 * pairs, width), generator=gen)
    labels = ids.clone()
    for row, n in enumerate(lengths):
        labels[row, : n // 3] = IGNORE_INDEX  # the prompt
        labels[row, n:] = IGNORE_INDEX        # padding
        ids[row, n:] = 0
    ids, labels = ids.to(probe.device), labels.to(probe.device)
    lora = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
            "target_modules": cfg.lora_target_modules, "use_rslora": cfg.use_rslora}
    mode = checkpointing_of(cfg, shapes.model, pairs, seq, probe)
    probe.reset()
    with one_rank(probe.device, fsdp) as info:
        model = build_model(shapes.model, info, 0, None, BF16, mode, False, lora, shapes.kernels)
        model.train()
        optimizer = build_optimizer(model, 1e-5, 0.0, (0.9, 0.95))
        cast = torch.float32 if info.sharded else BF16

        def step() -> float:
            probe.sync()
            start = time.perf_counter()
            with torch.no_grad(), disable_adapters(model), autocast(info.device, cast):
                ref = batch_logps(model, ids, labels)[0]
            with autocast(info.device, cast):
                policy = batch_logps(model, ids, labels)[0]
            losses = preference_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], cfg.pref_beta)[0]
            losses.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            probe.sync()
            if not torch.isfinite(losses).all():
                raise FloatingPointError(f"DPO losses {losses.tolist()}")
            return time.perf_counter() - start

        step()
        probe.reset()
        seconds = min(step() for _ in range(max(1, shapes.timed // 2)))
        peak = probe.peak_gib()
        sharded = info.sharded
        adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model = optimizer = None  # freed before the next row
    probe.reset()
    real = sum(lengths)
    flops = (document_flops(shapes.model, lengths, frozen_base=True, adapter_params=adapters)
             + document_flops(shapes.model, lengths, backward=False))
    mfu = flops / seconds / probe.peak_flops if probe.peak_flops else None
    return ["dpo-lora step", f"{2 * pairs}x{width}, {real / (2 * pairs * width):.0%} real",
            f"rank {cfg.lora_rank}, ckpt {mode}, {'FSDP2 bf16 params' if sharded else 'autocast'}", "off",
            f"{real / seconds:,.0f}", f"{percent(mfu)} (-)", "-", peak, f"LM head {lm_head_path()}"]


# ---------------------------------------------------------------------------------------------
# Kernel rows


def best_seconds(fn, probe: Probe, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        probe.sync()
        start = time.perf_counter()
        fn()
        probe.sync()
        times.append(time.perf_counter() - start)
    return min(times)


def kernel_rows(shapes: Shapes, probe: Probe) -> list[list]:
    """fwd + bwd of each kernel (Triton on CUDA, the torch math on CPU) over its minimum bytes."""
    cfg, n, dev = shapes.model, shapes.kernel_tokens, probe.device
    triton = dev.type == "cuda" and shapes.kernels != "torch"
    if triton:
        from nanobumble.kernels.cross_entropy import cross_entropy_rows
        from nanobumble.kernels.rmsnorm import rms_norm
        from nanobumble.kernels.rope import apply_rope
    else:
        from nanobumble.model.layers import apply_rope, rms_norm
    H, hd = cfg.hidden_size, cfg.head_dim
    gen = torch.Generator().manual_seed(5)
    rows = []

    def add(name: str, shape: str, seconds: float, nbytes: int) -> None:
        rate = nbytes / seconds
        share = f" ({rate / probe.bandwidth:.0%})" if probe.bandwidth else ""
        gbs = f"{rate / 1e9:,.0f}" if rate > 1e10 else f"{rate / 1e9:.2f}"
        rows.append([f"kernel {name}", shape, "bf16, fwd+bwd", "-", "-", "-", f"{gbs}{share}", "-",
                     "triton" if triton else "torch"])

    x = torch.randn(1, n, H, generator=gen).to(dev, BF16).requires_grad_()
    w = torch.ones(H, device=dev, requires_grad=True)
    dy = torch.randn(1, n, H, generator=gen).to(dev, BF16)
    seconds = best_seconds(lambda: torch.autograd.grad(rms_norm(x, w, 1e-6), (x, w), dy), probe)
    add("rmsnorm", f"{n}x{H}", seconds, 4 * x.numel() * 2 + 3 * 4 * H)  # x, y, dy, dx; w, dw
    seq = min(2048, n)
    q = torch.randn(n // seq, seq, cfg.num_heads, hd, generator=gen).to(dev, BF16).requires_grad_()
    k = torch.randn(n // seq, seq, cfg.num_kv_heads, hd, generator=gen).to(dev, BF16).requires_grad_()
    cos, sin = rope_cos_sin(torch.arange(seq, device=dev).expand(n // seq, seq), hd, cfg.rope_theta)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    seconds = best_seconds(lambda: torch.autograd.grad(apply_rope(q, k, cos, sin), (q, k), (dq, dk)), probe)
    add("rope", f"{n}x({cfg.num_heads}+{cfg.num_kv_heads})x{hd}", seconds,
        4 * (q.numel() + k.numel()) * 2 + 2 * 2 * cos.numel() * cos.element_size())
    rows_ce = max(64, min(n, 2**28 // (2 * cfg.vocab_size)))  # a chunk of logits, ~256 MiB in bf16
    logits = torch.randn(rows_ce, cfg.vocab_size, generator=gen).to(dev, BF16)
    targets = torch.randint(0, cfg.vocab_size, (rows_ce,), generator=gen).to(dev)
    scale = torch.tensor(1.0 / rows_ce, device=dev)
    if triton:
        ce = lambda: cross_entropy_rows(logits, targets, scale, logits, IGNORE_INDEX)  # noqa: E731
    else:
        rows_torch = getattr(lm_loss, "_rows_torch")
        ce = lambda: rows_torch(logits, targets, scale, True)  # noqa: E731
    seconds = best_seconds(ce, probe)
    add("cross entropy rows", f"{rows_ce}x{cfg.vocab_size}", seconds, 2 * logits.numel() * 2 + 8 * rows_ce)
    return rows


# ---------------------------------------------------------------------------------------------
# The table


def run_table(shapes: Shapes, device: torch.device) -> tuple[list[list], list[str], list[str]]:
    """(rows, failures, notes). A row that fails is reported in the table and in failures, and the
    others still run (a device loan is short)."""
    probe = Probe(device, shapes.device_class)
    rows, failures = [], []

    def attempt(label: str, fn) -> None:
        try:
            result = fn()
            rows.extend(result if isinstance(result[0], list) else [result])
        except Exception as e:  # the table goes on; the failure is asserted after it is printed
            line = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:150]
            rows.append([label, "-", "-", "-", "-", "-", "-", "-", f"FAILED {line}"])
            failures.append(f"{label}: {traceback.format_exc()[-3000:]}")
            probe.reset()

    recommended = recipe("pretrain", shapes.device_class)
    for label, path in [("pretrain shipped", SHIPPED), ("pretrain recommended", recommended)]:
        for compile in (False, True):
            attempt(f"{label} {os.path.basename(path)}{' compiled' if compile else ''}",
                    lambda: train_row(f"{label} ({os.path.basename(path)})", path, compile, shapes, probe))
    sft = recipe("sft", shapes.device_class)
    for packing in (False, True):
        attempt(f"sft {'packed' if packing else 'padded'}",
                lambda: train_row(f"sft {'packed' if packing else 'padded'} ({os.path.basename(sft)})", sft, False,
                                  shapes, probe, kind="sft", packing=packing))
    attempt("dpo-lora step", lambda: dpo_row(shapes, probe))
    attempt("kernels", lambda: kernel_rows(shapes, probe))
    cfg = shapes.model
    notes = [es.flop_convention(cfg, None),
             f"peak {probe.peak_flops / 1e12:.0f} TFLOP/s bf16 dense" if probe.peak_flops else
             "MFU n/a: no bf16 peak for this device (nanobumble/model/mfu.py)",
             "MFU (paper): nanobumble/estimate_speed.py for the same setup on "
             + (probe.spec.name if probe.spec else "- (no device class)")
             + (f"; bandwidth {probe.bandwidth / 1e12:.2f} TB/s" if probe.bandwidth else ""),
             f"each training row: {shapes.warmup} micro-steps + AdamW to warm up (and compile), then {shapes.timed}"
             f" micro-steps + clip + AdamW timed; SFT/DPO lengths lognormal, mean ~{shapes.doc_tokens} tokens"]
    return rows, failures, notes
