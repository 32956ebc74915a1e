"""The cross-entropy row kernel: the loss and gradient of each row of a chunk of
logits, for the chunked LM head + loss in nanobumble/model/lm_loss.py (which
also holds the same math in plain PyTorch, _rows_torch).

cross_entropy_rows, one Triton program per row of a chunk's logits:
    Pass 1 walks the row in blocks with an online softmax (running max m and
    running sum s of exp(x - m), in fp32), so a 151,936-wide row never has to sit
    in registers, and picks up the target's logit on the way: loss = (m -
    x[target]) + log(s). Pass 2 walks the row again and writes the gradient
    (softmax - onehot) * scale over the logits (scale 1, or each row's own
    grad_output for reduction="none"). The forward pass therefore leaves the
    chunk's whole gradient behind; no backward kernel is needed. Rows whose
    target is ignore_index get loss 0 and a zero gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanobumble.base.alloc import alloc
from nanobumble.kernels.interpreter import round_bf16_first, round_to_bf16

# ---------------------------------------------------------------------------------------------
# The Triton kernel: loss and gradient of one row per program
# ---------------------------------------------------------------------------------------------

@triton.jit
def _cross_entropy_kernel(LOGITS, GRAD, TARGETS, LOSS, SCALE, stride_scale, stride_logits, stride_grad, n_cols,
                          ignore_index, BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr,
                          ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2^31 at 32k tokens x 151,936
    LOGITS += row * stride_logits
    GRAD += row * stride_grad
    target = tl.load(TARGETS + row).to(tl.int64)
    if target == ignore_index:
        tl.store(LOSS + row, 0.0)
        if WRITE_GRAD:
            zero = tl.zeros((BLOCK,), dtype=tl.float32).to(GRAD.dtype.element_ty)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(GRAD + cols, zero, mask=cols < n_cols)
    else:
        # pass 1: online softmax. m = max so far, s = sum of exp(x - m) so far.
        m = -float("inf")
        s = 0.0
        x_target = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(LOGITS + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            x_target += tl.sum(tl.where(cols == target, x, 0.0), axis=0)
        # keep m and log(s) apart: at logits of 1e4, m + log(s) in fp32 would lose ~1e-3
        log_s = tl.log(s)
        tl.store(LOSS + row, (m - x_target) + log_s)
        if WRITE_GRAD:
            # pass 2: gradient (softmax - onehot) * scale. Each element is read before it is
            # written, by this program only, so GRAD may be LOGITS itself.
            scale = tl.load(SCALE + row * stride_scale)  # one scale for all rows (stride 0), or one per row
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                x = tl.load(LOGITS + cols, mask=mask, other=-float("inf")).to(tl.float32)
                g = (tl.exp((x - m) - log_s) - tl.where(cols == target, 1.0, 0.0)) * scale
                if ROUND_BF16:
                    g = round_to_bf16(g)
                tl.store(GRAD + cols, g.to(GRAD.dtype.element_ty), mask=mask)


# Columns per step of a program's walk along its row. Tests lower it so that the online
# softmax crosses many blocks at vocabulary sizes the interpreter can afford.
MAX_BLOCK = 8192


def _block_and_warps(n_cols: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
    return block, (8 if block >= 4096 else 4)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                       grad: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Per-row losses (fp32) of logits [n, V]; when grad is given, (softmax - onehot) * scale
    (scale: an fp32 scalar, or one fp32 value per row) is written into it (grad may be logits itself)."""
    n_rows, n_cols = logits.shape
    loss_rows = alloc((n_rows,), torch.float32, logits.device)
    if n_rows == 0:
        return loss_rows
    block, num_warps = _block_and_warps(n_cols)
    _cross_entropy_kernel[(n_rows,)](
        logits, grad if grad is not None else logits, targets, loss_rows, scale, scale.stride(0) if scale.dim() else 0,
        logits.stride(0), grad.stride(0) if grad is not None else 0, n_cols, ignore_index,
        BLOCK=block, WRITE_GRAD=grad is not None,
        ROUND_BF16=grad is not None and round_bf16_first(grad.dtype),
        num_warps=num_warps)
    return loss_rows
