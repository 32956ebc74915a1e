"""The LM head and its cross-entropy, a chunk of tokens at a time, without the full logits.

linear_cross_entropy(hidden [N, H], weight [V, H], targets [N]):
    The loss of F.cross_entropy(hidden @ weight.T, targets) (0, not NaN, when every
    target is ignored), but the tokens go through in chunks, so only one chunk of
    logits exists at a time.
    For each chunk the forward pass computes logits_c = hidden_c @ weight.T (in
    the input dtype, as the model would), turns them into grad_logits_c in place
    (the Triton row kernel, nanobumble/kernels/cross_entropy.py, or the same
    math in plain torch, _rows_torch, with backend="torch"), and then
    grad_hidden_c = grad_logits_c @ weight and grad_weight += grad_logits_c.T
    @ hidden_c, summed in fp32 (with bf16/fp16 inputs on CUDA through addmm's
    out_dtype=float32, so each chunk's product is never rounded to bf16).
    The chunks' gradients stay unscaled; backward multiplies the two stored
    gradients by grad_output (and 1/n_valid for "mean") in fp32 and rounds once.
    reduction="none" gives per-token losses instead, and recomputes each chunk
    in backward (LinearCrossEntropyPerTokenFunction).

Shared rules:
- targets equal to IGNORE_INDEX (-100) add nothing to the loss and get a zero
  gradient row. "mean" divides by the number of non-ignored targets (over all
  chunks); when every target is ignored the loss is 0 and the gradient 0.
- Any other target outside [0, V) raises ValueError. The check is one cheap
  torch reduction and one host sync per call, before anything is launched.
- The loss is fp32 whatever the input dtype (it sums many tokens); gradients
  come back in the dtype of the tensor they belong to.
- With "mean" or "sum" the gradients are computed in the forward pass and handed
  out once: a second backward through the same graph (retain_graph=True) raises
  an error, because the stored gradients have already been scaled and released.
- Leading dimensions are flattened: hidden [B, T, H] with targets [B, T] work.
"""

from __future__ import annotations

import functools

import torch

from nanobumble.base.alloc import alloc
from nanobumble.model.layers import IGNORE_INDEX, resolve_backend, triton_kernels

# linear_cross_entropy's default chunk: as many rows as keep one chunk of logits,
# counted at 4 bytes a value, within this budget (rounded down to a multiple of 64
# rows), but never fewer than _MIN_CHUNK_ROWS so the three matmuls stay efficient.
_CHUNK_BYTES = 256 * 2**20

_MIN_CHUNK_ROWS = 256

REDUCTIONS = ("mean", "sum")  # linear_cross_entropy also takes "none"


def _check_targets(targets: torch.Tensor, vocab_size: int, n_rows: int) -> None:
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")
    if targets.numel() != n_rows:
        raise ValueError(f"{targets.numel()} targets for {n_rows} rows of logits")
    bad = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):  # the one host sync: a clear error instead of a silently wrong loss
        first = int(targets.reshape(-1)[bad.reshape(-1)][0])
        raise ValueError(f"target id {first} is outside the vocabulary [0, {vocab_size}) "
                         f"and is not ignore_index {IGNORE_INDEX}")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def _rows_torch(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, write_grad: bool) -> torch.Tensor:
    """The same as the Triton row kernel (kernels/cross_entropy.py), with plain torch ops.
    logits is scratch: it is overwritten (by the gradient when write_grad)."""
    x = logits.float()  # fp32 logits: x *is* logits, and the math below runs in place on it
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, 0).long()
    m = x.amax(dim=-1, keepdim=True)
    x_target = x.gather(1, safe_targets[:, None])
    x.sub_(m)  # as in the kernel, m and log(s) stay apart for precision at large logits
    log_s = torch.logsumexp(x, dim=-1, keepdim=True)
    loss_rows = torch.where(valid, ((m - x_target) + log_s).squeeze(1), 0.0)
    if write_grad:
        x.sub_(log_s).exp_()
        x[torch.arange(x.shape[0], device=x.device), safe_targets] -= 1.0
        x.mul_((scale * valid)[:, None])
        if x.data_ptr() != logits.data_ptr():
            logits.copy_(x)
    return loss_rows


