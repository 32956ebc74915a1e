"""Measured peak memory of a CPU training step, to check the memory plan (nanobumble/run/memory.py).

    python tests/memory_peak.py live '[{shape}, B, T, "none", "fp32"]'   # peak of live tensor bytes
    python tests/memory_peak.py detail '[{shape}, B, T, "none", "fp32"]' # and what is alive then (slow)
    (a sixth element "lora" or "dpo" trains with LoRA adapters or DPO's per-token losses)
    python tests/memory_peak.py rss '[{shape}, B, T, "none", "fp32"]'    # peak RSS over a warm baseline

Both train the model as the recipes do (two optimizer steps of two accumulated micro-steps, AdamW),
plain PyTorch kernels, one thread, and print JSON with the plan's numbers beside the measured ones.

live: the profiler's allocation events (profile_memory: the allocator's own, so temporaries inside
an op count too) over the second step; the peak of the bytes alive, per phase (forward and backward
of each micro-step, optimizer). detail: what is alive at the peak, by category (the profiler's memory
timeline) and by the op and source line that made it.

rss: the process's peak RSS (VmHWM) minus its RSS just before the model is built, after a warm-up
step of a model of a few kB (imports and that step page in ~160 MiB of library code, OpenMP and
oneDNN buffers: the plan's runtime term, not its training bytes; an import-only baseline in another
process counts them, and differed by 150 MiB between two runs). Run under MALLOC_MMAP_THRESHOLD_=65536
(the test does) so that glibc returns each large freed block at once: otherwise it keeps up to twice its
dynamic mmap threshold (<= 32 MiB) of freed heap, +45 MiB of RSS at hidden 256, which the plan leaves
to the runtime term and the 10% margin.
"""

from __future__ import annotations

import gc
import json
import sys

import torch

from nanobumble.model.lora import init_lora_weights, inject_lora
from nanobumble.model.transformer import ModelConfig, Transformer
from nanobumble.run.memory import plan_memory
from nanobumble.run.optim import build_optimizer

TINY = dict(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
# kind: "pretrain" (mean loss), "lora" (these adapters on every linear), "dpo" (2 x B rows, per-token losses)
LORA = dict(rank=8, alpha=16.0, dropout=0.05, target_modules="all")


def build(shape: dict, mode: str, kind: str = "pretrain"):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**shape))
    model.kernels = "torch"
    model.gradient_checkpointing = mode
    if kind == "lora":
        inject_lora(model, **LORA)
        init_lora_weights(model)
    return model, build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))


