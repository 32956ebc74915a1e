import math

import torch
import torch.nn.functional as F

from nanobumble.model.transformer import PRESETS, ModelConfig, Transformer
from nanobumble.store.model_dir import model_config_for


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=80,
               max_position_embeddings=64)
    cfg.update(overrides)
    return Transformer(ModelConfig(**cfg))


def test_bumblebee_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = Transformer(model_config_for("bumblebee-1.5b", 151936))
    assert model.config.vocab_size == 151936
    assert model.num_parameters() == 1_543_714_304  # Qwen2.5-1.5B: 1.54B
    assert model.lm_head.weight is model.embed_tokens.weight


def test_causality_future_tokens_do_not_change_earlier_logits():
    model = tiny().eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def reference_forward(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    """The same network written out naively in float64: explicit K/V head repeat,
    explicit causal mask, explicit rotation of (i, i + d/2) pairs."""
    cfg = model.config
    p = {k: v.double() for k, v in model.state_dict().items()}
    B, T = x.shape
    d, hd = cfg.hidden_size, cfg.head_dim

    def norm(h, w):
        return h / torch.sqrt((h * h).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    def rope(t):  # t: [B, H, T, hd]
        pos = torch.arange(T, dtype=torch.float64)
        inv = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = pos[:, None] * inv[None]
        c, s = ang.cos(), ang.sin()
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], -1)

    h = p["embed_tokens.weight"][x]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.num_layers):
        pre = f"layers.{i}."
        a = norm(h, p[pre + "input_layernorm.weight"])
        q = a @ p[pre + "self_attn.q_proj.weight"].T + p[pre + "self_attn.q_proj.bias"]
        k = a @ p[pre + "self_attn.k_proj.weight"].T + p[pre + "self_attn.k_proj.bias"]
        v = a @ p[pre + "self_attn.v_proj.weight"].T + p[pre + "self_attn.v_proj.bias"]
        q = rope(q.view(B, T, cfg.num_heads, hd).transpose(1, 2))
        k = rope(k.view(B, T, cfg.num_kv_heads, hd).transpose(1, 2))
        v = v.view(B, T, cfg.num_kv_heads, hd).transpose(1, 2)
        rep = cfg.num_heads // cfg.num_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        h = h + att.transpose(1, 2).reshape(B, T, d) @ p[pre + "self_attn.o_proj.weight"].T
        m = norm(h, p[pre + "post_attention_layernorm.weight"])
        gate = m @ p[pre + "mlp.gate_proj.weight"].T
        up = m @ p[pre + "mlp.up_proj.weight"].T
        h = h + (F.silu(gate) * up) @ p[pre + "mlp.down_proj.weight"].T
    return norm(h, p["norm.weight"]) @ p["embed_tokens.weight"].T


def test_forward_matches_naive_float64_reference():
    model = tiny()
    for param in model.parameters():  # move off the init values so biases and norms matter
        param.data.add_(0.05 * torch.randn_like(param))
    x = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        got = model(x).double()
    torch.testing.assert_close(got, reference_forward(model, x), rtol=1e-4, atol=1e-4)


def test_loss_with_targets_and_ignore_index():
    model = tiny()
    x = torch.randint(0, 97, (2, 10))
    y = torch.randint(0, 97, (2, 10))
    y[0, :4] = -100
    logits = model(x)
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    torch.testing.assert_close(model(x, y), expected)


def test_position_ids_shift_is_relative():
    # RoPE attention depends only on relative positions: shifting every position
    # by the same offset leaves the logits unchanged.
    model = tiny().eval()
    x = torch.randint(0, 97, (1, 12))
    pos = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(x, position_ids=pos), model(x, position_ids=pos + 30), rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    x = torch.randint(0, 97, (2, 16))
    grads = []
    for flag in (False, True):
        model = tiny()
        model.gradient_checkpointing = flag
        model(x, x).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_tiny_preset_is_a_few_million_parameters():
    model = Transformer(model_config_for("tiny", 4096))
    assert 1e6 < model.num_parameters() < 5e6
    assert set(PRESETS) >= {"tiny", "bumblebee-1.5b"}


def test_tiny_model_overfits_a_short_text():
    torch.manual_seed(0)
    model = tiny(vocab_size=32)
    seq = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4]])
    x, y = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model(x, y).item()
    for _ in range(150):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.0 and loss.item() < 0.05
    assert torch.equal(model(x).argmax(-1), y)


def test_triton_and_torch_kernels_give_the_same_loss_and_gradients():
    # Triton runs under the interpreter on CPU (tests/conftest.py), natively on CUDA.
    x = torch.randint(0, 97, (2, 16))
    y = torch.randint(0, 97, (2, 16))
    y[0, :5] = -100
    results = {}
    for backend in ("torch", "triton"):
        model = tiny()
        for param in model.parameters():  # off the init values, so norms and biases matter
            param.data.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
        model.kernels = backend
        loss = model(x, y)
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_row_gives_each_document_its_own_logits():
    # Two documents in one row, positions restarting at the second: every logit
    # equals the one from running that document alone.
    model = tiny().eval()
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    row = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        packed = model(row, position_ids=positions)
        torch.testing.assert_close(packed[:, :7], model(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[:, 7:], model(b), rtol=1e-5, atol=1e-5)
