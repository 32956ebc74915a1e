"""Cross-entropy benchmarks: `python -m pytest -m bench -s tests/bench/test_bench_cross_entropy.py`.

They print tables and assert nothing about speed. On CUDA: the Triton row kernel that
linear_cross_entropy runs on each chunk, over bf16 logits (against the same rows in plain
torch, F.cross_entropy on logits.float(), its torch.compile, and Liger if installed): time,
achieved bandwidth over the bytes that must move (step_bytes), its share of the GPU's peak,
time over torch eager's and peak extra memory; then linear + cross-entropy against
materialised logits. On CPU: the torch paths of the row step (GB/s and time over eager's;
the Triton rows need a GPU), and linear_cross_entropy(backend="torch") against the
materialised reference, peak memory measured in fresh processes.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, print_table
from references import linear_cross_entropy_reference

from nanobumble.kernels.cross_entropy import cross_entropy_rows
from nanobumble.model.layers import IGNORE_INDEX
from nanobumble.model.lm_loss import _rows_torch, linear_cross_entropy, lm_head_info

pytestmark = pytest.mark.bench

PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # bytes/s (H100: SXM)


def gpu_bandwidth() -> tuple[str, float | None]:
    name = torch.cuda.get_device_name()
    return name, next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def liger_functions():
    """(cross-entropy, fused linear cross-entropy) callables from Liger-Kernel, or None."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None, None
    ce_loss, flce_loss = LigerCrossEntropyLoss(ignore_index=IGNORE_INDEX), LigerFusedLinearCrossEntropyLoss()
    return (lambda x, t: ce_loss(x, t)), (lambda h, w, t: flce_loss(w, h, t))


def cuda_peak_extra(fn) -> float:
    """Peak bytes allocated by one call of fn above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def eager_ce(x, t):
    return F.cross_entropy(x.float(), t, ignore_index=IGNORE_INDEX)


def step_bytes(logits: torch.Tensor) -> int:
    """The bytes a training step of the loss must move at least: read the logits and the int64
    targets, write the gradient of the logits (the loss itself is a few bytes):
    2 * N * V * e + 8 * N, e the logits' element size."""
    return 2 * logits.numel() * logits.element_size() + 8 * logits.shape[0]


def ratio_to_eager(rows: list[list], time_column: int) -> None:
    """Append each row's step time over torch eager's at the same V and N (below 1: faster).
    Rows are [V, N, impl, ...]."""
    timed = [r for r in rows if not str(r[3]).startswith("failed")]
    eager = {(r[0], r[1]): float(r[time_column]) for r in timed if r[2] == "torch eager"}
    for r in rows:
        key = (r[0], r[1])
        r.append(f"{float(r[time_column]) / eager[key]:.2f}" if r in timed and key in eager else "")


