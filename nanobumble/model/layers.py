"""The plain-PyTorch math of the model's hot spots, and the choice of who runs it.

    rms_norm     RMSNorm: x / sqrt(mean(x^2) + eps) * weight, computed in fp32
    rope_cos_sin, apply_rope
                 rotary position embedding: each pair of q/k features turned by
                 an angle that grows with the position
    IGNORE_INDEX the target value every loss skips
    resolve_backend, triton_kernels
                 the `kernels` config key -> "triton" or "torch", and the Triton
                 kernels (nanobumble/kernels/), loaded only when a run chooses them

The Triton kernels compute the same as these functions, faster, on a GPU; their
tests compare both against float64.
"""

from __future__ import annotations

import importlib.util
import os

import torch

# The target value every loss skips, as in PyTorch's and Hugging Face's losses.
IGNORE_INDEX = -100

KERNEL_MODES = ("auto", "triton", "torch")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(mode: str, device: torch.device) -> str:
    """auto: Triton on CUDA when it is installed, else the plain PyTorch math here.
    triton: always Triton (on CPU tensors only through TRITON_INTERPRET=1)."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    if mode == "torch":
        return "torch"
    if mode == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("kernels=triton but the triton package is not installed")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernels=triton on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                           "(set before start); use kernels=auto or torch on CPU")
    return "triton"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in fp32, returned in x's dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each fp32 [batch, seq, head_dim // 2], for (possibly restarting) positions."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    angles = position_ids.float().unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [batch, seq, heads, head_dim] and k (half-rotation layout, as Qwen2):
    with x1, x2 the two halves of x, out = (x1 cos - x2 sin, x2 cos + x1 sin),
    computed in fp32 (float64 for float64 inputs), stored in x's dtype."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        c = cos.unsqueeze(2).to(compute)  # broadcast over heads
        s = sin.unsqueeze(2).to(compute)
        x1, x2 = x.to(compute).chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


_triton_kernels = None


def triton_kernels():
    """The Triton kernels (nanobumble/kernels/), imported on first use: the one place
    the package imports a module late, so that everything else runs without Triton.
    Kept after that, so the forward pass (and torch.compile tracing it) only reads a global."""
    global _triton_kernels
    if _triton_kernels is None:
        import nanobumble.kernels as kernels

        _triton_kernels = kernels
    return _triton_kernels
