"""What the kernels need to agree with a GPU when they run under TRITON_INTERPRET=1.

The interpreter converts fp32 to bf16 by truncation, where a GPU rounds to the
nearest value. A kernel storing bf16 results asks `round_bf16_first(dtype)`;
when true (interpreter and bf16 output only) it passes the value through
`round_to_bf16` first, so the following cast is exact. On a GPU the branch is a
compile-time False and costs nothing.
"""

import os

import torch
import triton
import triton.language as tl

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def round_bf16_first(dtype: torch.dtype) -> bool:
    return INTERPRETER and dtype == torch.bfloat16


@triton.jit
def round_to_bf16(x):
    """fp32 -> nearest bf16 value (ties to even), still held in fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
