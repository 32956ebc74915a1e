import os
import sys

# Triton kernels run on CPU tensors through the interpreter; this must be set
# before any kernel is defined, i.e. before nanobumble/kernels are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
