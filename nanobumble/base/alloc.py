"""Output buffers that a kernel or a chunked loop fills: `alloc` and `alloc_like`, and
the POISON_OUTPUTS switch (used by nanobumble/kernels/ and model/lm_loss.py).

Tests set POISON_OUTPUTS = True (here, the one place it is read) so that outputs start
as NaN: an element a kernel (or a chunk loop) forgets to write then fails the comparison instead of
passing by luck. Otherwise the buffers are uninitialised, as torch.empty leaves them.
"""

from __future__ import annotations

import torch

POISON_OUTPUTS = False


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new contiguous tensor for a kernel to fill (all NaN when POISON_OUTPUTS)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def alloc_like(x: torch.Tensor) -> torch.Tensor:
    """alloc with x's shape, dtype and device (contiguous, whatever x's strides)."""
    return alloc(tuple(x.shape), x.dtype, x.device)
