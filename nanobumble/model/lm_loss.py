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
    @ hidden_c, both into fp32 buffers (see "Gradient paths").
    The chunks' gradients stay unscaled; backward multiplies the two stored fp32
    gradients by grad_output (and 1/n_valid for "mean") and rounds once to their
    dtype: one bf16 rounding of grad_hidden and of grad_weight, no more.
    reduction="none" gives per-token losses instead, and recomputes each chunk
    in backward (LinearCrossEntropyPerTokenFunction).

Shared rules:
- targets equal to IGNORE_INDEX (-100) add nothing to the loss and get a zero
  gradient row. "mean" divides by the number of non-ignored targets (over all
  chunks); when every target is ignored the loss is 0 and the gradient 0.
- Targets are not range-checked here (that would cost a host sync per call):
  they are checked where the rows are made (data/shards.py, sft_data.py,
  dpo_data.py). A target outside [0, V) that is not ignore_index still makes
  no silent number: it turns the loss (that row's loss, for "none") and the
  gradients into NaN, on the device, without a sync.
- The loss is fp32 whatever the input dtype (it sums many tokens); gradients
  come back in the dtype of the tensor they belong to.
- With "mean" or "sum" the gradients are computed in the forward pass and handed
  out once: a second backward through the same graph (retain_graph=True) raises
  an error, because the stored gradients have already been scaled and released.
- Leading dimensions are flattened: hidden [B, T, H] with targets [B, T] work.

Gradient paths (lm_head_path() names the one the last call took, for benchmarks;
a bf16/fp16 path is printed once per process when first taken):
    "fp32"       fp32 (or float64) inputs: plain GEMMs in that dtype.
    "out_dtype"  bf16/fp16 inputs where torch.mm / torch.addmm take out_dtype=float32
                 (CUDA, recent PyTorch): tensor-core GEMMs whose sums, split-K
                 reductions included, stay fp32 until the one final rounding.
    "fallback"   bf16/fp16 inputs where out_dtype is refused (CPU; older PyTorch on
                 CUDA): the gradient GEMMs run on fp32 copies of the operands (the
                 weight copied once per call). The same numbers, slower.

Chunk size (default_chunk_size): on CUDA as many rows as fit in half the memory
free at the call (free + what PyTorch's cache holds unused), at most 4 GiB of
chunk, at least 256 MiB, in power-of-two multiples of the 256 MiB chunk; fewer
chunks mean fewer passes over the [V, H] fp32 weight gradient. On CPU the
256 MiB chunk. The chunk_size argument pins it.
"""

from __future__ import annotations

import functools

import torch

from nanobumble.base.alloc import alloc
from nanobumble.base.distributed import print0
from nanobumble.model.layers import IGNORE_INDEX, resolve_backend, triton_kernels

# linear_cross_entropy's smallest chunk (and its chunk on CPU): as many rows as keep one
# chunk of logits within this budget, counted at their real size (rounded down to a
# multiple of 64 rows), but never fewer than _MIN_CHUNK_ROWS so the three matmuls stay efficient.
_CHUNK_BYTES = 256 * 2**20
_MIN_CHUNK_ROWS = 256
# With the free memory known (CUDA), a chunk may take this share of it, up to _MAX_CHUNK_BYTES:
# the rest stays for the backward pass through the blocks.
_FREE_SHARE = 0.5
_MAX_CHUNK_BYTES = 4 * 2**30

PATHS = {
    "fp32": "fp32 inputs: fp32 GEMMs",
    "out_dtype": "{dtype} GEMMs with fp32 output (torch.mm/addmm out_dtype=float32): the gradients are "
                 "summed in fp32 and rounded once",
    "fallback": "{dtype} inputs, but torch.mm/addmm out_dtype=float32 is refused on {device} ({why}): the "
                "gradient GEMMs run on fp32 copies of the operands (same numbers, slower)",
}
_last: dict = {"path": None, "chunk_rows": None, "rows": None}
_said: set = set()


def lm_head_path() -> str | None:
    """The gradient path the last linear_cross_entropy call took: "fp32", "out_dtype" or
    "fallback" (see the module docstring); None before the first call."""
    return _last["path"]


def lm_head_info() -> dict:
    """{"path", "chunk_rows", "rows"} of the last linear_cross_entropy call (a copy)."""
    return dict(_last)

REDUCTIONS = ("mean", "sum")  # linear_cross_entropy also takes "none"


def _check_target_shape(targets: torch.Tensor, n_rows: int) -> None:
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")
    if targets.numel() != n_rows:
        raise ValueError(f"{targets.numel()} targets for {n_rows} rows of logits")


def _out_of_range(targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per target: neither ignore_index nor in [0, vocab_size) (a device tensor: no sync)."""
    return (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab_size))


def _check_targets(targets: torch.Tensor, vocab_size: int, n_rows: int) -> None:
    """Shape and range, with a host sync: for the references tests compare against. The loss
    itself does not call it (its targets are checked where the rows are made)."""
    _check_target_shape(targets, n_rows)
    bad = _out_of_range(targets, vocab_size)
    if bool(bad.any()):
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
    # clamped: an out-of-range target (made NaN by the caller) must not index outside the row
    safe_targets = torch.where(valid, targets, 0).long().clamp_(0, x.shape[1] - 1)
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
                       backend: str = "triton", free_bytes: int | None = None, upcast: bool = False) -> int:
    """Rows per chunk, counting a chunk's logits at their real size (2 bytes a value in bf16)
    plus their fp32 working copy (the torch backend; upcast: the "fallback" path's copy).

    free_bytes None (CPU, and the memory plan's floor): the logits within _CHUNK_BYTES
    (256 MiB), in multiples of 64 rows, at least _MIN_CHUNK_ROWS, at most n_rows; at
    V = 151,936 that is 832 rows in bf16 and 384 in fp32. With free_bytes (CUDA): that
    many rows times the largest power of two whose chunk fits in _FREE_SHARE of
    free_bytes and in _MAX_CHUNK_BYTES (powers of two, so that a little more or less
    free memory from one step to the next does not change the chunks), at most n_rows."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    extra = 4 if (backend == "torch" or upcast) and itemsize < 4 else 0
    row_bytes = (itemsize + extra) * vocab_size
    rows = max(_MIN_CHUNK_ROWS, _CHUNK_BYTES // row_bytes // 64 * 64)
    if free_bytes is not None:
        budget = min(int(free_bytes * _FREE_SHARE), _MAX_CHUNK_BYTES)
        while rows < n_rows and 2 * rows * row_bytes <= budget:
            rows *= 2
    return max(1, min(n_rows, rows))


def _free_bytes(device: torch.device) -> int | None:
    """Memory a chunk may come from: on CUDA what the device has free plus what PyTorch's
    caching allocator holds unused (no sync: host-side counters). None on CPU (fixed chunks)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


