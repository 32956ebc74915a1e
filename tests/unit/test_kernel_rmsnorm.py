"""Fused RMSNorm (nanobumble/kernels/rmsnorm.py) against a float64 computation.

Forward y and backward dx, dw. In fp32 the kernel must be close to float64; in
bf16/fp16 its error may be at most twice the error the PyTorch reference makes
in the same dtype. Outputs are poisoned with NaN so a skipped element fails.
"""

import pytest
import torch
from conftest import DEVICE

import nanobumble.base.alloc as kernel_alloc
import nanobumble.kernels.rmsnorm as rmsnorm_kernel
from nanobumble.kernels.rmsnorm import RMSNormFunction, rms_norm
from nanobumble.model.layers import rms_norm as rms_norm_reference


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(kernel_alloc, "POISON_OUTPUTS", True)
    assert torch.isnan(kernel_alloc.alloc((1,), torch.float32, DEVICE)).all()


def float64_rms_norm(x, weight, eps):
    x64, w64 = x.double(), weight.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64


def forward_backward(fn, x, weight, dy, eps):
    """y, dx, dw of fn(x, weight, eps) with upstream gradient dy."""
    x = x.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    y = fn(x, weight, eps)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, weight.grad


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check_against_float64(x, weight, eps, dy=None, fn=rms_norm):
    """Kernel error vs float64 <= 2 x (reference error in the same dtypes) + a small fp32-level slack."""
    if dy is None:
        dy = torch.randn(x.shape, device=x.device).to(x.dtype)
    got = forward_backward(fn, x, weight, dy, eps)
    ref = forward_backward(rms_norm_reference, x, weight, dy, eps)
    exact = forward_backward(float64_rms_norm, x.double(), weight.double(), dy.double(), eps)
    for name, g, r, e, dtype in zip(("y", "dx", "dw"), got, ref, exact, (x.dtype, x.dtype, weight.dtype)):
        assert r.dtype == dtype and e.dtype == torch.float64
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected {dtype}"
        assert g.shape == e.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(e.shape)}"
        assert not torch.isnan(g).any(), f"{name}: NaN (an element was not written)"
        tol = 2 * max_err(r, e) + 1e-5 * max(1.0, e.abs().max().item())
        err = max_err(g, e)
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g} (reference error {max_err(r, e):.3g})"


@pytest.mark.parametrize("hidden", [1, 123, 128, 1000])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_fp32(hidden, rows):
    torch.manual_seed(hidden * 100 + rows)
    x = torch.randn(rows, hidden, device=DEVICE)
    weight = torch.randn(hidden, device=DEVICE)
    check_against_float64(x, weight, 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [1, 123, 128, 1000])
def test_half_dtypes(dtype, hidden):
    torch.manual_seed(hidden)
    x = (3 * torch.randn(2, 7, hidden, device=DEVICE)).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    check_against_float64(x, weight, 1e-6)


@pytest.mark.parametrize("hidden", [123, 1000])
def test_bf16_activations_fp32_weight(hidden):
    """The model's mixed precision: y and dx in bf16, dw in fp32."""
    torch.manual_seed(hidden)
    x = torch.randn(3, 11, hidden, device=DEVICE).to(torch.bfloat16)
    weight = 1 + 0.1 * torch.randn(hidden, device=DEVICE)
    check_against_float64(x, weight, 1e-6)


@pytest.mark.parametrize("eps", [1e-6, 0.5, 10.0])
def test_eps_honoured(eps):
    torch.manual_seed(0)
    x = 0.3 * torch.randn(5, 123, device=DEVICE)  # small x so that eps matters
    weight = torch.randn(123, device=DEVICE)
    check_against_float64(x, weight, eps)
    y_small, y_big = rms_norm(x, weight, eps), rms_norm(x, weight, 100 * eps)
    assert max_err(y_small, y_big) > 1e-3


def test_3d_and_non_contiguous_input():
    torch.manual_seed(1)
    base = torch.randn(123, 4, 5, device=DEVICE)
    x = base.permute(1, 2, 0)  # [4, 5, 123], last dim strided
    assert not x.is_contiguous()
    weight = torch.randn(123, device=DEVICE)
    dy = torch.randn(4, 5, 123, device=DEVICE).transpose(0, 1).contiguous().transpose(0, 1)  # strided dy too
    check_against_float64(x, weight, 1e-6, dy=dy)


@pytest.mark.parametrize("rows,programs", [(33, 4), (33, 5), (7, 3), (10, 4), (33, 33), (7, 100)])
def test_dw_programs_not_dividing_rows(monkeypatch, rows, programs):
    """The weight gradient's partial rows, split over a number of programs that does not divide the rows."""
    monkeypatch.setattr(rmsnorm_kernel, "_dw_programs", lambda n_rows, device: programs)
    torch.manual_seed(rows * 1000 + programs)
    x = torch.randn(rows, 123, device=DEVICE)
    weight = torch.randn(123, device=DEVICE)
    check_against_float64(x, weight, 1e-6)


def test_saves_only_x_weight_rstd():
    """The backward recomputes x*rstd: no saved tensor other than x itself has x's size."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(128, device=DEVICE, requires_grad=True)
    y = rms_norm(x, weight, 1e-6)
    saved = y.grad_fn.saved_tensors
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), [tuple(t.shape) for t in saved]
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(18, 128), (128,), (18,)])
    rstd = next(t for t in saved if t.shape == (18,))
    assert rstd.dtype == torch.float32


def test_empty_and_bad_weight():
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(16, device=DEVICE, requires_grad=True)
    y = rms_norm(x, weight, 1e-6)
    y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 16)
    assert torch.equal(weight.grad, torch.zeros(16, device=DEVICE))
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(torch.randn(2, 16, device=DEVICE), torch.randn(15, device=DEVICE), 1e-6)


def test_function_apply_matches_entry_point():
    torch.manual_seed(0)
    x = torch.randn(3, 64, device=DEVICE)
    weight = torch.randn(64, device=DEVICE)
    assert torch.equal(RMSNormFunction.apply(x, weight, 1e-6), rms_norm(x, weight, 1e-6))


def test_wide_rows():
    torch.manual_seed(2)
    x = torch.randn(3, 5000, device=DEVICE).to(torch.bfloat16)
    weight = 1 + 0.1 * torch.randn(5000, device=DEVICE)
    check_against_float64(x, weight, 1e-6)


def test_reference_is_the_model_rmsnorm():
    from nanobumble.model.transformer import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 5, 96).to(torch.bfloat16)
    assert torch.equal(norm(x), rms_norm_reference(x, norm.weight, 1e-5))
