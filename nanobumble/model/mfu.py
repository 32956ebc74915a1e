"""Model FLOPs utilisation: achieved training FLOP/s over the GPU's peak."""

from __future__ import annotations

import re

import torch

from nanobumble.model.transformer import ModelConfig

# Dense (not 2:4 sparse) bf16 tensor-core peaks in FLOP/s, from the vendors' data
# sheets, for torch.cuda.get_device_name(). A row matches when every one of its words
# is a whole word of the device name (case-insensitive, "-" and "_" count as spaces:
# "NVIDIA A100-SXM4-80GB" has the words nvidia, a100, sxm4, 80gb). Rows are tried in
# order, the most specific first: "h100 nvl" before "h100", which is the SXM part
# ("NVIDIA H100 80GB HBM3"). Whole words keep "GH200" from matching "h200", "L40S"
# from matching "l4" and "H20" from matching anything.
PEAK_BF16_FLOPS = [
    ("gh200", 989e12),          # NVIDIA GH200 480GB: the H100/H200 SXM tensor cores
    ("gb200", 2500e12),         # per Blackwell GPU of a GB200 superchip
    ("h200 nvl", 835e12),       # NVIDIA H200 NVL: lower clocks and power than the SXM part
    ("h200", 989e12),           # NVIDIA H200 (SXM)
    ("h100 nvl", 835e12),       # NVIDIA H100 NVL
    ("h100 pcie", 756e12),      # NVIDIA H100 PCIe
    ("h100", 989e12),           # NVIDIA H100 80GB HBM3 (SXM)
    ("h800 pcie", 756e12),
    ("h800", 989e12),
    ("b200", 2250e12),          # NVIDIA B200 (HGX)
    ("a100", 312e12),           # SXM4 and PCIe alike
    ("a800", 312e12),
    ("l40s", 362e12),
    ("l40", 181e12),
    ("l4", 121e12),
    ("rtx 4090", 165e12),       # GeForce RTX 4090, fp32 accumulation
]


def _words(name: str) -> list[str]:
    return re.split(r"[\s\-_]+", name.lower().strip())


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak of the GPU named device_name (as torch.cuda.get_device_name()
    gives it), or None when it is not in the table: better no MFU than a wrong one."""
    words = set(_words(device_name))
    for key, flops in PEAK_BF16_FLOPS:
        if all(word in words for word in key.split()):
            return flops
    return None


def device_peak_flops(device: torch.device) -> float | None:
    """peak_bf16_flops of a CUDA device by its name; None on any other device."""
    return peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 FLOPs per parameter per token (forward + backward) for the matrix
    multiplies, plus causal attention's QK^T and AV: 6 * layers * seq * hidden
    (12 * L * T * d halved by the causal mask). Embedding lookups are free."""
    return 6.0 * matmul_parameters(cfg) + 6.0 * cfg.num_layers * seq_len * cfg.hidden_size


# SFT and DPO rows hold documents of different lengths, some of them padding, so
# their FLOPs are counted per document, on real tokens only. The convention is
# training_flops_per_token's: 2 FLOPs per multiply-add of a matrix multiply,
# forward 2 per parameter per token, backward 4 (gradients of the inputs and of
# the weights); causal attention's QK^T and AV cost 2 * layers * t * hidden per
# token forward in a document of t tokens (a token attends to t / 2 on average),
# 6 * layers * t * hidden forward + backward. Recomputation (activation
# checkpointing) and padding are not counted: this is model FLOPs, not hardware FLOPs.


def matmul_parameters(cfg: ModelConfig) -> int:
    """Weights that multiply every token: the projections and the LM head (not the embedding lookup)."""
    d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * cfg.intermediate_size  # q, o, k, v, MLP
    return cfg.num_layers * per_layer + cfg.vocab_size * d


def document_flops(cfg: ModelConfig, lengths, backward: bool = True, frozen_base: bool = False,
                   adapter_params: int = 0) -> float:
    """FLOPs of one pass over documents of these lengths (real tokens each).

    backward=False: the forward alone (DPO's reference), 2 per parameter per token
    and 2 * layers * t * hidden of attention. backward=True: forward and backward,
    6 per parameter per token; with frozen_base (LoRA) the frozen weights get no
    weight gradient, so 4 per base parameter per token, and the adapter_params
    (trainable) 6. Attention's backward is needed either way (gradients reach
    the adapters through it): 6 * layers * t * hidden. For one document of
    cutoff_len tokens, full training gives cutoff_len * training_flops_per_token."""
    lengths = [int(t) for t in lengths]
    tokens, squares = sum(lengths), sum(t * t for t in lengths)
    attention = cfg.num_layers * cfg.hidden_size * squares  # per unit of the factor below
    params = matmul_parameters(cfg)
    if not backward:
        return 2.0 * params * tokens + 2.0 * attention
    per_param = 4.0 if frozen_base else 6.0
    return per_param * params * tokens + 6.0 * adapter_params * tokens + 6.0 * attention
