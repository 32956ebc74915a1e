"""RMSNorm benchmarks: `python -m pytest -m bench tests/bench/test_bench_rmsnorm.py`.

bumblebee's shape: hidden 1536, bf16 activations with an fp32 weight, 4k-32k
tokens per step. On CUDA: median time of forward and forward+backward, peak
extra memory, and the achieved bandwidth (bytes that must move / time) for the
Triton kernel, PyTorch eager, torch.compile and Liger-Kernel (if installed).
On CPU only the eager reference means something; Triton timings need a GPU.
Nothing here asserts on speed.
"""

import statistics
import time

import pytest
import torch
from conftest import print_table

from nanobumble.kernels.rmsnorm import _dw_programs, rms_norm
from nanobumble.model.layers import rms_norm as rms_norm_reference

pytestmark = pytest.mark.bench

HIDDEN = 1536
EPS = 1e-6
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # bytes/s (H100: SXM)


def gpu_bandwidth() -> tuple[str, float | None]:
    name = torch.cuda.get_device_name()
    if "H100" in name and "PCIe" in name:
        return name, 2.0e12
    for key, bw in PEAK_BANDWIDTH.items():
        if key in name:
            return name, bw
    return name, None


def bytes_moved(rows: int, x: torch.Tensor, w: torch.Tensor, backward: bool, partial_rows: int = 0) -> int:
    """Forward: read x, write y, read w. Backward adds: read x and dy, write dx, read w, partials in and out."""
    act = rows * HIDDEN * x.element_size()
    weight = HIDDEN * w.element_size()
    total = 2 * act + weight
    if backward:
        total += 3 * act + weight + 2 * partial_rows * HIDDEN * 4
    return total


def methods() -> dict:
    found = {"triton": rms_norm, "torch eager": rms_norm_reference,
             "torch.compile": torch.compile(rms_norm_reference)}
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        # offset 0, llama casting, dx not written over dy (dy is reused between runs)
        found["liger"] = lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)
    except ImportError:
        pass
    return found


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_rmsnorm_cuda(capsys):
    from triton.testing import do_bench

    name, peak_bw = gpu_bandwidth()
    candidates = methods()
    rows_out = []
    for tokens in (4096, 16384, 32768):
        torch.manual_seed(0)
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (1 + 0.1 * torch.randn(HIDDEN, device="cuda")).requires_grad_(True)
        dy = torch.randn_like(x)
        partial_rows = _dw_programs(tokens, x.device)  # the Triton backward's fp32 partial rows
        for label, fn in candidates.items():
            fwd = lambda: fn(x, w, EPS)
            fwd_bwd = lambda: torch.autograd.grad(fn(x, w, EPS), (x, w), dy)
            for mode, call, backward in (("fwd", fwd, False), ("fwd+bwd", fwd_bwd, True)):
                call()  # compile / warm up
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                call()
                torch.cuda.synchronize()
                peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
                ms = do_bench(call, warmup=25, rep=100, return_mode="median")
                gbs = bytes_moved(tokens, x, w, backward, partial_rows if label == "triton" else 0) / ms / 1e6
                share = f"{100 * gbs * 1e9 / peak_bw:.0f}%" if peak_bw else "unknown"
                rows_out.append([tokens, mode, label, f"{ms * 1000:.1f}", f"{gbs:.0f}", share, f"{peak_mib:.0f}"])
    with capsys.disabled():
        peak = f"peak {peak_bw / 1e12} TB/s" if peak_bw else "peak bandwidth unknown"
        print_table(f"RMSNorm hidden {HIDDEN}, bf16 x, fp32 weight on {name} ({peak})",
                    ["tokens", "pass", "method", "us", "GB/s", "of peak", "peak extra MiB"], rows_out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA benchmark covers this")
def test_bench_rmsnorm_cpu(capsys):
    """Only the eager reference: the Triton interpreter's speed says nothing about the GPU.
    One thread: on small shared machines several threads can be slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows_out = time_cpu_reference()
    finally:
        torch.set_num_threads(threads)
    with capsys.disabled():
        print_table(f"RMSNorm hidden {HIDDEN}, bf16 x, fp32 weight on CPU (1 thread)",
                    ["tokens", "pass", "method", "ms", "GB/s"], rows_out)
        print("Triton timings need a GPU (on CPU the kernels only run in the interpreter, for correctness).")


def time_cpu_reference() -> list[list]:
    rows_out = []
    for tokens in (256, 1024):
        torch.manual_seed(0)
        x = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
        w = (1 + 0.1 * torch.randn(HIDDEN)).requires_grad_(True)
        dy = torch.randn_like(x)
        calls = {"fwd": (lambda: rms_norm_reference(x, w, EPS), False),
                 "fwd+bwd": (lambda: torch.autograd.grad(rms_norm_reference(x, w, EPS), (x, w), dy), True)}
        for mode, (call, backward) in calls.items():
            call()
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1000
            gbs = bytes_moved(tokens, x, w, backward) / ms / 1e6
            rows_out.append([tokens, mode, "torch eager", f"{ms:.2f}", f"{gbs:.2f}"])
    return rows_out
