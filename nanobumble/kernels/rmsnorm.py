"""Fused RMSNorm: y = x * rsqrt(mean(x^2) + eps) * w over the last dimension.

One Triton program normalises one row in the forward pass. The forward saves
x, w and the per-row rstd (fp32) -- not the normalised x, which the backward
recomputes as x * rstd for free. The backward gives dx row by row and the
weight gradient as fp32 partial sums: each program walks a contiguous group
of rows and writes one partial row to a [num_programs, hidden] buffer that
torch sums afterwards (deterministic, no atomics).

Everything accumulates in fp32; y and dx come back in x's dtype, dw in the
weight's dtype (an fp32 weight with bf16 activations is fine).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanobumble.base.alloc import alloc
from nanobumble.kernels.interpreter import round_bf16_first, round_to_bf16

MAX_HIDDEN = 65536  # one row must fit in one block


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps,
                         BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride may pass 2^31
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    y = (x * rstd) * w  # same order as the reference: normalise, then scale
    if ROUND_BF16:
        y = round_to_bf16(y)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx,
                         n_rows, n_cols, rows_per_program, BLOCK: tl.constexpr, ROUND_BF16: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64 loop bounds: row * stride may pass 2^31
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        dyw = dy * w
        # dx = rstd * (dy*w - xhat * mean(dy*w*xhat)); padded columns are 0 in every term
        c = tl.sum(dyw * xhat, axis=0) / n_cols
        dx = rstd * (dyw - xhat * c)
        if ROUND_BF16:
            dx = round_to_bf16(dx)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def _launch_params(n_cols: int) -> tuple[int, int]:
    """BLOCK covers a whole row; more warps for wider rows so each thread holds ~4-16 values."""
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {n_cols} exceeds {MAX_HIDDEN} (one row per block)")
    block = triton.next_power_of_2(n_cols)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16 if block <= 16384 else 32
    return block, num_warps


def _dw_programs(n_rows: int, device: torch.device) -> int:
    """About one full wave of programs (several per SM, so one program's loads overlap
    another's math), but at least ~8 rows each so the partial rows stay a small share
    of the traffic (32k rows x 1536 on an H100: 1056 partial rows, ~4% extra bytes)."""
    if device.type == "cuda":
        target = torch.cuda.get_device_properties(device).multi_processor_count * 8
    else:
        target = 4  # the interpreter runs programs one after another; fewer is faster
    return max(1, min(target, triton.cdiv(n_rows, 8)))


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        n_cols = x.shape[-1]
        if weight.dim() != 1 or weight.shape[0] != n_cols:
            raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {n_cols}")
        block, num_warps = _launch_params(n_cols)
        x2 = x.contiguous().view(-1, n_cols)
        weight = weight.contiguous()
        n_rows = x2.shape[0]
        y = alloc(tuple(x2.shape), x.dtype, x.device)
        rstd = alloc((n_rows,), torch.float32, x.device)
        if n_rows > 0:
            _rms_norm_fwd_kernel[(n_rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, float(eps),
                                            BLOCK=block, ROUND_BF16=round_bf16_first(x2.dtype), num_warps=num_warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        block, num_warps = _launch_params(n_cols)
        dy2 = dy.contiguous().view(-1, n_cols)
        dx = alloc((n_rows, n_cols), x2.dtype, x2.device)
        if n_rows == 0:
            return dx.view(ctx.x_shape), torch.zeros_like(weight), None
        programs = min(_dw_programs(n_rows, x2.device), n_rows)
        rows_per_program = triton.cdiv(n_rows, programs)
        programs = triton.cdiv(n_rows, rows_per_program)  # e.g. 10 rows, 4 programs -> 3 rows each -> 4 programs
        partial = alloc((programs, n_cols), torch.float32, x2.device)
        _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight, rstd, dx, partial,
                                          dy2.stride(0), x2.stride(0), dx.stride(0), n_rows, n_cols, rows_per_program,
                                          BLOCK=block, ROUND_BF16=round_bf16_first(x2.dtype), num_warps=num_warps)
        dw = partial.sum(0).to(weight.dtype)
        return dx.view(ctx.x_shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused RMSNorm over the last dimension of x (any leading dims, any layout).
    Runs Triton on CUDA, and on CPU tensors under TRITON_INTERPRET=1."""
    return RMSNormFunction.apply(x, weight, float(eps))
