"""Hand-written Triton kernels for the model's hot spots. They hold Triton code
only; the plain-PyTorch math each one replaces is in nanobumble/model/ (layers.py,
lm_loss.py), and the model loads this package only when a run chooses Triton
(model/layers.py: triton_kernels), so nothing else needs Triton installed.

    rmsnorm.py        fused RMSNorm, forward and backward
    rope.py           rotary position embedding of q and k
    cross_entropy.py  loss and gradient of each row of a chunk of logits (for model/lm_loss.py)
    interpreter.py    what the kernels do to match a GPU when run under TRITON_INTERPRET=1

Their output buffers come from base/alloc.py (in tests, POISON_OUTPUTS makes them start as NaN).
"""

from nanobumble.kernels.cross_entropy import cross_entropy_rows
from nanobumble.kernels.rmsnorm import rms_norm
from nanobumble.kernels.rope import apply_rope

__all__ = ["apply_rope", "cross_entropy_rows", "rms_norm"]
