"""linear_cross_entropy (nanobumble/kernels/cross_entropy.py) against float64 PyTorch.

First the Triton row kernel at chosen logits: an identity weight makes
linear_cross_entropy's logits exactly the hidden states, so the kernel is fed
through the path the model uses and the gradient of hidden is that of the
logits. Then the chunked LM head + loss itself, with both backends.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (set by conftest), so the
Triton cases keep shapes small; the torch-backend chunked cases can be larger.
Tolerance: error vs float64 <= 2 x the error the PyTorch reference makes in the
same dtype, plus 1e-5 of the largest value (fp32-level math in both).
"""

import pytest
import torch
from conftest import DEVICE
from references import cross_entropy_reference, linear_cross_entropy_reference

import nanobumble.base.alloc as kernel_alloc
import nanobumble.kernels.cross_entropy as ce
import nanobumble.model.lm_loss as lm_loss
from nanobumble.model.layers import IGNORE_INDEX
from nanobumble.model.lm_loss import linear_cross_entropy

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    # every test runs with outputs that start as NaN, so an unwritten element fails
    monkeypatch.setattr(kernel_alloc, "POISON_OUTPUTS", True)
    assert torch.isnan(kernel_alloc.alloc((1,), torch.float32, DEVICE)).all()


def make_targets(n: int, vocab: int, ignore: str, gen_device=DEVICE) -> torch.Tensor:
    t = torch.randint(0, vocab, (n,), device=gen_device)
    if ignore == "some":
        t[::3] = IGNORE_INDEX
    elif ignore == "all":
        t[:] = IGNORE_INDEX
    return t


def assert_close_2x(out: torch.Tensor, ref: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    """|out - ref64| <= 2 |ref - ref64| + 1e-5 max|ref64| + tiny, elementwise maxima."""
    assert not torch.isnan(out).any(), f"{what}: NaN"
    ref64 = ref64.double()
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref.double() - ref64).abs().max().item()
    bound = 2 * ref_err + 1e-5 * ref64.abs().max().item() + 1e-9
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (reference error {ref_err:.3g})"


def leaf(x: torch.Tensor, dtype=None) -> torch.Tensor:
    return x.detach().to(dtype or x.dtype).clone().requires_grad_()


