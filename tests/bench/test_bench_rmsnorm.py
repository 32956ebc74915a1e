"""RMSNorm benchmarks: `python -m pytest -m bench -s tests/bench/test_bench_rmsnorm.py`.

bumblebee's shape: hidden 1536, bf16 activations with an fp32 weight, 4k-32k
tokens per step. On CUDA: median time of forward and forward+backward, peak
extra memory, the achieved bandwidth (the bytes that must move / time, see
bytes_moved), its share of the GPU's peak, and each method's time over PyTorch
eager's for the Triton kernel, PyTorch eager, torch.compile and Liger-Kernel (if
installed). On CPU the torch paths (eager and torch.compile) are timed the same
way; the Triton rows need a GPU (on CPU the kernel only runs in the interpreter).
Nothing here asserts on speed.
"""

import time

import pytest
import torch
from conftest import print_table

from nanobumble.kernels.rmsnorm import rms_norm
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


def bytes_moved(rows: int, x: torch.Tensor, w: torch.Tensor, backward: bool) -> int:
    """The bytes any implementation must move at least, A = rows * hidden * x's element size,
    W = hidden * w's element size:
        forward:          read x, write y, read w                         = 2A + W
        forward+backward: that, then read x and dy, write dx, read w and
                          write dw                                        = 2A + W + 3A + 2W = 5A + 3W
    The same count for every method (the Triton backward's fp32 partial sums for dw are its own
    extra traffic), so GB/s compare like the times."""
    act = rows * HIDDEN * x.element_size()
    weight = HIDDEN * w.element_size()
    return 5 * act + 3 * weight if backward else 2 * act + weight


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


def ratio_to_eager(rows_out: list[list]) -> None:
    """Append each row's time over torch eager's at the same tokens and pass (below 1: faster).
    Rows are [tokens, pass, method, time, ...]; times as printed, in one unit per table."""
    timed = [r for r in rows_out if not r[3].startswith("failed")]
    eager = {(r[0], r[1]): float(r[3]) for r in timed if r[2] == "torch eager"}
    for r in rows_out:
        r.append(f"{float(r[3]) / eager[r[0], r[1]]:.2f}" if r in timed and (r[0], r[1]) in eager else "")


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
        for label, fn in candidates.items():
            fwd = lambda: fn(x, w, EPS)
            fwd_bwd = lambda: torch.autograd.grad(fn(x, w, EPS), (x, w), dy)
            for mode, call, backward in (("fwd", fwd, False), ("fwd+bwd", fwd_bwd, True)):
                try:
                    call()  # compile / warm up
                except Exception as err:  # e.g. a Liger version with another signature: report, go on
                    rows_out.append([tokens, mode, label, f"failed: {type(err).__name__}", "", "", ""])
                    continue
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                call()
                torch.cuda.synchronize()
                peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
                ms = do_bench(call, warmup=25, rep=100, return_mode="median")
                gbs = bytes_moved(tokens, x, w, backward) / ms / 1e6
                share = f"{100 * gbs * 1e9 / peak_bw:.0f}%" if peak_bw else "unknown"
                rows_out.append([tokens, mode, label, f"{ms * 1000:.1f}", f"{gbs:.0f}", share, f"{peak_mib:.0f}"])
    ratio_to_eager(rows_out)
    with capsys.disabled():
        peak = f"peak {peak_bw / 1e12} TB/s" if peak_bw else "peak bandwidth unknown"
        print_table(f"RMSNorm hidden {HIDDEN}, bf16 x, fp32 weight on {name} ({peak})",
                    ["tokens", "pass", "method", "us", "GB/s", "of peak", "peak extra MiB", "time / eager"],
                    rows_out)
        print("(GB/s: the bytes that must move, x, y, w and for fwd+bwd dy, dx, dw, over the median time; "
              "time / eager: over torch eager's at the same tokens and pass, below 1 = faster)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA benchmark covers this")
def test_bench_rmsnorm_cpu(capsys):
    """The torch paths only: the Triton interpreter's speed says nothing about the GPU.
    One thread: on small shared machines several threads can be slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows_out = time_cpu_torch_paths()
    finally:
        torch.set_num_threads(threads)
    ratio_to_eager(rows_out)
    with capsys.disabled():
        print_table(f"RMSNorm hidden {HIDDEN}, bf16 x, fp32 weight on CPU (1 thread)",
                    ["tokens", "pass", "method", "ms", "GB/s", "time / eager"], rows_out)
        print("(GB/s: the bytes that must move, x, y, w and for fwd+bwd dy, dx, dw, over the best time of 10; "
              "time / eager: below 1 = faster)")
        print("Triton rows need a GPU (on CPU the kernel only runs in the interpreter, for correctness).")


def time_cpu_torch_paths() -> list[list]:
    rows_out = []
    paths = {"torch eager": rms_norm_reference, "torch.compile": torch.compile(rms_norm_reference)}
    for tokens in (256, 1024, 4096):
        torch.manual_seed(0)
        x = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
        w = (1 + 0.1 * torch.randn(HIDDEN)).requires_grad_(True)
        dy = torch.randn_like(x)
        for label, fn in paths.items():
            calls = {"fwd": (lambda: fn(x, w, EPS), False),
                     "fwd+bwd": (lambda: torch.autograd.grad(fn(x, w, EPS), (x, w), dy), True)}
            for mode, (call, backward) in calls.items():
                call()  # compile / warm up
                call()
                times = []
                for _ in range(10):
                    t0 = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t0)
                ms = min(times) * 1000  # the best: on a shared machine other load only adds time
                gbs = bytes_moved(tokens, x, w, backward) / ms / 1e6
                rows_out.append([tokens, mode, label, f"{ms:.3f}", f"{gbs:.2f}"])
    return rows_out