@functools.cache
def _fp32_out_refused(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when torch.mm and torch.addmm multiply `dtype` matrices into an fp32 result here
    (CUDA builds of recent PyTorch), else why not. Probed once per device and dtype (one host
    sync, on the first call only) with a sum that bf16 cannot hold: 1 + 15 * 2^-8."""
    try:
        with torch.autocast(device.type, enabled=False):  # it is called inside the model's autocast
            a = torch.full((1, 16), 2.0**-8, dtype=dtype, device=device)
            a[0, 0] = 1.0
            b = torch.ones(16, 1, dtype=dtype, device=device)
            out = torch.empty(1, 1, dtype=torch.float32, device=device)
            torch.mm(a, b, out_dtype=torch.float32, out=out)
            acc = torch.ones(1, 1, dtype=torch.float32, device=device)
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        if not (bool(out[0, 0] == 1 + 15 * 2.0**-8) and bool(acc[0, 0] == 2 + 15 * 2.0**-8)):
            return "its result was not summed in fp32"
        return None
    except (RuntimeError, TypeError, NotImplementedError) as e:
        first = (str(e).splitlines() or [""])[0].split(". ")[0]  # torch's messages run on for lines
        return f"{type(e).__name__}: {first[:100]}"


def _gradient_path(dtype: torch.dtype, device: torch.device) -> str:
    """"fp32", "out_dtype" or "fallback" (module docstring); a bf16/fp16 path is printed once."""
    if dtype in (torch.float32, torch.float64):
        return "fp32"
    why = _fp32_out_refused(device, dtype)
    path = "fallback" if why else "out_dtype"
    message = "LM head: " + PATHS[path].format(dtype=str(dtype).removeprefix("torch."), device=device.type, why=why)
    if message not in _said:
        _said.add(message)
        print0(message)
    return path


def _matmul_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, path: str, accumulate: bool) -> None:
    """out (fp32, or float64 for float64 inputs) = or += a @ b, with the products summed in
    out's dtype and never rounded to a's: a bf16 output (or split-K partial sums in bf16)
    would add one bf16 error per chunk. On the "fallback" path a and b are fp32 copies."""
    if path == "out_dtype":
        if accumulate:
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)  # bf16 tensor cores, fp32 sums
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def _operands(hidden: torch.Tensor, weight: torch.Tensor, path: str):
    """(accumulator dtype, weight as the gradient GEMMs read it, hidden chunk -> same)."""
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if path == "fallback":  # the weight copied to fp32 once per call, not once per chunk
        return acc_dtype, weight.float(), lambda x: x.float()
    return acc_dtype, weight, lambda x: x


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str,
                chunk_size: int, backend: str, want_grad: bool, path: str) -> torch.Tensor:
        n_rows, hidden_size = hidden.shape
        vocab_size = weight.shape[0]
        need_hidden = want_grad and ctx.needs_input_grad[0]
        need_weight = want_grad and ctx.needs_input_grad[1]
        write_grad = need_hidden or need_weight
        _, scale = _mean_scale(targets, reduction)
        # NaN (on the device, no sync) when a target is out of range: see the module docstring
        scale = torch.where(_out_of_range(targets, vocab_size).any(), float("nan"), scale)
        # The chunks' gradients are left unscaled (softmax - onehot); the 1/n_valid of "mean"
        # and grad_output are applied once, in fp32, to grad_hidden and grad_weight in backward.
        # Tiny scaled values would otherwise round (or underflow, in fp16) twice.
        one = torch.ones((), dtype=torch.float32, device=hidden.device)
        acc_dtype, weight_g, cast = _operands(hidden, weight, path) if write_grad else (None, None, None)

        # Both gradients stay fp32 (acc_dtype) until backward rounds each once to its dtype.
        grad_hidden = alloc((n_rows, hidden_size), acc_dtype, hidden.device) if need_hidden else None
        grad_weight = torch.zeros((vocab_size, hidden_size), dtype=acc_dtype, device=weight.device) \
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
                if write_grad:
                    grad_c = cast(logits_c)
                    del logits_c
                    if need_hidden:
                        _matmul_fp32(grad_hidden[start:end], grad_c, weight_g, path, accumulate=False)
                    if need_weight:
                        _matmul_fp32(grad_weight, grad_c.T, cast(hidden_c), path, accumulate=True)
                    del grad_c
        ctx.grad_hidden, ctx.grad_weight, ctx.scale = grad_hidden, grad_weight, scale
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
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
        # fp32 until here; one rounding each to the dtype of the tensor it belongs to
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(factor).to(ctx.hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(factor).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


class LinearCrossEntropyPerTokenFunction(torch.autograd.Function):
    """Per-token losses [N] (fp32, 0 where ignored) and, as a second, non-differentiable
    output, each token's logits averaged over the vocabulary (a monitoring number).

    The gradient depends on how the caller weighs each token (DPO sums them per
    sequence, then through a sigmoid), so it cannot be computed ahead in the forward
    pass as for "mean"/"sum". Forward keeps only hidden and weight; backward
    recomputes each chunk's logits, turns them into (softmax - onehot) * grad_output[r]
    in place (row r's own scale) and multiplies out as the fused version does:
    one extra [chunk x V] matmul per chunk, and still never the full logits. Each
    chunk's grad_hidden is summed in fp32 and rounded once."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                backend: str, path: str) -> tuple[torch.Tensor, torch.Tensor]:
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
        bad = _out_of_range(targets, vocab_size)  # NaN rows (and gradients), on the device, no sync
        losses = torch.where(bad, float("nan"), losses)
        ctx.save_for_backward(hidden, weight, targets, bad)
        ctx.chunk_size, ctx.backend, ctx.path = chunk_size, backend, path
        ctx.mark_non_differentiable(mean_logits)
        return losses, mean_logits

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor, _grad_mean_logits: torch.Tensor):
        hidden, weight, targets, bad = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc_dtype, weight_g, cast = _operands(hidden, weight, ctx.path)
        chunk = min(ctx.chunk_size, hidden.shape[0])
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_hidden_c = torch.empty((chunk, hidden.shape[1]), dtype=acc_dtype, device=hidden.device) \
            if need_hidden and hidden.dtype != acc_dtype else None
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
        scales = torch.where(bad, float("nan"), grad_losses.float())
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                end = min(start + ctx.chunk_size, hidden.shape[0])
                hidden_c = hidden[start:end]
                logits_c = hidden_c @ weight.T
                # d(sum_r g_r loss_r)/d logits = (softmax - onehot) * g_r, scaled in fp32, rounded once
                scale = scales[start:end].contiguous()
                if ctx.backend == "triton":
                    triton_kernels().cross_entropy_rows(logits_c, targets[start:end], scale, logits_c, IGNORE_INDEX)
                else:
                    _rows_torch(logits_c, targets[start:end], scale, True)
                grad_c = cast(logits_c)
                del logits_c
                if need_hidden:  # summed in fp32 and rounded once (by the copy) to hidden's dtype
                    out = grad_hidden[start:end] if grad_hidden_c is None else grad_hidden_c[:end - start]
                    _matmul_fp32(out, grad_c, weight_g, ctx.path, accumulate=False)
                    if grad_hidden_c is not None:
                        grad_hidden[start:end].copy_(out)
                if need_weight:
                    _matmul_fp32(grad_weight, grad_c.T, cast(hidden_c), ctx.path, accumulate=True)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean", chunk_size: int | None = None,
                         backend: str = "triton") -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, targets) without the full logits.

    hidden [..., H], weight [V, H] (may be tied to an embedding, may have
    requires_grad=False), targets [...]. backend "triton" uses the kernel for the
    loss and gradient of each chunk, "torch" plain torch ops (any device). Under
    autocast both operands are cast to the autocast dtype, as F.linear would do;
    otherwise weight is cast to hidden's dtype if they differ. chunk_size None
    takes default_chunk_size (from the free memory on CUDA); an int pins it.
    Returns an fp32 scalar. No host sync: targets out of range give NaN (module docstring)."""
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
    _check_target_shape(targets, hidden.shape[0])
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)  # autograd carries the gradient back to weight's dtype
    hidden = hidden.contiguous()
    path = _gradient_path(hidden.dtype, hidden.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0], hidden.dtype, backend,
                                        _free_bytes(hidden.device), upcast=path == "fallback")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    _last.update(path=path, chunk_rows=min(chunk_size, hidden.shape[0]), rows=hidden.shape[0])
    if reduction == "none":
        return LinearCrossEntropyPerTokenFunction.apply(hidden, weight, targets, chunk_size, backend, path)
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, reduction, chunk_size, backend,
                                            torch.is_grad_enabled(), path)
