"""Rotary embedding benchmarks: `python -m pytest -m bench -s tests/bench/test_bench_rope.py`.

Bumblebee shapes: q [B, T, 12, 128] and k [B, T, 2, 128] in bf16. On CUDA: forward and
forward+backward time of the Triton kernel, the PyTorch reference eager and under
torch.compile, and Liger-Kernel when installed; achieved GB/s over the bytes that must
move (bytes_moved), its share of the GPU's bandwidth, each one's time over the eager
reference's, and peak extra memory. On CPU the torch paths (eager and torch.compile) are
timed the same way; the Triton rows need a GPU (the interpreter's speed means nothing).
"""

import time

import pytest
import torch
from conftest import DEVICE, print_table

from nanobumble.kernels.rope import apply_rope
from nanobumble.model.layers import apply_rope as apply_rope_reference
from nanobumble.model.layers import rope_cos_sin

pytestmark = pytest.mark.bench

NUM_Q_HEADS, NUM_K_HEADS, HEAD_DIM, THETA = 12, 2, 128, 1_000_000.0
GPU_SIZES = [(1, 4096), (1, 16384), (1, 32768), (4, 4096)]  # (batch, seq)
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # bytes/s


def peak_bandwidth() -> float | None:
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def make_inputs(batch: int, seq: int, dtype: torch.dtype):
    torch.manual_seed(0)
    q = torch.randn(batch, seq, NUM_Q_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, seq, NUM_K_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(seq, device=DEVICE).repeat(batch, 1), HEAD_DIM, THETA)
    return q, k, cos, sin


def bytes_moved(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, backward: bool) -> int:
    """The bytes any implementation must move at least. Forward: read q, k, cos and sin, write
    the rotated q and k = 2 (|q| + |k|) e + 2 |cos| 4 (e: q's element size; cos and sin are fp32).
    The backward pass moves as much again: read dq_out, dk_out, cos and sin, write dq, dk."""
    one_pass = 2 * (q.numel() + k.numel()) * q.element_size() + 2 * cos.numel() * cos.element_size()
    return one_pass * (2 if backward else 1)


def liger_rope():
    """Liger's rope as a function of our layout, or None when it is not installed."""
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        return None

    def run(q, k, cos, sin):  # Liger wants [B, H, T, D] and full-width cos/sin
        full_cos, full_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        q_out, k_out = liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), full_cos, full_sin)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)

    return run


def ratio_to_torch(rows: list[list], reference: str) -> None:
    """Append each row's time over the reference's at the same shape, dtype and pass (below 1:
    faster). Rows are [shape, dtype, impl, pass, time, ...], times in one unit per table."""
    timed = [r for r in rows if not r[4].startswith("failed")]
    ref = {(r[0], r[1], r[3]): float(r[4]) for r in timed if r[2] == reference}
    for r in rows:
        key = (r[0], r[1], r[3])
        r.append(f"{float(r[4]) / ref[key]:.2f}" if r in timed and key in ref else "")


def time_cpu(fn) -> float:
    """The fastest of 10 calls in ms, after two to compile / warm up (the best, not the median:
    on a shared machine the other load only ever adds time)."""
    fn(), fn()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def test_bench_rope_cpu(capsys):
    if DEVICE.type == "cuda":
        pytest.skip("CPU table; the CUDA benchmark covers this machine")
    # One thread: on a small shared machine two OpenMP threads that wait for each other made
    # these calls 10x slower and random (the RMSNorm and decode benchmarks do the same).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = time_cpu_torch_paths()
    finally:
        torch.set_num_threads(threads)
    ratio_to_torch(rows, "torch")
    with capsys.disabled():
        print_table(f"RoPE torch paths on CPU (1 thread), q [B, T, {NUM_Q_HEADS}, {HEAD_DIM}], "
                    f"k [B, T, {NUM_K_HEADS}, {HEAD_DIM}]",
                    ["B x T", "dtype", "impl", "pass", "ms", "GB/s", "time / torch"], rows)
        print("(GB/s: the bytes that must move, q, k, cos, sin and the outputs, twice for fwd+bwd, over the best "
              "time of 10; time / torch: over the eager reference's, below 1 = faster)")
        print("Triton rows need a GPU (on CPU the kernel only runs in the interpreter, for correctness).")