# ------------------------------------------------------------------------------------------------ CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_cross_entropy_cuda(capsys):
    from triton.testing import do_bench

    name, peak_bw = gpu_bandwidth()
    compiled_ce = torch.compile(eager_ce)
    liger_ce, _ = liger_functions()
    one = torch.ones((), dtype=torch.float32, device="cuda")

    def kernel_step(x, t):  # one launch: the loss, and the gradient written over the logits
        return cross_entropy_rows(x.detach(), t, one, x.detach(), IGNORE_INDEX).sum()

    def torch_rows_step(x, t):  # the same in plain torch: linear_cross_entropy(backend="torch")'s rows
        return _rows_torch(x.detach(), t, one, write_grad=True).sum()

    def autograd_step(fn):
        return lambda x, t: fn(x, t).backward()

    # label: (forward only, a whole training step); the row paths' forward is their whole step
    variants = {"triton row kernel": (kernel_step, kernel_step),
                "torch rows": (torch_rows_step, torch_rows_step),
                "torch eager": (eager_ce, autograd_step(eager_ce)),
                "torch.compile": (compiled_ce, autograd_step(compiled_ce))}
    if liger_ce is not None:
        variants["liger"] = (liger_ce, autograd_step(liger_ce))
    rows = []
    for vocab in (32_000, 151_936):
        for n in (8192, 16384):
            torch.manual_seed(0)
            logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
            targets = torch.randint(0, vocab, (n,), device="cuda")
            targets[::10] = IGNORE_INDEX
            logits_gb = logits.numel() * logits.element_size() / 1e9
            for label, (fwd, step) in variants.items():
                x = logits.clone().requires_grad_()  # the kernel overwrites its input

                def fwd_bwd():
                    step(x, targets)

                try:
                    fwd_bwd()  # compile / warm up
                    x.grad = None
                    t_fwd = do_bench(lambda: fwd(x, targets))
                    t_all = do_bench(fwd_bwd, grad_to_none=[x])
                    x.grad = None
                    peak = cuda_peak_extra(fwd_bwd)
                except Exception as e:  # e.g. an incompatible Liger version: report, go on
                    rows.append([vocab, n, label, f"failed: {type(e).__name__}", "", "", "", "", ""])
                    continue
                gbs = step_bytes(logits) / (t_all * 1e-3) / 1e9
                share = f"{100 * gbs * 1e9 / peak_bw:.0f}%" if peak_bw else "unknown"
                rows.append([vocab, n, label, f"{t_fwd:.2f}", f"{t_all:.2f}", f"{gbs:.0f}", share,
                             f"{peak / 1e9:.2f}", f"{logits_gb:.2f}"])
                x = None  # free it before the next variant
            del logits
            torch.cuda.empty_cache()
    ratio_to_eager(rows, 4)
    with capsys.disabled():
        print_table(f"cross-entropy, bf16 logits, 10% of targets ignored ({name}; fwd = forward of a "
                    f"training step, which for the row paths includes the gradient, written over the logits)",
                    ["V", "N", "impl", "fwd ms", "fwd+bwd ms", "GB/s", "of peak BW", "peak extra GB", "logits GB",
                     "time / eager"], rows)
        print("(GB/s: the bytes a step must move, read the logits and targets, write the gradient, over the "
              "fwd+bwd time; time / eager: fwd+bwd over torch eager's, below 1 = faster)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_linear_cross_entropy_cuda(capsys):
    from triton.testing import do_bench

    name, _ = gpu_bandwidth()
    n, hidden_size, vocab = 8192, 1536, 151_936
    torch.manual_seed(0)
    hidden = torch.randn(n, hidden_size, device="cuda", dtype=torch.bfloat16).requires_grad_()
    weight = (0.02 * torch.randn(vocab, hidden_size, device="cuda")).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    targets[::10] = IGNORE_INDEX
    _, liger_flce = liger_functions()
    variants = {"chunked triton": linear_cross_entropy,  # chunks sized by the free memory
                "chunked triton, 832 rows": lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=832),
                "chunked torch": lambda h, w, t: linear_cross_entropy(h, w, t, backend="torch"),
                "materialised eager": linear_cross_entropy_reference,
                "materialised compile": torch.compile(linear_cross_entropy_reference)}
    if liger_flce is not None:
        variants["liger fused"] = liger_flce
    flops = 6 * n * hidden_size * vocab  # three matmuls of 2*N*H*V
    linear_cross_entropy(hidden, weight, targets).backward()
    hidden.grad = weight.grad = None
    head = lm_head_info()  # the default's gradient path and chunk, printed under the table
    rows, peaks, times = [], {}, {}
    for label, fn in variants.items():
        def fwd_bwd():
            fn(hidden, weight, targets).backward()

        try:
            fwd_bwd()
            hidden.grad = weight.grad = None
            t_all = do_bench(fwd_bwd, grad_to_none=[hidden, weight])
            hidden.grad = weight.grad = None
            peaks[label] = cuda_peak_extra(fwd_bwd)
            hidden.grad = weight.grad = None
        except Exception as e:
            rows.append([label, f"failed: {type(e).__name__}", "", "", ""])
            continue
        times[label] = t_all
        rows.append([label, f"{t_all:.1f}", f"{flops / (t_all * 1e-3) / 1e12:.0f}", f"{peaks[label] / 1e9:.2f}"])
        torch.cuda.empty_cache()
    for row in rows:  # the time over the same chunked algorithm in plain torch (backend="torch")
        reference = times.get("chunked torch")
        if row[0] in times:
            row.append(f"{times[row[0]] / reference:.2f}" if reference else "")
    logits_gb = n * vocab * 2 / 1e9
    with capsys.disabled():
        print_table(f"linear + cross-entropy fwd+bwd, N={n} H={hidden_size} V={vocab} bf16 ({name}); "
                    f"the bf16 logits alone are {logits_gb:.2f} GB",
                    ["impl", "ms", "TFLOP/s", "peak extra GB (incl. grads)", "time / chunked torch"], rows)
        print(f"LM head path: {head['path']}; default chunk: {head['chunk_rows']} of {head['rows']} rows "
              f"(832 rows = the fixed chunk before chunks were sized by the free memory)")
        if "chunked triton" in peaks:
            for ref in ("materialised eager", "materialised compile"):
                if ref in peaks:
                    print(f"peak memory {ref} / chunked triton: {peaks[ref] / peaks['chunked triton']:.1f}x")


# ------------------------------------------------------------------------------------------------- CPU

