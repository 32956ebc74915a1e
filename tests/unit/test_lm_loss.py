"""The LM head's gradients, chunking, paths and host syncs (model/lm_loss.py, issue 25 item 5).

- bf16 gradients are rounded once: grad_hidden (and grad_weight) equal the float64
  product of the same bf16 (softmax - onehot) chunk, scaled, within half a bf16 ulp
  (plus fp32-sum noise), where two roundings reach a whole ulp.
- loss and both gradients against float64 PyTorch in fp32 and bf16.
- the chunk is sized from the free memory (mocked here) and pinned by chunk_size.
- no host sync (no aten._local_scalar_dense / is_nonzero / item / nonzero) in forward or backward.
- the gradient path is named once in the log and readable through lm_loss.lm_head_path().
On CPU the Triton kernel runs under TRITON_INTERPRET=1 (conftest), at small shapes.
"""

import pytest
import torch
from conftest import DEVICE
from references import linear_cross_entropy_reference
from torch.utils._python_dispatch import TorchDispatchMode

import nanobumble.model.lm_loss as lm_loss
from nanobumble.model.layers import IGNORE_INDEX, triton_kernels
from nanobumble.model.lm_loss import linear_cross_entropy

BACKENDS = ["torch", "triton"]


def make_inputs(n, width, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, width, generator=g).to(DEVICE, dtype)
    weight = (0.3 * torch.randn(vocab, width, generator=g)).to(DEVICE, dtype)
    targets = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    targets[::3] = IGNORE_INDEX  # n_valid not a power of two: 1/n_valid is not exact in bf16
    return hidden, weight, targets


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 significant bits), in float64."""
    x = x.double().abs().clamp(min=2.0**-126)
    return torch.exp2(torch.floor(torch.log2(x)) - 7)


def grad_logits_as_the_loss_makes_them(hidden, weight, targets, backend, scale=None):
    """The bf16 (softmax - onehot) [* scale] of one chunk, by the same calls the loss makes."""
    logits = hidden @ weight.T
    scale = torch.ones((), dtype=torch.float32, device=hidden.device) if scale is None else scale
    if backend == "triton":
        triton_kernels().cross_entropy_rows(logits, targets, scale, logits, IGNORE_INDEX)
    else:
        lm_loss._rows_torch(logits, targets, scale, True)
    return logits


def assert_rounded_once(out: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, what: str) -> None:
    """|out - exact| <= half a bf16 ulp of exact (one correct rounding), plus 2^-20 of the sum of
    the products' magnitudes (fp32 summation noise, far below a bf16 ulp)."""
    err = (out.double() - exact).abs()
    bound = 0.5 * bf16_ulp(exact) + 2.0**-20 * magnitude
    worst = (err / bound).max().item()
    over = (err > bound).sum().item()
    assert over == 0, (f"{what}: {over} of {err.numel()} elements are off by more than half a bf16 ulp "
                       f"(worst {worst:.2f} x the bound): rounded more than once")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_gradients_are_rounded_once(backend):
    """grad_hidden and grad_weight of a bf16 LM head vs the float64 GEMM of the very bf16 gradient
    of the logits the loss computes (one chunk, so the same logits), times 1.5 / n_valid."""
    n, width, vocab = (48, 64, 200) if backend == "triton" else (96, 128, 3000)
    hidden, weight, targets = make_inputs(n, width, vocab, torch.bfloat16, seed=1)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, chunk_size=n, backend=backend)
    (1.5 * loss).backward()

    g = grad_logits_as_the_loss_makes_them(hidden, weight, targets, backend).double()
    factor = 1.5 / (targets != IGNORE_INDEX).sum().item()
    assert_rounded_once(h.grad, (g @ weight.double()) * factor, g.abs() @ weight.double().abs() * factor,
                        "grad_hidden")
    assert_rounded_once(w.grad, (g.T @ hidden.double()) * factor, g.abs().T @ hidden.double().abs() * factor,
                        "grad_weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_per_token_grad_hidden_is_rounded_once(backend):
    """reduction="none" (DPO): each chunk's grad_hidden is an fp32 sum rounded once."""
    n, width, vocab = (32, 64, 200) if backend == "triton" else (64, 128, 3000)
    hidden, weight, targets = make_inputs(n, width, vocab, torch.bfloat16, seed=2)
    weights = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    h = hidden.clone().requires_grad_()
    losses, _ = linear_cross_entropy(h, weight, targets, "none", chunk_size=n, backend=backend)
    (losses * weights).sum().backward()

    g = grad_logits_as_the_loss_makes_them(hidden, weight, targets, backend, scale=weights.float()).double()
    assert_rounded_once(h.grad, g @ weight.double(), g.abs() @ weight.double().abs(), "grad_hidden (none)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_against_float64(backend, dtype):
    """Loss, grad_hidden and grad_weight against float64 PyTorch on the same (rounded) inputs,
    over several chunks: fp32 to fp32 precision; bf16 within what bf16 logits allow."""
    n, width, vocab = (40, 32, 300) if backend == "triton" else (200, 64, 3001)
    hidden, weight, targets = make_inputs(n, width, vocab, dtype, seed=4)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, chunk_size=16, backend=backend)
    loss64 = linear_cross_entropy_reference(h64, w64, targets)
    (2.0 * loss).backward()
    (2.0 * loss64).backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == dtype and w.grad.dtype == dtype
    # bf16: the logits themselves are bf16 (as the model computes them), a relative 2^-9 each
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double(), loss64.detach(), rtol=rtol, atol=0)
    for got, ref, what in [(h.grad, h64.grad, "grad_hidden"), (w.grad, w64.grad, "grad_weight")]:
        err = (got.double() - ref).abs().max().item()
        assert err <= rtol * ref.abs().max().item(), f"{what}: error {err:.3g}"


