"""Checks that need CUDA: `python -m pytest -m gpu -s` (estimated 6-7 minutes on one H100: never run yet).

Off by default (pytest.ini) and skipped without a GPU. Every test asserts a
result and prints a table whose rows can go to the README:

  run table (first, so a short loan gets it): what the 1.5B run achieves here, in one table
     (tests/run_table.py, whose CPU twin is tests/gpu/test_run_table_cpu.py under -m slow):
     the shipped and the recommended pretraining config (tokens/s, MFU with its FLOP
     convention and the paper estimate beside it, peak memory, compile off and on) at their
     micro batch x 2048, padded vs packed SFT rows of instruction-like lengths (real
     tokens/s), one DPO-LoRA step, the kernels' GB/s against the device's bandwidth, and the
     fast paths that ran (attention kernel, LM head gradient path, kernels);
  a. the Triton kernels (RMSNorm, RoPE, linear + cross-entropy),
     compiled for the GPU, forward and backward in fp32 and bf16 at the model's
     shapes, against float64: error <= 2 x the PyTorch reference's error in the
     same dtype + 1e-5 of the largest value (the rule of the CPU kernel tests);
  c. packed documents (position_ids restarting at 0) against one document per
     row: time and memory, and each packed document's logits, loss and
     gradients equal those of the document run alone;
  d. 30 steps of the tiny model with kernels=triton and kernels=torch: the
     losses agree step by step;
  e. FSDP2's bf16 MixedPrecisionPolicy on NCCL with one rank (in a child
     process): the losses agree with the unsharded model under autocast.
"""

import gc
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REPO_ROOT, print_table
from references import linear_cross_entropy_reference
from run_table import COLUMNS, gpu_shapes, run_table

import nanobumble.base.alloc as alloc_mod
from nanobumble.base.distributed import DistInfo
from nanobumble.base.precision import autocast
from nanobumble.kernels.rmsnorm import rms_norm
from nanobumble.kernels.rope import apply_rope
from nanobumble.model.layers import IGNORE_INDEX, rope_cos_sin
from nanobumble.model.layers import apply_rope as apply_rope_reference
from nanobumble.model.layers import rms_norm as rms_norm_reference
from nanobumble.model.lm_loss import linear_cross_entropy
from nanobumble.model.transformer import PRESETS, ModelConfig, Transformer
from nanobumble.run.build import build_model
from nanobumble.run.optim import build_optimizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = torch.device("cuda")
BF16, FP32 = torch.bfloat16, torch.float32

# The model's shapes (bumblebee-1.5b = Qwen2.5-1.5B).
HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, VOCAB = 1536, 12, 2, 128, 151_936
TOKENS = 4096  # tokens per kernel check: 2 rows of 2048
BATCH, SEQ = 2, 2048
THETA = 1e6

# Training checks
BIG_SEQ = 2048                           # c: row length
WARMUP_STEPS, TIMED_STEPS = 2, 5
PACKED_LAYERS, PACKED_BATCH = 4, 4       # c: a 4-layer bumblebee-shaped model
PACKED_ROW0 = [517, 64, 300, 1, 700, 466]  # c: documents of the checked row (sum = BIG_SEQ, one of length 1)
GRAD_TOLERANCE = 5e-2                    # c: relative error of bf16 gradients, packed vs alone (~1e-2 seen)
TINY_VOCAB, TINY_BATCH, TINY_SEQ, TINY_STEPS = 4096, 8, 256, 30  # d
FSDP_TIMEOUT_S = 300                     # e


def sync() -> None:
    torch.cuda.synchronize()


def reset_peak_memory() -> None:
    sync()
    torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def free_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def gpu_name() -> str:
    return torch.cuda.get_device_name()


@pytest.fixture(autouse=True)
def clean_gpu():
    free_memory()
    yield
    free_memory()