@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA benchmark above covers this")
def test_bench_cross_entropy_cpu(capsys):
    """The torch paths of one loss + gradient step over bf16 logits, one thread (on a small
    shared machine two threads that wait for each other are slower than one), best of 5."""
    one = torch.ones((), dtype=torch.float32)

    def torch_rows_step(x, t):  # linear_cross_entropy(backend="torch")'s rows, gradient written in place
        _rows_torch(x.detach(), t, one, write_grad=True)

    compiled_ce = torch.compile(eager_ce)
    variants = {"torch eager": lambda x, t: torch.autograd.grad(eager_ce(x, t), x),
                "torch.compile": lambda x, t: torch.autograd.grad(compiled_ce(x, t), x),
                "torch rows": torch_rows_step}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for vocab, n in ((32_000, 1024), (151_936, 256)):  # 66 and 78 MB of bf16 logits
            torch.manual_seed(0)
            logits = torch.randn(n, vocab, dtype=torch.bfloat16)
            targets = torch.randint(0, vocab, (n,))
            targets[::10] = IGNORE_INDEX
            for label, step in variants.items():
                x = logits.clone().requires_grad_()  # the row path overwrites its input
                step(x, targets), step(x, targets)  # compile / warm up
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    step(x, targets)
                    times.append(time.perf_counter() - t0)
                ms = min(times) * 1e3  # the best: on a shared machine other load only adds time
                rows.append([vocab, n, label, f"{ms:.1f}", f"{step_bytes(logits) / (ms * 1e-3) / 1e9:.2f}"])
    finally:
        torch.set_num_threads(threads)
    ratio_to_eager(rows, 3)
    with capsys.disabled():
        print_table("cross-entropy loss + gradient on CPU (1 thread), bf16 logits, 10% of targets ignored",
                    ["V", "N", "impl", "ms", "GB/s", "time / eager"], rows)
        print("(GB/s: the bytes a step must move, read the logits and targets, write the gradient, over the best "
              "time of 5; time / eager: below 1 = faster)")
        print("Triton rows need a GPU: the Triton kernel only runs under the interpreter here.")


# Peak memory of one forward+backward, measured in a fresh Python process: the rise of
# VmHWM (the high-water mark of resident memory, reset to the current RSS just before the
# step by tests/host_memory.py) over the RSS before it (inputs made, libraries loaded, a
# small warm-up step done) is the most extra memory the step ever held. Not ru_maxrss:
# Linux carries it over from the parent through fork and exec, so a child of a pytest
# process that once held GBs would show no rise at all. PyTorch's CPU allocator hands large
# blocks back to the OS on free, so the mark follows live tensors rather than a cache.
_CPU_MEASURE = textwrap.dedent("""
    import json
    import torch
    from host_memory import measure
    from nanobumble.model.lm_loss import linear_cross_entropy
    from references import linear_cross_entropy_reference
    torch.manual_seed(0)
    n, h, v = {n}, {h}, {v}
    hidden = torch.randn(n, h).requires_grad_()
    weight = torch.randn(v, h).mul_(0.05).requires_grad_()  # in place: no temporary to raise the mark
    targets = torch.randint(0, v, (n,))
    targets[::10] = -100
    if {chunked}:
        fn = lambda a, b, c: linear_cross_entropy(a, b, c, backend="torch")
    else:
        fn = linear_cross_entropy_reference
    fn(hidden[:8], weight[:64], targets[:8].clamp(max=63)).backward()  # load kernels, thread pools
    hidden.grad = weight.grad = None

    def step():
        loss = fn(hidden, weight, targets)
        loss.backward()
        return loss.item()

    loss, before_mib, peak_mib, seconds = measure(step)
    print(json.dumps(dict(extra_bytes=(peak_mib - before_mib) * 2**20, seconds=seconds, loss=loss)))
""")


def measure_cpu(chunked: bool, n: int, h: int, v: int) -> dict:
    code = _CPU_MEASURE.format(n=n, h=h, v=v, chunked=chunked)
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    # run in tests/, where `references` is (python -c looks in its working directory first)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.join(REPO_ROOT, "tests"))
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA benchmarks above cover this")
def test_bench_linear_cross_entropy_cpu(capsys):
    n, h, v = 8192, 256, 32_000
    chunked = measure_cpu(True, n, h, v)
    materialised = measure_cpu(False, n, h, v)
    assert abs(chunked["loss"] - materialised["loss"]) < 1e-3 * abs(materialised["loss"])
    logits_gb = n * v * 4 / 1e9
    rows = [[label, f"{r['seconds']:.2f}", f"{r['extra_bytes'] / 1e9:.3f}"]
            for label, r in (("chunked (backend=torch)", chunked), ("materialised reference", materialised))]
    with capsys.disabled():
        print_table(f"linear + cross-entropy fwd+bwd on CPU, N={n} H={h} V={v} fp32 "
                    f"(the logits alone are {logits_gb:.2f} GB); peak = VmHWM rise in a fresh process",
                    ["impl", "seconds", "peak extra GB"], rows)
        print(f"peak memory materialised / chunked: {materialised['extra_bytes'] / chunked['extra_bytes']:.1f}x")
        print("Triton timings need a GPU: the Triton kernel only runs under the interpreter here.")
