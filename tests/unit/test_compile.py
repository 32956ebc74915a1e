"""Per-block torch.compile (Block.compile, what `compile: true` does) with fullgraph=True: a
graph break raises, so each test here fails if one comes back. Inductor compiles on the CPU
(a C++ compiler); the graph-break checks that need no kernels trace with backend="eager"
(dynamo only, seconds). The Triton kernels are not traced: inside a compiled block RMSNorm and
RoPE are the PyTorch math (Block.compile says why), which test_triton_kernels_... checks.
Evaluation and generation pad to attention.bucket_width, and the KV-cache path runs eagerly:
test_recompiles_stay_few_... counts the graphs dynamo compiles over batches of many widths."""

import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter
from torch.nn.attention.flex_attention import BlockMask

from nanobumble.evals.scoring import target_logprobs
from nanobumble.inference.batching import generate_batch
from nanobumble.inference.generation import Decoder, GenerationConfig, Sequence
from nanobumble.model import attention
from nanobumble.model.attention import bucket_width, document_attention_mask
from nanobumble.model.transformer import PRESETS, ModelConfig, Transformer

V = 97
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # compiled code, counters and the recompile limit start anew in every test
    yield
    torch._dynamo.reset()


def tiny(layers: int = 2, context: int = 64, kernels: str = "torch", compile_kwargs: dict | None = None):
    model = Transformer(ModelConfig(vocab_size=V, hidden_size=48, num_layers=layers, num_heads=6, num_kv_heads=2,
                                    intermediate_size=80, max_position_embeddings=context))
    with torch.no_grad():  # off the init values (seeded: every call makes the same model)
        g = torch.Generator().manual_seed(1)
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=g))
    model.kernels = kernels
    if compile_kwargs is not None:
        for block in model.layers:
            block.compile(**compile_kwargs)
    return model


def pretraining_rows(seed: int = 0, batch: int = 2, length: int = 32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (batch, length), generator=g)
    return x, torch.randint(0, V, (batch, length), generator=g), None


def packed_rows(seed: int = 0, batch: int = 2, length: int = 32):
    """Packed SFT rows: documents restarting at position 0, prompt targets ignored, a padding tail."""
    x, y, _ = pretraining_rows(seed, batch, length)
    position_ids = torch.cat([torch.arange(11), torch.arange(15), torch.arange(length - 26)]).expand(batch, length)
    y = y.clone()
    y[:, :4] = -100
    y[:, 11:16] = -100
    y[:, 26:] = -100
    return x, y, position_ids.contiguous()


def loss_and_grads(model, rows):
    x, y, position_ids = rows
    model.zero_grad()
    loss = model(x, y, position_ids=position_ids)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_grads(got: dict, want: dict, rtol: float = 1e-4, atol: float = 1e-6):
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


def test_bucket_width():
    assert [bucket_width(w, 2048) for w in (1, 16, 17, 100, 128, 129, 1500, 2048)] == \
        [16, 16, 32, 128, 128, 256, 2048, 2048]
    assert bucket_width(70, 100) == 100  # never past the context
    assert len({bucket_width(w, 2048) for w in range(1, 2049)}) == 8


def test_inductor_fullgraph_block_on_pretraining_and_packed_rows_equals_eager():
    """Loss and every gradient of the compiled model (inductor, fullgraph=True) equal eager's, on
    pretraining rows (causal SDPA) and packed SFT rows (the document mask; dense on CPU with
    gradients), with one graph for all layers and each kind of row."""
    eager = tiny(layers=3)
    counter = CompileCounter()

    def counting_inductor(gm, inputs):
        counter(gm, inputs)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, inputs)

    compiled = tiny(layers=3, compile_kwargs={"backend": counting_inductor})
    assert compiled.compiled and not eager.compiled
    for rows in (pretraining_rows(), packed_rows()):
        want_loss, want_grads = loss_and_grads(eager, rows)
        got_loss, got_grads = loss_and_grads(compiled, rows)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
        assert_same_grads(got_grads, want_grads)
    assert counter.frame_count == 2  # three layers, two kinds of row: two graphs