def test_chunk_size_from_free_memory(monkeypatch):
    """CUDA sizes the chunk from the free memory; here the figure is mocked."""
    vocab, row_bytes = 151_936, 2 * 151_936  # bf16 logits
    assert lm_loss.default_chunk_size(16384, vocab, torch.bfloat16) == 832  # the floor: 256 MiB of logits
    # half of the free memory, at most 4 GiB, in power-of-two multiples of the floor
    assert lm_loss.default_chunk_size(16384, vocab, torch.bfloat16, free_bytes=2 * 2**30) == 3328
    assert lm_loss.default_chunk_size(16384, vocab, torch.bfloat16, free_bytes=80 * 2**30) == 13312
    assert 13312 * row_bytes <= 4 * 2**30 < 2 * 13312 * row_bytes
    assert lm_loss.default_chunk_size(8192, vocab, torch.bfloat16, free_bytes=80 * 2**30) == 8192  # the whole batch
    assert lm_loss.default_chunk_size(16384, vocab, torch.bfloat16, free_bytes=2**20) == 832  # never below the floor
    # the fallback path's fp32 copy of the chunk: 6 bytes a logit, and a floor of 256 rows
    assert lm_loss.default_chunk_size(16384, vocab, torch.bfloat16, free_bytes=2 * 2**30, upcast=True) == 1024

    # Through linear_cross_entropy: a floor of 64 rows, and free memory for 4 x 64 rows' logits
    vocab, n = 1000, 1000
    monkeypatch.setattr(lm_loss, "_CHUNK_BYTES", 64 * 4 * vocab)
    monkeypatch.setattr(lm_loss, "_MIN_CHUNK_ROWS", 64)
    seen = []
    monkeypatch.setattr(lm_loss, "_free_bytes", lambda device: seen.append(device) or 2 * 4 * (64 * 4 * vocab))
    hidden, weight, targets = make_inputs(n, 16, vocab, torch.float32)
    loss = linear_cross_entropy(hidden, weight, targets, backend="torch")
    assert seen and lm_loss.lm_head_info() == {"path": "fp32", "chunk_rows": 256, "rows": n}
    pinned = linear_cross_entropy(hidden, weight, targets, chunk_size=100, backend="torch")
    assert lm_loss.lm_head_info()["chunk_rows"] == 100
    torch.testing.assert_close(loss, pinned)


def test_cpu_chunks_are_fixed():
    assert lm_loss._free_bytes(torch.device("cpu")) is None


SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero", "equal", "masked_select"}


class RecordSyncs(TorchDispatchMode):
    """Records every op that needs a value on the host (a device sync on CUDA)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_sync(backend, dtype, reduction):
    hidden, weight, targets = make_inputs(24, 16, 100, dtype)
    linear_cross_entropy(hidden, weight, targets, reduction, backend=backend)  # one-time probes, outside
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with RecordSyncs() as mode:
        out = linear_cross_entropy(h, w, targets, reduction, chunk_size=10, backend=backend)
        loss = out if reduction == "mean" else out[0].sum()
        loss.backward()
    assert h.grad is not None and w.grad is not None
    assert mode.syncs == [], f"host syncs in the LM loss: {mode.syncs}"


def test_the_path_is_named_once(monkeypatch, capsys):
    monkeypatch.setattr(lm_loss, "_said", set())
    hidden, weight, targets = make_inputs(8, 16, 50, torch.float32)
    linear_cross_entropy(hidden, weight, targets, backend="torch")
    assert lm_loss.lm_head_path() == "fp32" and capsys.readouterr().out == ""  # fp32: nothing to say

    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    refused = lm_loss._fp32_out_refused(DEVICE, torch.bfloat16)  # CPU builds of torch: refused
    for _ in range(3):
        linear_cross_entropy(hidden, weight, targets, backend="torch")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("LM head: bfloat16"), lines
    assert lm_loss.lm_head_path() == ("fallback" if refused else "out_dtype")
    if refused:
        assert f"refused on {DEVICE.type}" in lines[0] and "fp32 copies" in lines[0]

    # a refusal (an older PyTorch on CUDA, here mocked) is named once, with its reason
    monkeypatch.setattr(lm_loss, "_fp32_out_refused", lambda device, dtype: "mocked refusal")
    for _ in range(2):
        linear_cross_entropy(hidden.half(), weight.half(), targets, backend="torch")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "float16" in lines[0] and "mocked refusal" in lines[0], lines
    assert lm_loss.lm_head_path() == "fallback"


def test_fp32_out_probe_on_cpu():
    """This CPU build refuses out_dtype (a reason comes back); a build that takes it would give None."""
    why = lm_loss._fp32_out_refused(torch.device("cpu"), torch.bfloat16)
    assert why is None or isinstance(why, str)
    if why is not None:
        assert "Error" in why


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_out_of_range_target_gives_nan_not_a_number(backend, reduction):
    """Targets are checked where rows are made; one that slips through still makes no silent
    loss: NaN (the row's, for "none"), and NaN gradients, without a host sync."""
    hidden, weight, targets = make_inputs(6, 8, 40, torch.float32)
    targets[1], targets[4] = 40, -7
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_cross_entropy(h, w, targets, reduction, chunk_size=4, backend=backend)
    if reduction == "mean":
        assert torch.isnan(out)
        out.backward()
        assert torch.isnan(h.grad).all() and torch.isnan(w.grad).all()
    else:
        losses = out[0]
        assert torch.isnan(losses[[1, 4]]).all() and torch.isfinite(losses[[0, 2, 3, 5]]).all()
        losses.sum().backward()
        assert torch.isnan(h.grad[[1, 4]]).all() and torch.isfinite(h.grad[[0, 2, 3, 5]]).all()
