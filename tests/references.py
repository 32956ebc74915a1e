"""Plain references that only tests compare against (float64-capable, materialising everything)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanobumble.model.layers import IGNORE_INDEX
from nanobumble.model.lm_loss import _check_reduction, _check_targets


def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Plain PyTorch, fp32 math (float64 stays float64). Unlike F.cross_entropy's "mean",
    all-ignored targets give a loss of 0 and a zero gradient instead of NaN."""
    _check_reduction(reduction)
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    _check_targets(targets, logits.shape[-1], logits.shape[0])
    x = logits if logits.dtype == torch.float64 else logits.float()
    # reduction="none" gives 0 for ignored rows, so their gradient is 0 as well
    total = F.cross_entropy(x, targets.long(), ignore_index=IGNORE_INDEX, reduction="none").sum()
    if reduction == "mean":
        total = total / (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   reduction: str = "mean") -> torch.Tensor:
    """The materialised version: the full [N, V] logits, then cross_entropy_reference."""
    return cross_entropy_reference(hidden @ weight.T, targets, reduction)
