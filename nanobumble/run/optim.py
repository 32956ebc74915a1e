"""AdamW with decay / no-decay groups, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float,
                    betas: tuple[float, float]) -> torch.optim.AdamW:
    """Weight decay on matrices only: norms, biases and embeddings are not decayed
    (shrinking an embedding row toward zero only hurts rare tokens)."""
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))  # a tied weight appears twice
        if param.dim() < 2 or "embed_tokens" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=on_cuda or None)


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int,
          kind: str = "cosine", min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup from
    peak/warmup to peak, then cosine or linear decay to peak * min_lr_ratio."""
    if warmup_steps > 0 and step <= warmup_steps:
        return peak_lr * step / warmup_steps
    if kind == "constant":
        return peak_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown lr_scheduler_type {kind!r}")
    return peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * shape)
