"""References that only tests compare against: the same math as the production code,
computed the plain way from tensors already in hand (float64-capable, materialising
the logits that training never builds)."""

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

# Positions per chunk when walking the [B, T, V] logits: with V = 151,936 a chunk is
# about 64 MB in fp32, so the fp32 temporaries stay small whatever the batch size.
CHUNK_ELEMENTS = 1 << 24


def _chunks(logits: torch.Tensor):
    """(row, t0, t1) slices covering logits [B, T, V]; logits[b, t0:t1] is a view even
    when logits itself is not contiguous (e.g. logits[:, :-1])."""
    B, T, V = logits.shape
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for b in range(B):
        for t0 in range(0, T, step):
            yield b, t0, min(t0 + step, T)


def _check_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [batch, seq, vocab], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape[:2])}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    V = logits.shape[-1]
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):  # one host sync buys a clear error instead of a wrong gather
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"label {int(labels[b, t])} at row {b}, position {t} is outside the vocabulary "
                         f"[0, {V}) and is not {IGNORE_INDEX}")


class _TokenLogps(torch.autograd.Function):
    """log softmax(logits)[label] per position, in fp32, a chunk at a time.

    Autograd through logsumexp would keep an fp32 copy of every chunk for the
    backward pass (a full fp32 copy of the logits when they are bf16). Here only
    the logits themselves (already alive) and the [B, T] logsumexp are saved, and
    the backward recomputes softmax one chunk at a time:
        d logp[b,t] / d logits[b,t,:] = onehot(label) - softmax(logits[b,t,:])."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        safe = torch.where(mask, labels, 0).long()
        logps = torch.zeros(labels.shape, dtype=out_dtype, device=logits.device)
        lse = torch.zeros(labels.shape, dtype=out_dtype, device=logits.device)
        for b, t0, t1 in _chunks(logits):
            x = logits[b, t0:t1].to(out_dtype)
            lse[b, t0:t1] = torch.logsumexp(x, dim=-1)
            logps[b, t0:t1] = x.gather(-1, safe[b, t0:t1, None]).squeeze(-1) - lse[b, t0:t1]
        logps.mul_(mask)
        ctx.save_for_backward(logits, safe, mask, lse)
        return logps

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        logits, safe, mask, lse = ctx.saved_tensors
        g = grad_logps * mask  # ignored positions get no gradient
        grad = torch.empty_like(logits)
        for b, t0, t1 in _chunks(logits):
            gc = g[b, t0:t1, None]
            p = (logits[b, t0:t1].to(lse.dtype) - lse[b, t0:t1, None]).exp_().mul_(-gc)
            p.scatter_add_(-1, safe[b, t0:t1, None], gc)
            grad[b, t0:t1] = p
        return grad, None, None


def token_logps_reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps [B, T] fp32, mask [B, T] bool): log-probability of each label token
    under logits [B, T, V], and where labels are real (not -100). Ignored positions
    hold 0. Differentiable with respect to logits."""
    _check_labels(logits, labels)
    mask = labels != IGNORE_INDEX
    return _TokenLogps.apply(logits, labels, mask), mask


@torch.no_grad()
def mean_logits_reference(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] fp32: each row's logits averaged over the vocabulary and its masked positions
    (0 for a row without any). Sums in fp32 a chunk at a time, without an fp32 copy."""
    B, T, V = logits.shape
    position_sums = torch.zeros(B, T, dtype=torch.float32, device=logits.device)
    for b, t0, t1 in _chunks(logits):
        position_sums[b, t0:t1] = logits[b, t0:t1].sum(-1, dtype=torch.float32)
    count = mask.sum(-1).clamp(min=1).float() * V
    return (position_sums * mask).sum(-1) / count