def train_step(model, optimizer, B: int, T: int, bf16: bool, label=None, kind: str = "pretrain") -> None:
    """One optimizer step of two micro-steps; label(name) gives a context around each phase."""
    from contextlib import nullcontext
    label = label or (lambda name: nullcontext())
    for micro in range(2):
        x = torch.randint(0, model.config.vocab_size, (2 * B if kind == "dpo" else B, T))
        with label(f"forward {micro}"), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = (model(x, x, reduction="none")[0].sum() if kind == "dpo" else model(x, x)) / 2
        with label(f"backward {micro}"):
            loss.backward()
    with label("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def plan_of(shape: dict, B: int, T: int, mode: str, bf16: bool, kind: str = "pretrain"):
    return plan_memory(ModelConfig(**shape), B, T, checkpointing=mode, lora=LORA if kind == "lora" else None,
                       dpo=kind == "dpo", compute_dtype=torch.bfloat16 if bf16 else torch.float32)


def _second_step(shape: dict, B: int, T: int, mode: str, bf16: bool, kind: str, **profile_args):
    """The profiler over the second optimizer step (the first makes AdamW's state), and the bytes
    alive before it: parameters and AdamW's state (the gradients were set to None)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(1)
    model, optimizer = build(shape, mode, kind)
    train_step(model, optimizer, B, T, bf16, kind=kind)
    size = lambda t: t.untyped_storage().nbytes()  # noqa: E731
    before = (sum(size(p) for p in {id(p): p for p in model.parameters()}.values())
              + sum(size(v) for state in optimizer.state.values() for v in state.values()))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, **profile_args) as prof:
        train_step(model, optimizer, B, T, bf16, record_function, kind)
    return prof, before


def live_peak(shape: dict, B: int, T: int, mode: str = "none", bf16: bool = False, kind: str = "pretrain") -> dict:
    """{"peak": bytes, "phases": {phase: its peak}, "peak_phase"}: the peak of live tensor bytes in
    the second step, from the allocator's running total that each allocation event carries
    (bytes allocated since the profiler started and not yet freed) plus what was alive before."""
    from torch._C._profiler import _EventType

    prof, before = _second_step(shape, B, T, mode, bf16, kind)
    phases: dict = {}
    stack = [(event, None) for event in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        event, phase = stack.pop()
        if event.tag == _EventType.TorchOp and event.name.startswith(("forward ", "backward ", "optimizer")):
            phase = event.name
        if event.tag == _EventType.Allocation:
            phases[phase] = max(phases.get(phase, 0), before + event.extra_fields.total_allocated)
        stack.extend((child, phase) for child in event.children)
    peak_phase = max(phases, key=phases.get)
    return {"peak": phases[peak_phase], "phases": phases, "peak_phase": peak_phase}


def live_detail(shape: dict, B: int, T: int, mode: str = "none", bf16: bool = False, kind: str = "pretrain") -> dict:
    """What is alive at the peak (slow: the profiler's memory timeline, with stacks): its bytes
    by category and by the op and nanobumble source lines that made each tensor."""
    from torch.profiler._memory_profiler import Action, MemoryProfileTimeline

    prof, _ = _second_step(shape, B, T, mode, bf16, kind, record_shapes=True, with_stack=True)
    memory = prof._memory_profile()
    cpu = torch.device("cpu")
    live: dict = {}
    total = peak = 0
    for t, action, (key, version), nbytes in sorted(MemoryProfileTimeline(memory).timeline, key=lambda e: e[0]):
        if key.device != cpu:
            continue
        if action in (Action.PREEXISTING, Action.CREATE):  # (a key made twice is counted once)
            total += nbytes - live.get(key, (0, 0))[1]
            live[key] = (version, nbytes)
        elif action == Action.INCREMENT_VERSION:
            live[key] = (version + 1, nbytes)
        elif action == Action.DESTROY and key in live:
            total -= live.pop(key)[1]
        if total > peak:
            peak, at_peak = total, dict(live)
    return {"peak": peak, "at_peak": _describe(memory, at_peak)}


def _describe(memory, live: dict) -> list:
    """What is alive: bytes by (category, the op that made it, the nanobumble lines above it)."""
    made_by = {}
    for node in memory._data_flow_graph.flow_nodes:
        for key in node.outputs:
            if key not in made_by:
                lines, event = [], node._event
                while event is not None:
                    if "nanobumble" in event.name and ".py(" in event.name:
                        lines.append(event.name.split("/")[-1])
                    event = event.parent
                made_by[key] = " <- ".join([node._event.name] + lines[:3])
    rows: dict = {}
    for key, (version, nbytes) in live.items():
        category = memory._categories.get(key, version)
        name = (str(category).split(".")[-1], made_by.get(key, "?"))
        rows[name] = rows.get(name, 0) + nbytes
    return sorted(([b, c, m] for (c, m), b in rows.items()), reverse=True)


def rss_peak(shape: dict, B: int, T: int, mode: str = "none", bf16: bool = False, kind: str = "pretrain") -> dict:
    """Peak RSS over the warm baseline (module docstring), in bytes. Linux only."""
    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    torch.set_num_threads(1)
    model, optimizer = build(TINY, mode, kind)
    train_step(model, optimizer, 1, 8, bf16, kind=kind)
    del model, optimizer
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current RSS
    baseline = status("VmRSS")
    model, optimizer = build(shape, mode, kind)
    for _ in range(2):
        train_step(model, optimizer, B, T, bf16, kind=kind)
    return {"peak": status("VmHWM") - baseline, "baseline": baseline}


def main(argv: list[str]) -> None:
    what, (shape, B, T, mode, dtype, *kind) = argv[0], json.loads(argv[1])
    bf16, kind = dtype == "bf16", (kind or ["pretrain"])[0]
    plan = plan_of(shape, B, T, mode, bf16, kind)
    measured = {"live": live_peak, "detail": live_detail, "rss": rss_peak}[what](shape, B, T, mode, bf16, kind)
    print(json.dumps({"plan": plan.training_bytes, "plan_phase": plan.peak_phase, "plan_terms": vars(plan),
                      **measured, "ratio": plan.training_bytes / measured["peak"]}))


if __name__ == "__main__":
    main(sys.argv[1:])
