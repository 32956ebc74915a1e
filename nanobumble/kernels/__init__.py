"""Hand-written Triton kernels for the model's hot spots, each beside a plain
PyTorch reference of the same math, and the little they share:

    rmsnorm.py        fused RMSNorm, forward and backward
    rope.py           rotary position embedding of q and k
    cross_entropy.py  linear + cross-entropy a chunk of tokens at a time, without the full logits
    interpreter.py    what the kernels do to match a GPU when run under TRITON_INTERPRET=1
    alloc.py          the kernels' output buffers, and POISON_OUTPUTS (tests: outputs start as NaN)
    __init__.py       IGNORE_INDEX, and resolve_backend: the `kernels` config key -> "triton" or "torch"
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
    """auto: Triton on CUDA when it is installed, else the PyTorch references.
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