@pytest.fixture
def exact_fp32():
    """Kernel checks compare fp32 against float64: no TF32 matmuls (torch's default, made sure)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def poison(monkeypatch):
    """Kernel outputs start as NaN, so an element a kernel forgets to write fails."""
    monkeypatch.setattr(alloc_mod, "POISON_OUTPUTS", True)


# ---------------------------------------------------------------------------------------------
# The run table: the numbers that matter for a run (tests/run_table.py)
# ---------------------------------------------------------------------------------------------

def test_gpu_run_table(capsys):
    shapes = gpu_shapes(DEVICE)
    rows, failures, notes = run_table(shapes, DEVICE)
    with capsys.disabled():
        print_table(f"run table on {gpu_name()} ({torch.__version__}), bumblebee-1.5b, bf16: the configs' micro "
                    f"batches x their cutoff_len", COLUMNS, rows)
        print("\n".join(notes))
    assert not failures, "\n".join(failures)
    for row in rows:
        if row[5] not in ("-",) and not row[5].startswith("n/a"):
            mfu = float(row[5].split("%")[0])
            assert 0 < mfu < 100, row


# ---------------------------------------------------------------------------------------------
# a. Triton kernels against float64
# ---------------------------------------------------------------------------------------------

def leaf(x: torch.Tensor, dtype=None) -> torch.Tensor:
    return x.detach().to(dtype or x.dtype).clone().requires_grad_()


def compare(rows: list, failures: list, what: str, dtype: str, got: torch.Tensor, ref: torch.Tensor,
            exact: torch.Tensor, want_dtype: torch.dtype) -> None:
    """|got - exact| <= 2 |ref - exact| + 1e-5 max|exact| (maxima over all elements): the kernel
    in `dtype` may be at most twice as far from float64 as the PyTorch reference in `dtype`.
    Adds a table row; records a failure (asserted after the table is printed)."""
    exact = exact.detach().double()
    nan = bool(torch.isnan(got).any())
    err = (got.detach().double() - exact).abs().max().item()
    ref_err = (ref.detach().double() - exact).abs().max().item()
    bound = 2 * ref_err + 1e-5 * exact.abs().max().item() + 1e-9
    ok = not nan and err <= bound and got.dtype == want_dtype and got.shape == exact.shape
    rows.append([what, dtype, f"{err:.3g}", f"{ref_err:.3g}", f"{bound:.3g}", "ok" if ok else "FAIL"])
    if not ok:
        failures.append(f"{what} {dtype}: error {err:.3g} > bound {bound:.3g} (reference error {ref_err:.3g}), "
                        f"NaN {nan}, dtype {got.dtype} (want {want_dtype}), shape {tuple(got.shape)}")


def report(capsys, title: str, rows: list, failures: list) -> None:
    with capsys.disabled():
        print_table(f"{title} on {gpu_name()}", ["quantity", "dtype", "error vs fp64", "torch error",
                                                   "bound", "result"], rows)
    assert not failures, "\n".join(failures)


def test_gpu_rmsnorm_vs_float64(capsys, exact_fp32, poison):
    def fwd_bwd(fn, x, w, dy):
        x, w = leaf(x), leaf(w)
        y = fn(x, w, 1e-6)
        y.backward(dy.to(y.dtype))
        return y, x.grad, w.grad

    def float64_rms_norm(x, w, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    rows, failures = [], []
    torch.manual_seed(0)
    for x_dtype, w_dtype in [(FP32, FP32), (BF16, FP32), (BF16, BF16)]:
        x = (3 * torch.randn(BATCH, SEQ, HIDDEN, device=DEVICE)).to(x_dtype)
        w = (1 + 0.1 * torch.randn(HIDDEN, device=DEVICE)).to(w_dtype)
        dy = torch.randn(BATCH, SEQ, HIDDEN, device=DEVICE).to(x_dtype)
        got = fwd_bwd(rms_norm, x, w, dy)
        ref = fwd_bwd(rms_norm_reference, x, w, dy)
        exact = fwd_bwd(float64_rms_norm, x.double(), w.double(), dy.double())
        label = f"x {str(x_dtype)[6:]}, w {str(w_dtype)[6:]}"
        for name, g, r, e, dt in zip(("y", "dx", "dw"), got, ref, exact, (x_dtype, x_dtype, w_dtype)):
            compare(rows, failures, f"rms_norm {name} [{BATCH}x{SEQ}, {HIDDEN}]", label, g, r, e, dt)
    report(capsys, "a. RMSNorm kernel vs float64", rows, failures)


def test_gpu_rope_vs_float64(capsys, exact_fp32, poison):
    def fwd_bwd(fn, q, k, cos, sin, dq_out, dk_out):
        q, k = leaf(q), leaf(k)
        q_out, k_out = fn(q, k, cos, sin)
        dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (dq_out, dk_out))
        return q_out, k_out, dq, dk

    # positions of packed rows: restart at 0 where documents begin, up to SEQ - 1
    pos = torch.arange(SEQ, device=DEVICE).repeat(BATCH, 1)
    pos[1, SEQ // 3:] -= SEQ // 3
    cos, sin = rope_cos_sin(pos, HEAD_DIM, THETA)
    rows, failures = [], []
    torch.manual_seed(1)
    for dtype in (FP32, BF16):
        q = torch.randn(BATCH, SEQ, Q_HEADS, HEAD_DIM, device=DEVICE).to(dtype)
        k = torch.randn(BATCH, SEQ, KV_HEADS, HEAD_DIM, device=DEVICE).to(dtype)
        dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
        got = fwd_bwd(apply_rope, q, k, cos, sin, dq_out, dk_out)
        ref = fwd_bwd(apply_rope_reference, q, k, cos, sin, dq_out, dk_out)
        d = lambda t: t.detach().double()
        exact = fwd_bwd(apply_rope_reference, d(q), d(k), d(cos), d(sin), d(dq_out), d(dk_out))
        for name, g, r, e in zip(("q", "k", "dq", "dk"), got, ref, exact):
            compare(rows, failures, f"rope {name} [{BATCH}x{SEQ}, {Q_HEADS}/{KV_HEADS} heads x {HEAD_DIM}]",
                    str(dtype)[6:], g, r, e, dtype)
    report(capsys, "a. RoPE kernel vs float64", rows, failures)


def make_targets(n: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    targets = torch.randint(0, vocab, (n,), device=DEVICE, generator=gen)
    targets[::3] = IGNORE_INDEX  # a third of the tokens do not count
    return targets


def test_gpu_linear_cross_entropy_vs_float64(capsys, exact_fp32, poison):
    """Fused LM head + loss (default chunking) in fp32, bf16, and fp32 master weights under
    bf16 autocast (how the model calls it); against hidden @ weight.T then cross-entropy."""
    rows, failures = [], []
    targets = make_targets(TOKENS, VOCAB, 3)
    torch.manual_seed(3)
    hidden0 = torch.randn(TOKENS, HIDDEN, device=DEVICE)
    weight0 = 0.05 * torch.randn(VOCAB, HIDDEN, device=DEVICE)
    for label, dtype, use_autocast in [("fp32", FP32, False), ("bf16", BF16, False),
                                       ("fp32 + autocast bf16", FP32, True)]:
        h, h_ref, h64 = leaf(hidden0, dtype), leaf(hidden0, dtype), leaf(hidden0, torch.float64)
        w, w_ref, w64 = leaf(weight0, dtype), leaf(weight0, dtype), leaf(weight0, torch.float64)
        with autocast(DEVICE, BF16 if use_autocast else FP32):
            loss = linear_cross_entropy(h, w, targets)
            loss_ref = linear_cross_entropy_reference(h_ref, w_ref, targets)
        loss64 = linear_cross_entropy_reference(h64, w64, targets)
        for t in (loss, loss_ref, loss64):
            t.backward()
        what = f"linear_cross_entropy [{TOKENS}, {HIDDEN}] x [{VOCAB}, {HIDDEN}]"
        compare(rows, failures, f"{what} loss", label, loss, loss_ref, loss64, FP32)
        compare(rows, failures, f"{what} grad hidden", label, h.grad, h_ref.grad, h64.grad, dtype)
        compare(rows, failures, f"{what} grad weight", label, w.grad, w_ref.grad, w64.grad, dtype)
        del h, h_ref, h64, w, w_ref, w64, loss, loss_ref, loss64
        free_memory()
    report(capsys, "a. linear + cross-entropy vs float64", rows, failures)


# ---------------------------------------------------------------------------------------------
# c. packed documents: speed, memory, and the same result as each document alone
# ---------------------------------------------------------------------------------------------

def packed_positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])


def random_lengths(total: int, documents: int, gen: torch.Generator) -> list[int]:
    cuts = sorted((torch.randperm(total - 1, generator=gen)[:documents - 1] + 1).tolist())
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def time_forward_backward(model, x, y, position_ids) -> tuple[float, float]:
    """Median ms of forward + backward, and the peak GiB allocated during one."""
    def once():
        with autocast(DEVICE, BF16):
            loss = model(x, y, position_ids=position_ids)
        loss.backward()
        model.zero_grad(set_to_none=True)
        sync()
        assert torch.isfinite(loss)

    for _ in range(WARMUP_STEPS):  # flex_attention compiles on its first call
        once()
    times = []
    for _ in range(TIMED_STEPS):
        reset_peak_memory()
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2], peak_memory_gib()


def test_gpu_packed_attention(capsys):
    cfg = ModelConfig(vocab_size=VOCAB, **{**PRESETS["bumblebee-1.5b"], "num_layers": PACKED_LAYERS})
    model = build_model(cfg, DistInfo(device=DEVICE), 0, None, BF16)
    model.kernels = "triton"
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, cfg.vocab_size, (PACKED_BATCH, BIG_SEQ + 1), generator=gen).to(DEVICE)
    x, y = tokens[:, :-1], tokens[:, 1:]
    assert sum(PACKED_ROW0) == BIG_SEQ
    row_lengths = [PACKED_ROW0] + [random_lengths(BIG_SEQ, 8, gen) for _ in range(PACKED_BATCH - 1)]
    position_ids = torch.stack([packed_positions(lengths) for lengths in row_lengths]).to(DEVICE)

    # correctness first: row 0 packed against each of its documents alone (no gradients, bf16)
    model.eval()
    x0, y0, pos0 = x[:1], y[:1], position_ids[:1]
    doc_rows = []
    packed_errors, leak_errors, loss_diffs = [], [], []
    with torch.no_grad(), autocast(DEVICE, BF16):
        logits_packed = model(x0, position_ids=pos0)
        logits_plain = model(x0)  # one causal sequence: documents see each other (the control)
        start = 0
        for i, n in enumerate(PACKED_ROW0):
            end = start + n
            logits_alone = model(x0[:, start:end])
            only_doc = torch.full_like(y0, IGNORE_INDEX)
            only_doc[:, start:end] = y0[:, start:end]
            loss_packed = model(x0, only_doc, position_ids=pos0).item()  # the fused loss path
            loss_alone = model(x0[:, start:end], y0[:, start:end]).item()
            packed_err = relative_error(logits_packed[:, start:end], logits_alone)
            leak_err = relative_error(logits_plain[:, start:end], logits_alone)
            packed_errors.append(packed_err)
            loss_diffs.append(abs(loss_packed - loss_alone))
            if i > 0:
                leak_errors.append(leak_err)
            doc_rows.append([i, f"{start}-{end - 1}", f"{loss_alone:.4f}", f"{loss_packed:.4f}",
                             f"{abs(loss_packed - loss_alone):.2e}", f"{packed_err:.2e}",
                             "-" if i == 0 else f"{leak_err:.2e}"])
            start = end
    del logits_packed, logits_plain, logits_alone

    # and the gradients: the packed row's summed loss against the documents' losses run alone
    model.train()
    watched = {"embed_tokens": model.embed_tokens.weight, "layers.0.q_proj": model.layers[0].self_attn.q_proj.weight,
               "layers.-1.down_proj": model.layers[-1].mlp.down_proj.weight}

    def grads_of(losses_fn) -> dict:
        model.zero_grad(set_to_none=True)
        with autocast(DEVICE, BF16):
            for loss in losses_fn():
                loss.backward()
        return {name: p.grad.detach().clone() for name, p in watched.items()}

    def alone():
        start = 0
        for n in PACKED_ROW0:
            yield model(x0[:, start:start + n], y0[:, start:start + n], reduction="sum")
            start += n

    grads_packed = grads_of(lambda: [model(x0, y0, position_ids=pos0, reduction="sum")])
    grads_alone = grads_of(alone)
    model.zero_grad(set_to_none=True)
    grad_errors = {name: relative_error(grads_packed[name], grads_alone[name]) for name in watched}
    del grads_packed, grads_alone

    # then speed and memory of a training forward + backward, all rows packed or not
    rows = []
    for label, pos in [("one document per row (causal)", None),
                       (f"packed, {sum(map(len, row_lengths)) / PACKED_BATCH:.1f} documents per row", position_ids)]:
        ms, gib = time_forward_backward(model, x, y, pos)
        rows.append([label, f"{PACKED_BATCH}x{BIG_SEQ}", f"{ms:.1f}", f"{gib:.2f}"])
    with capsys.disabled():
        print_table(f"c. packed row 0 vs each document alone ({PACKED_LAYERS}-layer bumblebee, bf16, "
                    f"{gpu_name()})", ["doc", "tokens", "loss alone", "loss packed", "|diff|",
                                       "logits rel err", "control: no mask"], doc_rows)
        print_table(f"c. forward + backward, {PACKED_LAYERS}-layer bumblebee-1.5b shape, bf16, kernels=triton",
                    ["attention", "batch", "ms", "peak GiB"], rows)
        print("gradient of row 0's summed loss, packed vs documents alone (relative error): "
              + ", ".join(f"{name} {err:.2e}" for name, err in grad_errors.items()))
    # bf16 noise only: ~1e-2 of the logits' size at hidden 1536 (measured on CPU bf16), while
    # attending across documents (the control) changes them by ~1
    assert max(packed_errors) < 5e-2, packed_errors
    assert max(packed_errors) * 5 < min(leak_errors), (packed_errors, leak_errors)
    assert max(loss_diffs) < 2e-2, loss_diffs
    assert max(grad_errors.values()) < GRAD_TOLERANCE, grad_errors


def training_step(model, optimizer, x, y) -> float:
    with autocast(DEVICE, BF16):
        loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # waits for the GPU


# ---------------------------------------------------------------------------------------------
# d. the tiny model trains the same with the Triton kernels and with plain torch
# ---------------------------------------------------------------------------------------------

def test_gpu_triton_matches_torch_training(capsys):
    cfg = ModelConfig(vocab_size=TINY_VOCAB, **PRESETS["tiny"])
    gen = torch.Generator().manual_seed(5)
    # two fixed batches, alternated: the model can learn them, so the loss moves
    data = torch.randint(0, cfg.vocab_size, (2, TINY_BATCH, TINY_SEQ + 1), generator=gen).to(DEVICE)
    losses = {}
    for kernels in ("triton", "torch"):
        model = Transformer(cfg).to(DEVICE)
        model.init_weights(0)
        model.kernels = kernels
        # 3e-4: the loss falls by ~2 in 30 steps, and trajectories that differ by rounding stay
        # within ~1e-3 of each other (at 1e-3 a 1e-6 nudge of the weights grows to ~3e-2)
        optimizer = build_optimizer(model, 3e-4, 0.1, (0.9, 0.95))
        losses[kernels] = []
        for step in range(TINY_STEPS):
            batch = data[step % 2]
            losses[kernels].append(training_step(model, optimizer, batch[:, :-1], batch[:, 1:]))
        del model, optimizer
    diffs = [abs(a - b) for a, b in zip(losses["triton"], losses["torch"])]
    rows = [[step + 1, f"{a:.4f}", f"{b:.4f}", f"{d:.2e}"]
            for step, (a, b, d) in enumerate(zip(losses["triton"], losses["torch"], diffs))
            if step < 3 or (step + 1) % 5 == 0]
    with capsys.disabled():
        print_table(f"d. tiny model, bf16 autocast, {TINY_BATCH}x{TINY_SEQ}, {gpu_name()}",
                    ["step", "loss triton", "loss torch", "|diff|"], rows)
        print(f"max |diff| over {TINY_STEPS} steps: {max(diffs):.2e}")
    assert all(math.isfinite(loss) for k in losses for loss in losses[k]), losses
    assert losses["torch"][-1] < losses["torch"][0] - 0.5, losses["torch"]
    assert diffs[0] < 5e-3, diffs  # the same weights and batch: forward rounding only
    assert max(diffs) < 2e-2, diffs


# ---------------------------------------------------------------------------------------------
# e. FSDP2 with the bf16 MixedPrecisionPolicy on NCCL, one rank
# ---------------------------------------------------------------------------------------------

FSDP_SCRIPT = textwrap.dedent('''
    """One rank (RANK=0, WORLD_SIZE=1, MASTER_ADDR/PORT set by the test): tiny model, kernels=triton,
    3 steps, sharded by FSDP2 with MixedPrecisionPolicy(bf16 params, fp32 reduce) and no autocast (as
    train_pretrain.py runs sharded), then unsharded under bf16 autocast; print both."""
    import json
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from nanobumble.base.precision import autocast
    from nanobumble.base.distributed import DistInfo, shard_model
    from nanobumble.model.transformer import PRESETS, ModelConfig, Transformer
    from nanobumble.run.optim import build_optimizer

    STEPS, BATCH, SEQ = 3, 8, 256


    def build(cfg, device, info):
        with torch.device("meta"):
            model = Transformer(cfg)
        if info is not None:
            shard_model(model, info, torch.bfloat16)
        model.to_empty(device=device)
        model.lm_head.weight = model.embed_tokens.weight  # to_empty can re-create parameters; tie again
        model.init_weights(0)
        model.kernels = "triton"
        return model


    def run(model, batches, device, compute_dtype):
        optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
        seen = []
        hook = model.layers[0].mlp.gate_proj.register_forward_hook(
            lambda module, args, out: seen.append([str(module.weight.dtype), str(out.dtype)]))
        losses, grad_dtypes = [], set()
        for x, y in batches:
            with autocast(device, compute_dtype):
                loss = model(x, y)
            loss.backward()
            grad_dtypes |= {str(p.grad.dtype) for p in model.parameters() if p.grad is not None}
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        hook.remove()
        return {"losses": losses, "forward_dtypes": seen[0], "grad_dtypes": sorted(grad_dtypes),
                "dtensor_params": all(isinstance(p, DTensor) for p in model.parameters())}


    def main():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        try:
            assert dist.get_world_size() == 1
            mesh = init_device_mesh("cuda", (1,))
            info = DistInfo(rank=0, local_rank=0, world_size=1, device=device, mesh=mesh)
            cfg = ModelConfig(vocab_size=4096, **PRESETS["tiny"])
            gen = torch.Generator().manual_seed(6)
            data = torch.randint(0, cfg.vocab_size, (STEPS, BATCH, SEQ + 1), generator=gen).to(device)
            batches = [(b[:, :-1], b[:, 1:]) for b in data]
            result = {"sharded": run(build(cfg, device, info), batches, device, torch.float32),
                      "plain": run(build(cfg, device, None), batches, device, torch.bfloat16)}
            dist.barrier()
        finally:
            dist.destroy_process_group()
        print("RESULT " + json.dumps(result), flush=True)


    if __name__ == "__main__":
        main()
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gpu_fsdp2_bf16_policy_one_rank(tmp_path, capsys):
    """The rank runs as a plain child process with torchrun's environment variables (one
    rank needs no launcher): on a timeout subprocess.run kills it, and nothing is left
    holding the GPU (torchrun would start the rank in a session of its own)."""
    script = tmp_path / "fsdp_one_rank.py"
    script.write_text(FSDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]),
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=FSDP_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    sharded, plain = out["sharded"], out["plain"]
    diffs = [abs(a - b) for a, b in zip(sharded["losses"], plain["losses"])]
    rows = [[step + 1, f"{a:.4f}", f"{b:.4f}", f"{d:.2e}"]
            for step, (a, b, d) in enumerate(zip(sharded["losses"], plain["losses"], diffs))]
    with capsys.disabled():
        print_table(f"e. FSDP2 bf16 policy, NCCL, 1 rank, tiny model, kernels=triton, {gpu_name()}",
                    ["step", "loss FSDP2 bf16", "loss autocast bf16", "|diff|"], rows)
        print(f"FSDP2: gate_proj ran with weight/output {sharded['forward_dtypes']}, grads {sharded['grad_dtypes']}, "
              f"DTensor parameters {sharded['dtensor_params']}; unsharded: {plain['forward_dtypes']}, "
              f"grads {plain['grad_dtypes']}")
    assert len(sharded["losses"]) == len(plain["losses"]) == 3
    # the policy applied: sharded parameters, gathered in bf16 for compute, fp32 gradients
    assert sharded["dtensor_params"] and not plain["dtensor_params"]
    assert sharded["forward_dtypes"] == ["torch.bfloat16", "torch.bfloat16"], sharded
    assert sharded["grad_dtypes"] == ["torch.float32"], sharded
    assert plain["forward_dtypes"] == ["torch.float32", "torch.bfloat16"], plain
    assert max(diffs) < 3e-2, (sharded["losses"], plain["losses"])
