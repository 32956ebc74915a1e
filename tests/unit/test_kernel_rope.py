"""Rotary embedding kernel vs a float64 computation, forward and backward.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (set by conftest), so shapes
stay small: one program per token, at most a few dozen tokens per launch.
"""

import pytest
import torch
from conftest import DEVICE

import nanobumble.base.alloc as kernel_alloc
from nanobumble.kernels.rope import apply_rope
from nanobumble.model.layers import apply_rope as apply_rope_reference
from nanobumble.model.layers import rope_cos_sin

THETA = 1_000_000.0


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    # Outputs start as NaN: an element the kernel does not write fails the comparison.
    monkeypatch.setattr(kernel_alloc, "POISON_OUTPUTS", True)
    assert torch.isnan(kernel_alloc.alloc((1,), torch.float32, DEVICE)).all()


def positions(batch: int, seq: int, kind: str) -> torch.Tensor:
    if kind == "plain":
        return torch.arange(seq).repeat(batch, 1)
    if kind == "packed":  # several documents in one row: positions restart
        pos = torch.arange(seq)
        pos[seq // 3:] -= seq // 3
        pos[2 * seq // 3:] -= pos[2 * seq // 3].clone()
        return pos.repeat(batch, 1)
    if kind == "large":
        return torch.randint(0, 2_000_000, (batch, seq))
    raise ValueError(kind)


def make_inputs(batch, seq, heads, head_dim, dtype, kind="plain"):
    num_q, num_k = heads
    cos, sin = rope_cos_sin(positions(batch, seq, kind).to(DEVICE), head_dim, THETA)
    q = torch.randn(batch, seq, num_q, head_dim, device=DEVICE).to(dtype)
    k = torch.randn(batch, seq, num_k, head_dim, device=DEVICE).to(dtype)
    return q, k, cos, sin


def run_with_grad(fn, q, k, cos, sin, dq_out, dk_out):
    """Outputs of fn(q, k, cos, sin) and the gradients of sum(out * d_out) w.r.t. q and k."""
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_out, k_out = fn(q, k, cos, sin)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
    return q_out.detach(), k_out.detach(), dq, dk


def float64_results(q, k, cos, sin, dq_out, dk_out):
    d = lambda t: t.detach().to(torch.float64)
    return run_with_grad(apply_rope_reference, d(q), d(k), d(cos), d(sin), d(dq_out), d(dk_out))


def max_err(x, ref):
    assert not torch.isnan(x).any(), "NaN in output: an element was not written"
    return (x.to(torch.float64) - ref).abs().max().item()


@pytest.mark.parametrize("head_dim", [8, 64, 128])
@pytest.mark.parametrize("heads", [(1, 1), (6, 2), (12, 2)])
@pytest.mark.parametrize("seq", [1, 7, 33])
def test_fp32_forward_backward(head_dim, heads, seq):
    torch.manual_seed(seq * 1000 + head_dim + heads[0])
    batch = 2 if seq < 33 else 1
    kind = {1: "large", 7: "packed", 33: "packed"}[seq]
    q, k, cos, sin = make_inputs(batch, seq, heads, head_dim, torch.float32, kind)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    got = run_with_grad(apply_rope, q, k, cos, sin, dq_out, dk_out)
    want = float64_results(q, k, cos, sin, dq_out, dk_out)
    for name, g, w in zip(("q", "k", "dq", "dk"), got, want):
        assert g.shape == w.shape and g.dtype == torch.float32, name
        assert g.is_contiguous(), name
        assert max_err(g, w) <= 1e-5 * max(1.0, w.abs().max().item()), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,heads,seq,kind", [(128, (12, 2), 7, "packed"), (64, (6, 2), 33, "large"),
                                                    (8, (1, 1), 1, "plain")])
def test_low_precision_within_twice_reference_error(dtype, head_dim, heads, seq, kind):
    torch.manual_seed(7)
    q, k, cos, sin = make_inputs(2, seq, heads, head_dim, dtype, kind)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    got = run_with_grad(apply_rope, q, k, cos, sin, dq_out, dk_out)
    ref = run_with_grad(apply_rope_reference, q, k, cos, sin, dq_out, dk_out)  # same dtype
    want = float64_results(q, k, cos, sin, dq_out, dk_out)
    for name, g, r, w in zip(("q", "k", "dq", "dk"), got, ref, want):
        assert g.dtype == dtype, name
        assert max_err(g, w) <= 2 * max_err(r, w) + 1e-6, name


