"""Rotary position embedding (half-rotation layout, as Qwen2/Llama) of q and k.

q is [batch, seq, num_heads, head_dim] and k is [batch, seq, num_kv_heads, head_dim];
cos and sin are fp32 [batch, seq, head_dim // 2], one row per token, computed once per
forward from the position ids (so packed sequences whose positions restart inside a row
need nothing special here). With x1 = x[..., :half] and x2 = x[..., half:]:

    out1 = x1 * cos - x2 * sin
    out2 = x2 * cos + x1 * sin

The rotation is orthogonal, so the backward pass is the same kernel run with -sin.
One launch rotates q and k together: a program per (batch, seq) token handles all of
its q heads and all of its k heads, reading that token's cos/sin row once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanobumble.base.alloc import alloc_like
from nanobumble.kernels.interpreter import round_bf16_first, round_to_bf16


@triton.jit
def _rotate_heads(x_ptr, out_ptr, b, t, row, stride_b, stride_t, stride_h, cos, sin, d, d_mask,
                  NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Rotate all heads of one token: x at (b, t) with the given strides, out contiguous."""
    h = tl.arange(0, BLOCK_H)
    mask = (h[:, None] < NUM_HEADS) & d_mask[None, :]
    src = x_ptr + b * stride_b + t * stride_t + h[:, None] * stride_h + d[None, :]
    # Load and cast to fp32 at once; all arithmetic is fp32.
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    if ROUND_BF16:
        out1, out2 = round_to_bf16(out1), round_to_bf16(out2)
    dst = out_ptr + row * (NUM_HEADS * 2 * HALF) + h[:, None] * (2 * HALF) + d[None, :]
    tl.store(dst, out1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, out2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, seq_len,
                 q_stride_b, q_stride_t, q_stride_h, k_stride_b, k_stride_t, k_stride_h,
                 cs_stride_b, cs_stride_t,
                 NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 INVERSE: tl.constexpr, ROUND_BF16: tl.constexpr):
    # int64 so that row * stride cannot overflow on long batches
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row % seq_len
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    cs_offset = b * cs_stride_b + t * cs_stride_t + d
    cos = tl.load(cos_ptr + cs_offset, mask=d_mask, other=0.0)
    sin = tl.load(sin_ptr + cs_offset, mask=d_mask, other=0.0)
    if INVERSE:  # the backward pass rotates by the opposite angle
        sin = -sin
    _rotate_heads(q_ptr, q_out_ptr, b, t, row, q_stride_b, q_stride_t, q_stride_h, cos, sin, d, d_mask,
                  NUM_Q_HEADS, HALF, BLOCK_QH, ROUND_BF16)
    _rotate_heads(k_ptr, k_out_ptr, b, t, row, k_stride_b, k_stride_t, k_stride_h, cos, sin, d, d_mask,
                  NUM_K_HEADS, HALF, BLOCK_KH, ROUND_BF16)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # The kernel takes any batch/seq/head strides but needs unit stride along head_dim.
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    if cos.stride() != sin.stride():  # one set of strides is passed for both
        cos, sin = cos.contiguous(), sin.contiguous()
    batch, seq, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[2]
    half = head_dim // 2
    q_out, k_out = alloc_like(q), alloc_like(k)
    if batch * seq == 0:
        return q_out, k_out
    block_qh = triton.next_power_of_2(num_q_heads)
    block_kh = triton.next_power_of_2(num_k_heads)
    block_half = triton.next_power_of_2(half)
    # Roughly 8 elements of the larger (q) tile per thread, 1 to 8 warps.
    num_warps = min(8, max(1, block_qh * block_half // 256))
    _rope_kernel[(batch * seq,)](
        q, k, q_out, k_out, cos, sin, seq,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cos.stride(0), cos.stride(1),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HALF=half,
        BLOCK_QH=block_qh, BLOCK_KH=block_kh, BLOCK_HALF=block_half,
        INVERSE=inverse, ROUND_BF16=round_bf16_first(q.dtype), num_warps=num_warps,
    )
    return q_out, k_out


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [batch, seq, heads, head_dim], got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, seq, _, head_dim = q.shape
    if k.shape[0] != batch or k.shape[1] != seq or k.shape[3] != head_dim:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}")
    expected = (batch, seq, head_dim // 2)
    if tuple(cos.shape) != expected or tuple(sin.shape) != expected:
        raise ValueError(f"cos and sin must be {expected}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"cos and sin must be float32, got {cos.dtype} and {sin.dtype}")


class RoPEFunction(torch.autograd.Function):
    """Rotates q and k in one launch; backward rotates the gradients back in one launch."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check(q, k, cos, sin)
        q_out, k_out = _launch(q, k, cos, sin, inverse=False)
        ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor):
        # (autograd passes zeros for an output that did not reach the loss)
        cos, sin = ctx.saved_tensors
        dq, dk = _launch(grad_q, grad_k, cos, sin, inverse=True)
        return dq, dk, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, T, Hq, D] and k [B, T, Hk, D] with the Triton kernel.

    Returns new contiguous tensors of the inputs' shapes and dtype."""
    return RoPEFunction.apply(q, k, cos, sin)