def kernel_ce(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The Triton path at exactly these logits: linear_cross_entropy with hidden = logits and a
    frozen identity weight, whose product (one term times 1, the rest times 0) is exact."""
    identity = torch.eye(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    with torch.no_grad():
        assert torch.equal(logits @ identity.T, logits)
    return linear_cross_entropy(logits, identity, targets, reduction, backend="triton")


def check_ce(logits: torch.Tensor, targets: torch.Tensor, reduction: str, grad_scale: float = 1.0) -> None:
    """Loss and logits gradient of the kernel vs the reference in the same dtype and in float64."""
    x, x_ref, x64 = leaf(logits), leaf(logits), leaf(logits, torch.float64)
    loss = kernel_ce(x, targets, reduction)
    loss_ref = cross_entropy_reference(x_ref, targets, reduction)
    loss64 = cross_entropy_reference(x64, targets, reduction)
    assert loss.dtype == torch.float32 and loss.shape == ()
    (loss * grad_scale).backward()
    (loss_ref * grad_scale).backward()
    (loss64 * grad_scale).backward()
    assert x.grad.dtype == logits.dtype and x.grad.shape == logits.shape
    assert_close_2x(loss, loss_ref, loss64, "loss")
    assert_close_2x(x.grad, x_ref.grad, x64.grad, "grad")


# ------------------------------------------------------------------------- the row kernel at chosen logits

@pytest.mark.parametrize("vocab,rows", [(1, 5), (7, 17), (1000, 17), (5003, 5), (5003, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kernel_matches_float64(vocab, rows, dtype, reduction):
    torch.manual_seed(0)
    logits = (3 * torch.randn(rows, vocab, device=DEVICE)).to(dtype)
    check_ce(logits, make_targets(rows, vocab, "some"), reduction)


@pytest.mark.parametrize("vocab,rows", [(1000, 17), (5003, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_many_blocks(monkeypatch, vocab, rows, dtype):
    """Rows much wider than a block: the running max and sum carry across blocks, with the
    row maximum placed late so that earlier sums must be rescaled."""
    monkeypatch.setattr(ce, "MAX_BLOCK", 128)
    torch.manual_seed(10)
    logits = 4 * torch.randn(rows, vocab, device=DEVICE)
    logits[:, -3] += 20
    check_ce(logits.to(dtype), make_targets(rows, vocab, "some"), "mean")


@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kernel_ignore_patterns(ignore, reduction):
    torch.manual_seed(1)
    logits = torch.randn(17, 1000, device=DEVICE)
    targets = make_targets(17, 1000, ignore)
    check_ce(logits, targets, reduction, grad_scale=2.5)
    if ignore == "all":
        x = leaf(logits)
        loss = kernel_ce(x, targets, reduction)
        loss.backward()
        assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e4), (torch.bfloat16, 1e4), (torch.float16, 3e4)])
@pytest.mark.parametrize("max_block", [8192, 128])
def test_kernel_large_logits(monkeypatch, dtype, scale, max_block):
    monkeypatch.setattr(ce, "MAX_BLOCK", max_block)
    torch.manual_seed(2)
    logits = (scale * torch.rand(17, 1000, device=DEVICE) * 2 - scale).to(dtype)  # in [-scale, scale]
    logits[0, :] = scale  # a row of equal maxima
    logits[1, :] = -scale
    targets = make_targets(17, 1000, "some")
    targets[0] = 5
    targets[1] = 7
    x = leaf(logits)
    loss = kernel_ce(x, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    check_ce(logits, targets, "mean")


def test_kernel_3d():
    torch.manual_seed(3)
    logits = torch.randn(2, 9, 333, device=DEVICE, dtype=torch.bfloat16)
    targets = make_targets(18, 333, "some").view(2, 9)
    check_ce(logits, targets, "sum")


@pytest.mark.parametrize("bad", [1000, -1, -101, 5000])
def test_bad_target_raises_in_the_reference_and_is_nan_in_the_loss(bad):
    """The loss does not check target ranges (no host sync: rows are checked where they are made);
    an out-of-range target gives a NaN loss and NaN gradients instead of a wrong number."""
    logits = torch.randn(4, 1000, device=DEVICE, requires_grad=True)
    targets = torch.tensor([1, bad, IGNORE_INDEX, 3], device=DEVICE)
    with pytest.raises(ValueError, match="outside"):
        cross_entropy_reference(logits, targets)
    for backend in ("torch", "triton"):
        hidden = torch.randn(4, 16, device=DEVICE, requires_grad=True)
        weight = torch.randn(1000, 16, device=DEVICE, requires_grad=True)
        loss = linear_cross_entropy(hidden, weight, targets, backend=backend)
        loss.backward()
        assert torch.isnan(loss) and torch.isnan(hidden.grad).all() and torch.isnan(weight.grad).all()


def test_bad_arguments_raise():
    hidden, weight = torch.randn(4, 8, device=DEVICE), torch.randn(10, 8, device=DEVICE)
    targets = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="avg")
    with pytest.raises(ValueError, match="3 targets for 4 rows"):
        linear_cross_entropy(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), targets.cpu(), backend="cuda")


# ------------------------------------------------------------------------------------ linear_cross_entropy

def check_linear_ce(hidden, weight, targets, reduction, chunk_size, backend, weight_grad=True):
    h, h_ref, h64 = leaf(hidden), leaf(hidden), leaf(hidden, torch.float64)
    w, w_ref, w64 = (leaf(weight), leaf(weight), leaf(weight, torch.float64))
    for t in (w, w_ref, w64):
        t.requires_grad_(weight_grad)
    loss = linear_cross_entropy(h, w, targets, reduction, chunk_size=chunk_size, backend=backend)
    loss_ref = linear_cross_entropy_reference(h_ref, w_ref, targets, reduction)
    loss64 = linear_cross_entropy_reference(h64, w64, targets, reduction)
    for t in (loss, loss_ref, loss64):
        (1.5 * t).backward()
    assert loss.dtype == torch.float32
    assert_close_2x(loss, loss_ref, loss64, "loss")
    assert h.grad.dtype == hidden.dtype
    assert_close_2x(h.grad, h_ref.grad, h64.grad, "grad hidden")
    if weight_grad:
        assert w.grad.dtype == weight.dtype
        assert_close_2x(w.grad, w_ref.grad, w64.grad, "grad weight")
    else:
        assert w.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [7, None])
def test_linear_cross_entropy_triton(monkeypatch, dtype, reduction, chunk_size):
    monkeypatch.setattr(ce, "MAX_BLOCK", 64)  # 257 columns: five blocks, the last one 1 wide
    torch.manual_seed(5)
    hidden = torch.randn(17, 48, device=DEVICE).to(dtype)
    weight = (0.2 * torch.randn(257, 48, device=DEVICE)).to(dtype)
    check_linear_ce(hidden, weight, make_targets(17, 257, "some"), reduction, chunk_size, "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
def test_linear_cross_entropy_torch(dtype, reduction, ignore):
    torch.manual_seed(6)
    hidden = torch.randn(300, 123, device=DEVICE).to(dtype)
    weight = (0.1 * torch.randn(5003, 123, device=DEVICE)).to(dtype)
    check_linear_ce(hidden, weight, make_targets(300, 5003, ignore), reduction, 64, "torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_cross_entropy_frozen_weight(backend):
    torch.manual_seed(7)
    hidden = torch.randn(17, 32, device=DEVICE)
    weight = torch.randn(100, 32, device=DEVICE)
    check_linear_ce(hidden, weight, make_targets(17, 100, "some"), "mean", 5, backend, weight_grad=False)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_cross_entropy_tied_weight(backend):
    """The LM head shares its weight with the embedding: both gradients add up."""
    torch.manual_seed(8)
    vocab, width, n = 211, 40, 23
    ids = torch.randint(0, vocab, (n,), device=DEVICE)
    targets = make_targets(n, vocab, "some")
    mix = torch.randn(width, width, device=DEVICE) / width**0.5
    weight0 = torch.randn(vocab, width, device=DEVICE)

    def run(weight, fn):
        hidden = torch.tanh(torch.nn.functional.embedding(ids, weight) @ mix.to(weight.dtype))
        loss = fn(hidden, weight)
        loss.backward()
        return loss, weight.grad

    w, w64 = leaf(weight0), leaf(weight0, torch.float64)
    loss, grad = run(w, lambda h, w_: linear_cross_entropy(h, w_, targets, chunk_size=6, backend=backend))
    loss64, grad64 = run(w64, lambda h, w_: linear_cross_entropy_reference(h, w_, targets))
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_autocast_and_3d():
    """Under autocast the matmuls run in the autocast dtype, as F.linear would; fp32 master
    weights get fp32 gradients."""
    torch.manual_seed(9)
    hidden = torch.randn(3, 20, 64, device=DEVICE, requires_grad=True)
    weight = (0.1 * torch.randn(777, 64, device=DEVICE)).requires_grad_()
    targets = make_targets(60, 777, "some").view(3, 20)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=16, backend="torch")
    loss.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    h64, w64 = leaf(hidden, torch.float64), leaf(weight, torch.float64)
    loss64 = linear_cross_entropy_reference(h64.view(60, 64), w64, targets)
    loss64.backward()
    # bf16 matmuls: a loose check that the right thing was computed
    torch.testing.assert_close(loss.double(), loss64, rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=5e-2, atol=2e-4)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=5e-2, atol=2e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_cross_entropy_no_grad_and_double_backward(backend):
    torch.manual_seed(4)
    hidden = torch.randn(5, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(30, 8, device=DEVICE, requires_grad=True)
    targets = make_targets(5, 30, "none")
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, backend=backend)
    torch.testing.assert_close(loss, linear_cross_entropy_reference(hidden.detach(), weight.detach(), targets))
    loss = linear_cross_entropy(hidden, weight, targets, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_default_chunk_size_counts_the_real_element_size():
    assert lm_loss.default_chunk_size(8192, 151_936) == 384  # fp32: 4 bytes a logit
    assert lm_loss.default_chunk_size(8192, 151_936, torch.bfloat16) == 832  # bf16: 2 bytes, twice the rows
    assert lm_loss.default_chunk_size(8192, 151_936, torch.bfloat16, "torch") == 256  # + the fp32 working copy
    assert lm_loss.default_chunk_size(8192, 32_000) == 2048
    assert lm_loss.default_chunk_size(100, 151_936) == 100
    assert lm_loss.default_chunk_size(10**6, 10**7) == 256


# --- reduction="none": per-token losses with a gradient for any weighting ---------------------------

def per_token_reference(hidden, weight, targets):
    """Materialised logits, per-token cross-entropy in fp32 (float64 stays float64), 0 where ignored."""
    logits = hidden @ weight.T
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    losses = torch.nn.functional.cross_entropy(logits.to(compute), targets, reduction="none",
                                               ignore_index=IGNORE_INDEX)
    return losses, logits.to(compute).mean(-1)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.bfloat16),
                                           ("triton", torch.float32), ("triton", torch.bfloat16)])
def test_linear_cross_entropy_per_token(backend, dtype):
    torch.manual_seed(10)
    n, width, vocab = (40, 24, 300) if backend == "triton" else (300, 64, 3001)
    hidden0, weight0 = torch.randn(n, width, device=DEVICE), 0.2 * torch.randn(vocab, width, device=DEVICE)
    targets = make_targets(n, vocab, "some")
    weights = torch.randn(n, device=DEVICE)  # an arbitrary weighting of the tokens, as DPO's is
    outs = {}
    for name, fn, cast in [
            ("out", lambda h, w: linear_cross_entropy(h, w, targets, "none", chunk_size=16, backend=backend), dtype),
            ("ref", lambda h, w: per_token_reference(h, w, targets), dtype),
            ("64", lambda h, w: per_token_reference(h, w, targets), torch.float64)]:
        h, w = leaf(hidden0, cast), leaf(weight0, cast)
        losses, mean_logits = fn(h, w)
        (losses * weights.to(losses.dtype)).sum().backward()
        outs[name] = (losses.detach(), mean_logits, h.grad, w.grad)
    out, ref, ref64 = outs["out"], outs["ref"], outs["64"]
    assert out[0].dtype == torch.float32 and out[0].shape == (n,)
    assert torch.all(out[0][targets == IGNORE_INDEX] == 0)
    for i, what in enumerate(["losses", "mean logits", "grad hidden", "grad weight"]):
        assert out[i].dtype == ref[i].dtype, what
        assert_close_2x(out[i], ref[i], ref64[i], what)


def test_linear_cross_entropy_per_token_bad_target_is_nan():
    losses, _ = linear_cross_entropy(torch.randn(3, 8), torch.randn(10, 8), torch.tensor([1, 10, 2]), "none",
                                     backend="torch")
    assert torch.isnan(losses[1]) and torch.isfinite(losses[[0, 2]]).all()
