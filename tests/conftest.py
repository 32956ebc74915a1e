import os

import torch

# Without a GPU the Triton kernels run on CPU tensors through the interpreter;
# this must be set before any kernel is defined, i.e. before nanobumble/kernels/ is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Kernel tests run on CUDA when there is one, else on CPU under the interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

from helpers import format_table  # noqa: E402  (after TRITON_INTERPRET: it imports the package)


def print_table(title: str, header: list, rows: list[list]) -> None:
    """A plain right-aligned text table, for the benchmarks."""
    print("\n" + format_table(title, header, rows))