def time_cpu_torch_paths() -> list[list]:
    paths = {"torch": apply_rope_reference, "torch.compile": torch.compile(apply_rope_reference)}
    rows = []
    for batch, seq in ((1, 512), (1, 2048)):
        for dtype in (torch.float32, torch.bfloat16):
            q, k, cos, sin = make_inputs(batch, seq, dtype)
            dq, dk = torch.randn_like(q), torch.randn_like(k)
            for name, rope in paths.items():
                def forward(rope=rope):
                    with torch.no_grad():
                        rope(q, k, cos, sin)

                def forward_backward(rope=rope):  # grad, not backward: nothing accumulates into q.grad
                    torch.autograd.grad(rope(q, k, cos, sin), (q, k), (dq, dk))

                for label, fn, backward in (("forward", forward, False), ("fwd+bwd", forward_backward, True)):
                    ms = time_cpu(fn)
                    gbs = bytes_moved(q, k, cos, backward) / (ms * 1e-3) / 1e9
                    rows.append([f"{batch}x{seq}", str(dtype).replace("torch.", ""), name, label, f"{ms:.3f}",
                                 f"{gbs:.2f}"])
    return rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton timings need a GPU")
def test_bench_rope_cuda(capsys):
    import triton.testing

    providers = {"triton": apply_rope, "torch": apply_rope_reference,
                 "torch.compile": torch.compile(apply_rope_reference)}
    liger = liger_rope()
    if liger is not None:
        providers["liger"] = liger
    bandwidth = peak_bandwidth()
    rows = []
    for batch, seq in GPU_SIZES:
        q, k, cos, sin = make_inputs(batch, seq, torch.bfloat16)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        for name, fn in providers.items():
            for backward in (False, True):
                if backward:
                    def step(fn=fn):
                        torch.autograd.backward(fn(q, k, cos, sin), (dq, dk))
                else:
                    def step(fn=fn):
                        with torch.no_grad():
                            fn(q, k, cos, sin)
                try:
                    step()  # compile / warm up outside the timing and the memory peak
                except Exception as err:  # e.g. a Liger version with another signature
                    rows.append([f"{batch}x{seq}", "bf16", name, "fwd+bwd" if backward else "forward",
                                 f"failed: {type(err).__name__}", "", "", ""])
                    continue
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
                ms = triton.testing.do_bench(step, grad_to_none=[q, k], return_mode="median")
                gbs = bytes_moved(q, k, cos, backward) / (ms * 1e-3) / 1e9
                share = f"{100 * gbs * 1e9 / bandwidth:.0f}%" if bandwidth else "unknown"
                rows.append([f"{batch}x{seq}", "bf16", name, "fwd+bwd" if backward else "forward",
                             f"{ms * 1e3:.1f}", f"{gbs:.0f}", share, f"{peak_mib:.0f}"])
        q.grad = k.grad = None
    ratio_to_torch(rows, "torch")
    with capsys.disabled():
        print_table(f"RoPE, q [B, T, {NUM_Q_HEADS}, {HEAD_DIM}], k [B, T, {NUM_K_HEADS}, {HEAD_DIM}] "
                    f"on {torch.cuda.get_device_name()}",
                    ["B x T", "dtype", "impl", "pass", "us", "GB/s", "of peak BW", "peak extra MiB", "time / torch"],
                    rows)
        print("(GB/s: the bytes that must move, q, k, cos, sin and the outputs, twice for fwd+bwd, over the median "
              "time; time / torch: over the eager reference's, below 1 = faster)")