def test_non_contiguous_inputs_and_gradients():
    torch.manual_seed(1)
    batch, seq, num_q, num_k, head_dim = 2, 5, 6, 2, 16
    # q and k as slices of a fused projection, as a model with one qkv matmul would make them
    qkv = torch.randn(batch, seq, (num_q + 2 * num_k) * head_dim, device=DEVICE)
    q = qkv[..., : num_q * head_dim].view(batch, seq, num_q, head_dim)
    k = qkv[..., num_q * head_dim: (num_q + num_k) * head_dim].view(batch, seq, num_k, head_dim)
    # cos/sin shared by the whole batch through a stride-0 expand
    cos, sin = rope_cos_sin(positions(1, seq, "packed").to(DEVICE), head_dim, THETA)
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
    # incoming gradients laid out [B, H, T, D] and transposed, i.e. non-contiguous
    dq_out = torch.randn(batch, num_q, seq, head_dim, device=DEVICE).transpose(1, 2)
    dk_out = torch.randn(batch, num_k, seq, head_dim, device=DEVICE).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or dq_out.is_contiguous() or cos.is_contiguous())
    got = run_with_grad(apply_rope, q, k, cos, sin, dq_out, dk_out)
    want = float64_results(q, k, cos, sin, dq_out, dk_out)
    for g, w in zip(got, want):
        assert max_err(g, w) <= 1e-5

    # stride along head_dim other than 1 (every other element of a wider tensor)
    wide = torch.randn(batch, seq, num_q, 2 * head_dim, device=DEVICE)
    q_strided = wide[..., ::2]
    q_out, k_out = apply_rope(q_strided, k, cos, sin)
    q_ref, k_ref = apply_rope_reference(q_strided.double(), k.double(), cos.double(), sin.double())
    assert max_err(q_out, q_ref) <= 1e-5 and max_err(k_out, k_ref) <= 1e-5


def test_packed_row_matches_documents_rotated_alone():
    # A row holding two documents gives each the rotation it would get on its own row.
    torch.manual_seed(2)
    head_dim, lengths = 32, (5, 4)
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(DEVICE)
    q, k, _, _ = make_inputs(1, sum(lengths), (6, 2), head_dim, torch.float32)
    q_out, k_out = apply_rope(q, k, *rope_cos_sin(pos, head_dim, THETA))
    start = 0
    for n in lengths:
        alone = torch.arange(n)[None].to(DEVICE)
        q_doc, k_doc = apply_rope(q[:, start:start + n], k[:, start:start + n], *rope_cos_sin(alone, head_dim, THETA))
        torch.testing.assert_close(q_out[:, start:start + n], q_doc, rtol=0, atol=0)
        torch.testing.assert_close(k_out[:, start:start + n], k_doc, rtol=0, atol=0)
        start += n


def test_rotation_preserves_norm_and_inverts():
    torch.manual_seed(3)
    q, k, cos, sin = make_inputs(2, 9, (12, 2), 64, torch.float32, "large")
    q_out, k_out = apply_rope(q, k, cos, sin)
    torch.testing.assert_close(q_out.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_out.norm(dim=-1), k.norm(dim=-1), rtol=1e-5, atol=1e-5)
    # rotating back by the opposite angle recovers the input
    q_back, k_back = apply_rope(q_out, k_out, cos, -sin)
    torch.testing.assert_close(q_back, q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_back, k, rtol=1e-5, atol=1e-5)
    # position 0 is the identity
    zero = torch.zeros(1, 3, dtype=torch.long, device=DEVICE)
    q0, k0 = apply_rope(q[:1, :3], k[:1, :3], *rope_cos_sin(zero, 64, THETA))
    torch.testing.assert_close(q0, q[:1, :3], rtol=0, atol=0)


def test_backward_is_the_inverse_rotation():
    torch.manual_seed(4)
    q, k, cos, sin = make_inputs(1, 6, (6, 2), 32, torch.float32, "packed")
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    _, _, dq, dk = run_with_grad(apply_rope, q, k, cos, sin, dq_out, dk_out)
    dq_inv, dk_inv = apply_rope(dq_out, dk_out, cos, -sin)
    torch.testing.assert_close(dq, dq_inv, rtol=0, atol=0)
    torch.testing.assert_close(dk, dk_inv, rtol=0, atol=0)


def test_rope_cos_sin():
    head_dim, pos = 16, torch.tensor([[0, 1, 2, 0, 1], [5, 6, 7, 8, 9]])
    cos, sin = rope_cos_sin(pos.to(DEVICE), head_dim, 10_000.0)
    assert cos.shape == sin.shape == (2, 5, head_dim // 2) and cos.dtype == sin.dtype == torch.float32
    inv_freq = 1.0 / 10_000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = pos.double()[..., None] * inv_freq
    torch.testing.assert_close(cos.cpu().double(), angles.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.cpu().double(), angles.sin(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        rope_cos_sin(pos, 15, 10_000.0)


def test_bad_shapes_are_errors():
    q, k, cos, sin = make_inputs(1, 3, (6, 2), 16, torch.float32)
    with pytest.raises(ValueError, match="k shape"):
        apply_rope(q, k[..., :8], cos, sin)
    with pytest.raises(ValueError, match="cos and sin"):
        apply_rope(q, k, cos[..., :4], sin[..., :4])
    with pytest.raises(ValueError, match="float32"):
        apply_rope(q, k, cos.half(), sin.half())
    with pytest.raises(ValueError, match="dtype"):
        apply_rope(q, k.half(), cos, sin)