def _mean_scale(targets: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_valid, scale) as fp32 device tensors, so no host sync: scale = 1/max(n_valid, 1) for
    "mean", 1 for "sum". With all targets ignored the loss is 0 either way."""
    n_valid = (targets != IGNORE_INDEX).sum().float()
    if reduction == "mean":
        return n_valid, 1.0 / n_valid.clamp(min=1.0)
    return n_valid, torch.ones((), dtype=torch.float32, device=targets.device)


def default_chunk_size(n_rows: int, vocab_size: int, dtype: torch.dtype = torch.float32,
                       backend: str = "triton") -> int:
    """Rows per chunk: the chunk's logits within _CHUNK_BYTES (256 MiB), counted at their
    real size (2 bytes a value in bf16; the torch backend adds its fp32 working copy), in
    multiples of 64 rows, at least _MIN_CHUNK_ROWS, at most n_rows. At V = 151,936 that is
    832 rows in bf16 and 384 in fp32."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    bytes_per_value = itemsize + (4 if backend == "torch" and itemsize != 4 else 0)
    rows = _CHUNK_BYTES // (bytes_per_value * vocab_size) // 64 * 64
    return max(1, min(n_rows, max(_MIN_CHUNK_ROWS, rows)))


@functools.cache
def _has_fp32_out_addmm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.addmm(..., out_dtype=float32) multiplies `dtype` matrices into an fp32 sum
    here (CUDA builds of recent PyTorch). Probed once with a small exact case."""
    try:
        a = torch.ones(16, 16, dtype=dtype, device=device)
        acc = torch.ones(16, 16, dtype=torch.float32, device=device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool((acc == 17).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _add_matmul_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with the products summed in fp32, never rounded to a's dtype:
    rounding each chunk's [V, H] product to bf16 would add one bf16 error per chunk."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.device.type == "cuda" and _has_fp32_out_addmm(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # bf16 tensor cores, fp32 output
    else:  # CPU (where fp32 matmul is no slower than bf16), or an older PyTorch on CUDA
        acc.addmm_(a.float(), b.float())


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str,
                chunk_size: int, backend: str, want_grad: bool) -> torch.Tensor:
        n_rows, hidden_size = hidden.shape
        vocab_size = weight.shape[0]
        need_hidden = want_grad and ctx.needs_input_grad[0]
        need_weight = want_grad and ctx.needs_input_grad[1]
        write_grad = need_hidden or need_weight
        _, scale = _mean_scale(targets, reduction)
        # The chunks' gradients are left unscaled (softmax - onehot); the 1/n_valid of "mean"
        # and grad_output are applied once, in fp32, to grad_hidden and grad_weight in backward.
        # Tiny scaled values would otherwise round (or underflow, in fp16) twice.
        one = torch.ones((), dtype=torch.float32, device=hidden.device)

        grad_hidden = alloc((n_rows, hidden_size), hidden.dtype, hidden.device) if need_hidden else None
        grad_weight = torch.zeros((vocab_size, hidden_size), dtype=torch.float32, device=weight.device) \
            if need_weight else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are settled by the caller
            for start in range(0, n_rows, chunk_size):
                end = min(start + chunk_size, n_rows)
                hidden_c = hidden[start:end]
                logits_c = hidden_c @ weight.T  # [c, V], made here and overwritten by its gradient
                if backend == "triton":
                    loss_rows = triton_kernels().cross_entropy_rows(logits_c, targets[start:end], one,
                                                                 logits_c if write_grad else None, IGNORE_INDEX)
                else:
                    loss_rows = _rows_torch(logits_c, targets[start:end], one, write_grad)
                loss += loss_rows.sum()
                if need_hidden:
                    torch.matmul(logits_c, weight, out=grad_hidden[start:end])
                if need_weight:
                    _add_matmul_fp32(grad_weight, logits_c.T, hidden_c)
                del logits_c
        ctx.grad_hidden, ctx.grad_weight, ctx.scale = grad_hidden, grad_weight, scale
        ctx.weight_dtype = weight.dtype
        ctx.used = False
        return loss * scale

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.used:
            raise RuntimeError("linear_cross_entropy: the gradients were computed in the forward pass and "
                               "are handed out once; backward cannot run twice through the same graph")
        ctx.used = True
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        ctx.grad_hidden = ctx.grad_weight = None
        factor = grad_output.float() * ctx.scale
        if grad_hidden is not None:
            grad_hidden = (grad_hidden.float() * factor).to(grad_hidden.dtype)
        if grad_weight is not None:  # fp32 until here; one rounding to the weight's dtype
            grad_weight = grad_weight.mul_(factor).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


class LinearCrossEntropyPerTokenFunction(torch.autograd.Function):
    """Per-token losses [N] (fp32, 0 where ignored) and, as a second, non-differentiable
    output, each token's logits averaged over the vocabulary (a monitoring number).

    The gradient depends on how the caller weighs each token (DPO sums them per
    sequence, then through a sigmoid), so it cannot be computed ahead in the forward
    pass as for "mean"/"sum". Forward keeps only hidden and weight; backward
    recomputes each chunk's logits, turns them into (softmax - onehot) * grad_output[r]
    in place (row r's own scale) and multiplies out as the fused version does:
    one extra [chunk x V] matmul per chunk, and still never the full logits."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        n_rows, vocab_size = hidden.shape[0], weight.shape[0]
        one = torch.ones((), dtype=torch.float32, device=hidden.device)
        losses = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        mean_logits = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n_rows, chunk_size):
                end = min(start + chunk_size, n_rows)
                logits_c = hidden[start:end] @ weight.T
                mean_logits[start:end] = logits_c.sum(-1, dtype=torch.float32) / vocab_size
                if backend == "triton":
                    losses[start:end] = triton_kernels().cross_entropy_rows(logits_c, targets[start:end], one, None,
                                                                         IGNORE_INDEX)
                else:  # overwrites logits_c, which is scratch
                    losses[start:end] = _rows_torch(logits_c, targets[start:end], one, False)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size, ctx.backend = chunk_size, backend
        ctx.mark_non_differentiable(mean_logits)
        return losses, mean_logits

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor, _grad_mean_logits: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                end = min(start + ctx.chunk_size, hidden.shape[0])
                hidden_c = hidden[start:end]
                logits_c = hidden_c @ weight.T
                # d(sum_r g_r loss_r)/d logits = (softmax - onehot) * g_r, scaled in fp32, rounded once
                scale = grad_losses[start:end].float().contiguous()
                if ctx.backend == "triton":
                    triton_kernels().cross_entropy_rows(logits_c, targets[start:end], scale, logits_c, IGNORE_INDEX)
                else:
                    _rows_torch(logits_c, targets[start:end], scale, True)
                if need_hidden:
                    torch.matmul(logits_c, weight, out=grad_hidden[start:end])
                if need_weight:
                    _add_matmul_fp32(grad_weight, logits_c.T, hidden_c)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean", chunk_size: int | None = None,
                         backend: str = "triton") -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, targets) without the full logits.

    hidden [..., H], weight [V, H] (may be tied to an embedding, may have
    requires_grad=False), targets [...]. backend "triton" uses the kernel for the
    loss and gradient of each chunk, "torch" plain torch ops (any device). Under
    autocast both operands are cast to the autocast dtype, as F.linear would do;
    otherwise weight is cast to hidden's dtype if they differ. chunk_size None
    takes default_chunk_size. Returns an fp32 scalar."""
    if reduction != "none":
        _check_reduction(reduction)
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    if backend == "triton":
        resolve_backend("triton", hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden.shape[1]}")
    _check_targets(targets, weight.shape[0], hidden.shape[0])
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)  # autograd carries the gradient back to weight's dtype
    hidden = hidden.contiguous()
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0], hidden.dtype, backend)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if reduction == "none":
        return LinearCrossEntropyPerTokenFunction.apply(hidden, weight, targets, chunk_size, backend)
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, reduction, chunk_size, backend,
                                            torch.is_grad_enabled())
