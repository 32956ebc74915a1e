import os

import torch

# Without a GPU the Triton kernels run on CPU tensors through the interpreter;
# this must be set before any kernel is defined, i.e. before nanobumble/kernels/ is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# precision auto is bf16 on a CPU with native bf16 (base/cpu.py), so the same test would compare bf16
# numbers on one machine and fp32 on another. The suite runs as a CPU without it (subprocesses inherit
# this) unless the variable is set: NANOBUMBLE_CPU_BF16=1 pytest ... runs it as an AMX CPU's default
# would. tests/unit/test_cpu_precision.py reaches both branches whatever is set here.
os.environ.setdefault("NANOBUMBLE_CPU_BF16", "0")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Kernel tests run on CUDA when there is one, else on CPU under the interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

from helpers import format_table  # noqa: E402  (after TRITON_INTERPRET: it imports the package)


def print_table(title: str, header: list, rows: list[list]) -> None:
    """A plain right-aligned text table, for the benchmarks."""
    print("\n" + format_table(title, header, rows))
