"""Which number format a run computes in.

train_model_precision "auto" (and chat's / serve's / evaluate's precision) is
bf16 on CUDA and on a CPU with native bf16 (AMX, AVX512-BF16, Arm's BF16: its
flags, base/cpu.py), fp32 on any other CPU (where bf16 is emulated and slower
than fp32). A single process computes in bf16 under autocast, keeping fp32 weights
and optimizer state; a sharded run gets the same from FSDP2's mixed-precision
policy (distributed.shard_model), so it needs no autocast on top.
"""

from __future__ import annotations

import contextlib

import torch

from nanobumble.base.cpu import native_bf16

PRECISIONS = ("auto", "bf16", "fp32")  # the values of train_model_precision and of chat's / serve's precision


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA and on a CPU with native bf16, plain fp32 on other CPUs."""
    if precision == "auto":
        fast_bf16 = device.type == "cuda" or (device.type == "cpu" and native_bf16())
        return torch.bfloat16 if fast_bf16 else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def autocast_dtype(info, dtype: torch.dtype) -> torch.dtype:
    """What autocast should cast to: nothing (fp32) in a sharded run, where FSDP's
    mixed-precision policy already computes in `dtype`; `dtype` in a single process."""
    return torch.float32 if info.sharded else dtype


def precision_summary(info, dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "precision fp32"
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    if info.sharded:
        return f"FSDP mixed precision: params {name}, reduce fp32"
    return f"autocast {name} (fp32 weights and optimizer)"