def train_losses(model, batches, steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    losses = []
    for step in range(steps):
        x, y, position_ids = batches(step)
        loss = model(x, y, position_ids=position_ids)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("rows", [pretraining_rows, pytest.param(packed_rows, marks=pytest.mark.slow)],
                         ids=["pretraining", "packed_sft"])
def test_fp32_losses_of_20_steps_match_eager(rows):
    """The issue's bar: fp32 losses within 1e-4 relative of eager's over 20 steps of a tiny model."""
    batches = [rows(seed) for seed in range(2)]  # two batches, in turn: the loss falls as they are learnt
    eager = train_losses(tiny(), lambda step: batches[step % 2], 20)
    compiled = train_losses(tiny(compile_kwargs={}), lambda step: batches[step % 2], 20)
    assert eager[-1] < eager[0] - 0.1  # it trains
    assert compiled == pytest.approx(eager, rel=1e-4)


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_inside_and_around_compiled_blocks(mode):
    """Selective checkpointing runs torch.utils.checkpoint inside the traced block (a graph break
    would raise); full wraps the compiled block. Gradients as eager's. (Dynamo only: backend eager.)"""
    eager, compiled = tiny(), tiny(compile_kwargs={"backend": "eager"})
    for model in (eager, compiled):
        model.gradient_checkpointing = mode
    for rows in (pretraining_rows(), packed_rows()):
        want_loss, want_grads = loss_and_grads(eager, rows)
        got_loss, got_grads = loss_and_grads(compiled, rows)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
        assert_same_grads(got_grads, want_grads, rtol=1e-5, atol=1e-7)


def test_flex_block_mask_branch_traces_in_one_graph():
    """Without gradients (evaluation; on CUDA always) packed rows attend through a flex_attention
    BlockMask: inside the compiled block flex_attention is traced into the graph, nothing is
    built or compiled there (before: the lazily compiled op and its warnings filter broke the graph)."""
    x, _, position_ids = packed_rows()
    with torch.no_grad():
        assert isinstance(document_attention_mask(position_ids), BlockMask)
        want = tiny().eval()(x, position_ids=position_ids)
        got = tiny(compile_kwargs={"backend": "eager"}).eval()(x, position_ids=position_ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="kernels=triton on CPU needs TRITON_INTERPRET=1 (conftest sets it)")
def test_triton_kernels_model_compiles_with_the_torch_math_inside_blocks(monkeypatch):
    """kernels=triton: the blocks compile (fullgraph) with the PyTorch RMSNorm and RoPE inside, the
    final norm keeps the Triton kernel (called once a forward); loss and gradients as the PyTorch
    path's (eager Triton itself is checked against it in test_model.py; under the interpreter it is slow)."""
    import nanobumble.kernels as kernels

    calls = []
    monkeypatch.setattr(kernels, "rms_norm", lambda *args: calls.append(1) or kernels.rmsnorm.rms_norm(*args))
    rows = packed_rows()
    want_loss, want_grads = loss_and_grads(tiny(kernels="torch"), rows)
    got_loss, got_grads = loss_and_grads(tiny(kernels="triton", compile_kwargs={"backend": "eager"}), rows)
    assert len(calls) == 1
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    assert_same_grads(got_grads, want_grads)


def test_recompiles_stay_few_across_evaluation_and_generation_widths():
    """Scoring rows of 12 lengths (batches of many widths), generating from prompts of 6 lengths
    (KV cache), and the no-cache reference decoder (a new width every step): at most 3 graphs in
    all, far below dynamo's recompile limit (8), past which a block would fall back to eager
    (before: the KV-cache path compiled again per layer and width, and hit the limit); compiled with
    dynamic=False, one graph per bucket of width."""
    counter = CompileCounter()
    model = tiny(layers=3, context=256, compile_kwargs={"backend": counter}).eval()
    eager = tiny(layers=3, context=256).eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in range(3, 200, 17):
        ids = torch.randint(0, V, (n + 1,), generator=g).tolist()
        rows.append((ids[:-1], ids[1:]))
    got = target_logprobs(model, rows, CPU, torch.float32, 3)
    want = target_logprobs(eager, rows, CPU, torch.float32, 3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    scoring = counter.frame_count
    cfg = GenerationConfig(max_new_tokens=4, do_sample=False, repetition_penalty=1.0)
    prompts = [ids[:4 + 7 * k] for k, (ids, _) in enumerate(rows[-6:])]  # 4 to 39 tokens
    outputs = generate_batch(model, prompts, cfg, vocab_size=V, max_batch=3)
    assert [ids for ids, _ in outputs] == [ids for ids, _ in generate_batch(eager, prompts, cfg, vocab_size=V)]
    decoder = Decoder(model, 2, use_cache=False)
    seqs = [Sequence(prompts[i], GenerationConfig(max_new_tokens=12, do_sample=False), (), V) for i in (1, 4)]
    decoder.add(seqs)
    while decoder.active:
        decoder.step()
    print(f"graphs: {scoring} scoring, {counter.frame_count} in all")
    assert counter.frame_count <= 3
    # Dynamo's automatic dynamic shapes alone would also compile once more for a second width; the
    # buckets are what bound a static compile (dynamic=False): 6 batches of 6 widths, 4 buckets.
    torch._dynamo.reset()  # the blocks' code starts a fresh cache (with fullgraph, past the limit raises)
    static = CompileCounter()
    target_logprobs(tiny(layers=3, context=256, compile_kwargs={"backend": static, "dynamic": False}).eval(),
                    rows, CPU, torch.float32, 2)
    assert static.frame_count == len({bucket_width(len(rows[-1 - 2 * i][0]), 256) for i in range(6)}) == 4


@pytest.mark.slow
def test_inductor_flex_attention_in_compiled_block():
    """The packed rows' flex path, compiled by inductor (its CPU flex kernel: ~30 s to compile),
    gives eager's logits; widths in buckets compile it once more at most."""
    eager, compiled = tiny().eval(), tiny(compile_kwargs={}).eval()
    with torch.no_grad():
        for length in (32, 64):
            x, _, position_ids = packed_rows(length=length)
            torch.testing.assert_close(compiled(x, position_ids=position_ids), eager(x, position_ids=position_ids),
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_block_masks_compile_once_without_the_deprecated_flag(monkeypatch, recwarn):
    """The CUDA branch of document_attention_mask, here on CPU: create_block_mask compiled once, as
    torch.compile(create_block_mask) (the _compile flag is deprecated), reused for the next row."""
    monkeypatch.setattr(attention, "compiles_flex", lambda device: True)
    monkeypatch.setattr(attention, "_compiled_block_mask", None)
    if not attention.compiled_create_block_mask_supported():
        pytest.skip("torch < 2.6: create_block_mask(_compile=True) is the way")
    _, _, position_ids = packed_rows(length=256)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        first = document_attention_mask(position_ids)
        builder = attention._compiled_block_mask
        second = document_attention_mask(position_ids.flip(-1).contiguous())  # a new rule: new tensors, closure
    assert attention._compiled_block_mask is builder is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # compiled once, not per mask
    assert not [w for w in recwarn if "_compile" in str(w.message)]
    monkeypatch.setattr(attention, "compiles_flex", lambda device: False)
    with torch.no_grad():  # the same masks as eager create_block_mask builds
        for got, rows in ((first, position_ids), (second, position_ids.flip(-1).contiguous())):
            assert torch.equal(got.to_dense(), document_attention_mask(rows).to_dense())


@pytest.mark.bench
def test_bench_compiled_vs_eager_step():
    """Forward + backward of the tiny preset (fp32, 4 x 256 tokens) eager and with compiled blocks,
    timed alternately in one process (best of 7 after 2 warm-up steps, which compile).
    OMP_NUM_THREADS=1 pytest -m bench -s tests/unit/test_compile.py"""
    import time

    from conftest import print_table

    cfg = ModelConfig(vocab_size=4096, **PRESETS["tiny"])
    models = {"eager": Transformer(cfg), "compiled": Transformer(cfg)}
    for block in models["compiled"].layers:
        block.compile()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 4096, (2, 4, 256), generator=g)
    starts = torch.tensor([0, 100, 180, 230])
    packed = (torch.arange(256) - starts[(torch.arange(256)[:, None] >= starts).sum(-1) - 1]).expand(4, 256)
    rows_kinds = {"pretraining": None, "packed SFT": packed.contiguous()}
    table = []
    for kind, position_ids in rows_kinds.items():
        times = {name: [] for name in models}

        def step(model):
            model.zero_grad()
            model(x, y, position_ids=position_ids).backward()

        first = {}
        for name, model in models.items():
            start = time.perf_counter()
            step(model)  # the compiled model compiles here
            first[name] = time.perf_counter() - start
            step(model)
        for _ in range(7):
            for name, model in models.items():
                start = time.perf_counter()
                step(model)
                times[name].append(time.perf_counter() - start)
        best = {name: min(t) for name, t in times.items()}
        table.append([kind, f"{best['eager'] * 1e3:.1f}", f"{best['compiled'] * 1e3:.1f}",
                      f"{best['eager'] / best['compiled']:.2f}x", f"{first['compiled']:.1f}"])
    print_table(f"tiny preset fwd+bwd, fp32, 4 x 256 tokens, CPU, {torch.get_num_threads()} threads",
                ["rows", "eager ms", "compiled ms", "speed-up", "first compiled step s"], table)
