"""MFU helpers: the peak-FLOPs table by exact device name, and the FLOPs count."""

import pytest
import torch
import torch.nn as nn

from nanobumble.model.mfu import device_peak_flops, peak_bf16_flops, training_flops_per_token
from nanobumble.model.transformer import PRESETS, ModelConfig, Transformer

T = 1e12

# Names exactly as torch.cuda.get_device_name() reports them; dense bf16 peaks.
DEVICE_NAMES = [
    ("NVIDIA H100 80GB HBM3", 989 * T),   # SXM
    ("NVIDIA H100 PCIe", 756 * T),
    ("NVIDIA H100 NVL", 835 * T),
    ("NVIDIA H200", 989 * T),             # SXM
    ("NVIDIA H200 NVL", 835 * T),
    ("NVIDIA GH200 480GB", 989 * T),
    ("NVIDIA A100-SXM4-80GB", 312 * T),
    ("NVIDIA A100-SXM4-40GB", 312 * T),
    ("NVIDIA A100-PCIE-40GB", 312 * T),
    ("NVIDIA A100 80GB PCIe", 312 * T),
    ("NVIDIA L40S", 362 * T),
    ("NVIDIA L40", 181 * T),
    ("NVIDIA L4", 121 * T),
    ("NVIDIA GeForce RTX 4090", 165 * T),
    ("NVIDIA B200", 2250 * T),
]


@pytest.mark.parametrize("name,peak", DEVICE_NAMES)
def test_peak_by_exact_device_name(name, peak):
    assert peak_bf16_flops(name) == peak
    assert peak_bf16_flops(name.lower()) == peak  # case does not matter


@pytest.mark.parametrize("name", ["NVIDIA H20", "NVIDIA A10", "NVIDIA A40", "NVIDIA GeForce RTX 3090",
                                  "Tesla V100-SXM2-16GB", "NVIDIA T4", "AMD Instinct MI300X", "", "cpu"])
def test_unknown_gpu_has_no_peak(name):
    assert peak_bf16_flops(name) is None


def test_a_training_run_looks_up_its_cuda_device_by_name(monkeypatch):
    # The CUDA branch, reached on a CPU machine with a stand-in H200.
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert device_peak_flops(torch.device("cuda", 0)) == 989 * T
    assert device_peak_flops(torch.device("cpu")) is None


def test_the_progress_line_reports_mfu_when_the_peak_is_known():
    from nanobumble.run.stage import Progress

    progress = Progress(10, flops_per_token=2e9, peak_flops=8e12)
    progress.add(2.0, 1000, **{"train/loss": 1.0})  # 500 tokens/s x 2 GFLOPs = 1 TFLOP/s of 8
    scalars, line = progress.report(1, 1e-3, 0.5)
    assert scalars["train/mfu"] == pytest.approx(0.125)
    assert "mfu 12.5%" in line
    progress = Progress(10)  # no peak (CPU, or a GPU not in the table): no MFU at all
    progress.add(2.0, 1000, **{"train/loss": 1.0})
    scalars, line = progress.report(1, 1e-3, 0.5)
    assert "train/mfu" not in scalars and "mfu" not in line


def test_flops_per_token_by_hand():
    # hidden 8, 2 layers, 2 query heads of 4, 1 K/V head, MLP 16, vocab 32, 10 tokens
    cfg = ModelConfig(vocab_size=32, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=16, max_position_embeddings=64)
    q, k, v, o = 8 * 8, 8 * 4, 8 * 4, 8 * 8
    mlp = 3 * 8 * 16
    per_layer = q + k + v + o + mlp  # 576
    lm_head = 32 * 8
    matmul_params = 2 * per_layer + lm_head  # 1408
    # per layer and token: QK^T and AV each 10 x 8 multiply-adds (2 FLOPs each) against
    # the whole sequence, x3 for forward + backward, halved by the causal mask
    attention = (2 * 10 * 8 + 2 * 10 * 8) * 3 // 2  # 480
    expected = 6 * matmul_params + 2 * attention  # two layers
    assert expected == 8448 + 960
    assert training_flops_per_token(cfg, 10) == expected


@pytest.mark.parametrize("preset", ["tiny", "bumblebee-1.5b"])
def test_flops_count_every_matmul_weight_of_the_model(preset):
    """The matmul parameters are exactly the model's nn.Linear weights (the tied LM head
    once, as a matmul), so 6 x their count + attention is the formula."""
    cfg = ModelConfig(vocab_size=151936 if preset != "tiny" else 4096, **PRESETS[preset])
    with torch.device("meta"):
        model = Transformer(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    seq = 2048
    assert training_flops_per_token(cfg, seq) == 6 * linear + 6 * cfg.num_layers * seq * cfg.hidden_size
    if preset == "bumblebee-1.5b":  # about 6 x 1.54B: ~9.3 GFLOPs per token plus attention
        assert 9.0e9 < training_flops_per_token(cfg, seq) < 10.5e9
