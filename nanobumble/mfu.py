"""Model FLOPs utilisation: achieved training FLOP/s over the GPU's peak."""

from __future__ import annotations

from .model import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched
# against torch.cuda.get_device_name(). Longer names first: "H100 PCIe" before "H100".
PEAK_BF16_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
]


def peak_bf16_flops(device_name: str) -> float | None:
    """None when the GPU is not in the table: better no MFU than a wrong one."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 FLOPs per parameter per token (forward + backward) for the matrix
    multiplies, plus causal attention's QK^T and AV: 6 * layers * seq * hidden
    (12 * L * T * d halved by the causal mask). Embedding lookups are free."""
    d, L = cfg.hidden_size, cfg.num_layers
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * cfg.intermediate_size  # q, o, k, v, MLP
    matmul_params = L * per_layer + cfg.vocab_size * d  # + LM head
    return 6.0 * matmul_params + 6.0 * L * seq_len * d
