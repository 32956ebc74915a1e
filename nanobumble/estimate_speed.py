"""Estimated tokens/s and MFU of a training config on a GPU class, on paper (no GPU needed).

    python -m nanobumble.estimate_speed --yaml_config configs/pretrain/pretrain_full.yaml --device h100
    python -m nanobumble.estimate_speed --yaml_config configs/sft/sft_1.5b_80gb.yaml --device h100 --doc_tokens 400

    python -m nanobumble.estimate_speed --recipes       # the recipes' table (README "Speed on a GPU")

Any training key may follow as an override (--compile true, --enable_gradient_checkpointing false, ...).
Own keys: --device h100 | h200, --stage auto | pretrain | sft | dpo (auto: the YAML's folder, else its
keys), --model (a preset, when model_name_or_path is a directory not here; default bumblebee-1.5b),
--doc_tokens (mean conversation length in tokens for SFT / DPO rows; default 400 SFT, 600 DPO).

The step time is a sum of terms, each a count divided by an achieved rate:

  GEMMs          matmul FLOPs (model + recomputed) / (GEMM_EFFICIENCY x bf16 dense peak)
  attention      QK^T and AV FLOPs (causal: half of 4 T H per layer forward) / (ATTENTION_EFFICIENCY x peak)
  memory-bound   bytes of the elementwise kernels (RMSNorm, RoPE, SwiGLU, autocast casts and gradient sums,
                 residual adds, cross entropy, embedding) / (MEMORY_EFFICIENCY x HBM bandwidth),
                 eager or fused by per-block torch.compile, recomputed ones counted again
  per micro-step the weights' bf16 copies and the fp32 gradient accumulation (bytes per parameter)
  per step       AdamW + clipping (bytes per parameter), divided by gradient_accumulation_steps

MFU counts model FLOPs only (the convention of nanobumble/model/mfu.py): 6 per matmul parameter per
token (4 for a frozen LoRA base weight), the LM head included and the embedding lookup not, plus causal
attention 6 L T H per token (12 L T H halved by the mask); recomputation and padding are not model FLOPs.
A device's measurement (`pytest -m gpu -s`) replaces these numbers where it exists.
"""

from __future__ import annotations

import dataclasses
import inspect
import os

import torch

from nanobumble.base.errors import ConfigError, UserError, run_cli
from nanobumble.model.lm_loss import default_chunk_size
from nanobumble.model.mfu import document_flops, matmul_parameters
from nanobumble.model.transformer import PRESETS, ModelConfig, pad_vocab_size
from nanobumble.run.config import DPOConfig, PretrainConfig, SFTConfig, parse_config
from nanobumble.run.memory import plan_for_config
from nanobumble.store.model_dir import load_model_config


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float     # dense bf16 tensor-core FLOP/s (data sheet; nanobumble/model/mfu.py's table)
    bandwidth: float      # HBM bytes/s (data sheet)
    memory_bytes: int     # what torch.cuda.mem_get_info reports as total


DEVICES = {
    "h100": Device("H100 80GB SXM", 989e12, 3.35e12, int(79.1 * 2**30)),
    "h200": Device("H200 141GB SXM", 989e12, 4.8e12, int(139.8 * 2**30)),
}

# Achieved fractions (assumptions, stated in the output). GEMMs: cuBLAS reaches ~70-75% of the H100's
# dense bf16 peak on large square bf16 matmuls; this model's are thinner (K = 1536, the 256-wide K/V
# projections, the LM head's 832-row chunks), so 0.65. Whole-step figures bound it: torchtitan reports
# ~33% MFU eager and ~39% compiled for Llama-3 8B on H100s (with FSDP communication), nanochat 40-46%
# for its ~0.5-1B models on H100s (compiled, no recompute).
GEMM_EFFICIENCY = 0.65
# SDPA's flash backend (FlashAttention-2) forward + backward at head_dim 128, causal, 2k tokens: ~300-330
# TFLOP/s on an H100 in FlashAttention-3's paper (FA3 reaches ~75% of peak; SDPA does not ship it).
ATTENTION_EFFICIENCY = 0.33
FLEX_EFFICIENCY = 0.28  # flex_attention with a block mask: ~85% of FlashAttention-2 in PyTorch's post
FLEX_BLOCK = 128        # flex's mask blocks: a document's partial blocks are computed whole
# Elementwise kernels stream at ~75-80% of HBM bandwidth when large (a 16k x 1536 bf16 tensor is 50 MB).
MEMORY_EFFICIENCY = 0.75
# Per parameter per micro-step: weight -> bf16 copy (read 4, write 2) per forward pass; the gradient
# made in bf16, cast to fp32 and added to .grad (2 + 4 + 4 + 4 + 4).
CAST_BYTES, GRAD_BYTES = 6, 18
# Per trainable parameter per optimizer step: AdamW reads p, g, m, v and writes p, m, v (28);
# clipping reads g for the norm and scales it (12).
OPTIMIZER_BYTES = 40
DOC_TOKENS = {"sft": 400, "dpo": 600}  # default mean conversation length (Alpaca-like SFT, ShareGPT pairs)
STAGES = {"pretrain": PretrainConfig, "sft": SFTConfig, "dpo": DPOConfig}
OWN_KEYS = {"device": "h100", "stage": "auto", "model": "", "doc_tokens": ""}
# The recipes per device class (README "Speed on a GPU"; --recipes prints their table), and the
# shipped pretraining config as it ran before one-rank FSDP2 (autocast over fp32 weights) and now.
RECIPES = [("configs/pretrain/pretrain_full.yaml", "h100", ["--single_process_fsdp", "false"]),
           ("configs/pretrain/pretrain_full.yaml", "h100", []),
           ("configs/pretrain/pretrain_1.5b_80gb.yaml", "h100", []),
           ("configs/pretrain/pretrain_full.yaml", "h200", ["--single_process_fsdp", "false"]),
           ("configs/pretrain/pretrain_1.5b_141gb.yaml", "h200", []),
           ("configs/sft/sft_1.5b_80gb.yaml", "h100", []), ("configs/sft/sft_1.5b_141gb.yaml", "h200", []),
           ("configs/dpo/dpo_lora_1.5b_80gb.yaml", "h100", []), ("configs/dpo/dpo_lora_1.5b_80gb.yaml", "h200", []),
           ("configs/dpo/dpo_full_1.5b_80gb.yaml", "h100", []), ("configs/dpo/dpo_full_1.5b_80gb.yaml", "h200", [])]


@dataclasses.dataclass
class Setup:
    """What the estimate depends on, resolved from a training config."""
    model: ModelConfig
    stage: str = "pretrain"
    micro_batch: int = 8
    seq_len: int = 2048
    accumulation: int = 1
    checkpointing: str = "none"       # none | selective | full
    compiled: bool = False
    bf16_params: bool = False         # FSDP2 (one-rank mesh or N ranks): bf16 params, no autocast casts
    triton: bool = True               # kernels: Triton RMSNorm / RoPE / cross entropy (else torch math)
    lora_rank: int = 0                # > 0: LoRA on every linear of the blocks, frozen base
    reference_forward: bool = False   # DPO: the reference model's forward each micro-step
    doc_tokens: int = 0               # mean document length (SFT / DPO); 0: rows are whole windows
    packing: bool = False
    free_bytes: int | None = None     # device memory the memory plan leaves free (sizes the LM head's chunks)


@dataclasses.dataclass
class Estimate:
    setup: Setup
    device: Device
    terms: dict            # name -> seconds per micro-step
    basis: dict            # name -> what it counts
    model_flops: float     # per micro-step (real tokens only)
    hardware_flops: float  # matmul + attention FLOPs run per micro-step, recompute and padding included
    real_tokens: float     # per micro-step
    computed_tokens: int   # per micro-step (padding included)

    @property
    def step_seconds(self) -> float:
        return sum(self.terms.values())

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.step_seconds

    @property
    def mfu(self) -> float:
        return self.model_flops / self.step_seconds / self.device.peak_flops


def row_width(setup: Setup, rows: int) -> int:
    """Tokens per row. Pretraining and packed rows: cutoff_len. Padded rows are as wide as the
    longest document of their micro-batch: with lengths spread exponentially, the longest of n
    is ~ mean x (1 + 1/2 + ... + 1/n), at most cutoff_len."""
    if not setup.doc_tokens or setup.packing:
        return setup.seq_len
    longest = setup.doc_tokens * sum(1 / k for k in range(1, rows + 1))
    return int(min(setup.seq_len, max(setup.doc_tokens, round(longest))))


def real_fraction(setup: Setup, rows: int) -> float:
    """Share of the computed tokens that are real. Packed rows waste about half a conversation
    at each row's end (greedy packing, never split); a padded row holds one document."""
    if not setup.doc_tokens:
        return 1.0
    if setup.packing:
        return max(0.05, 1 - setup.doc_tokens / (2 * setup.seq_len))
    return min(1.0, setup.doc_tokens / row_width(setup, rows))


def block_bytes(setup: Setup) -> dict[str, tuple[float, float]]:
    """Memory-bound bytes per token per block, (forward, backward), by term. a: activation bytes (bf16),
    r: the residual stream's (fp32 under autocast over fp32 weights, bf16 with bf16 parameters)."""
    cfg = setup.model
    H, K, I = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    a = 2
    autocast = not setup.bf16_params
    r = 4 if autocast else a
    fused = setup.compiled
    # RMSNorm x2: the Triton kernel reads x and writes y (fwd), reads x, dy, writes dx (bwd);
    # torch math in eager runs ~5 fp32 passes forward, twice that backward.
    if setup.triton or fused:
        norm = (2 * 2 * r * H, 2 * 3 * r * H)
    else:
        norm = (2 * 5 * 4 * H * 2, 2 * 10 * 4 * H * 2)
    # RoPE on q and k: read and write each (the Triton kernel; torch math ~3x that).
    rope_once = 2 * a * (H + K)
    rope = (rope_once, rope_once) if setup.triton or fused else (3 * rope_once, 3 * rope_once)
    # SwiGLU silu(gate) * up: eager silu (read, write) + mul (read 2, write) = 5 aI forward; backward
    # the mul's two grads (read 3, write 2) + silu's (read 2, write 1) = 8 aI. Fused: read gate, up and
    # write the product (3); backward read dprod, gate, up, write dgate, dup (5).
    swiglu = (3 * a * I, 5 * a * I) if fused else (5 * a * I, 8 * a * I)
    # Autocast casts the normed fp32 activations to bf16 at each of q, k, v, gate, up (5 casts, read r
    # write a); backward casts each input grad back (read a, write r). Compiled: one cast per norm (CSE)
    # and the backward casts fused into the gradient sums below.
    if not autocast:
        casts = (0, 0)
    elif fused:
        casts = (2 * (r + a) * H, 0)
    else:
        casts = (5 * (r + a) * H, 5 * (a + r) * H)
    # Gradient sums: the normed activation's grad is the sum of its 3 (attention) and 2 (MLP) linears'
    # input grads, 3 adds of (read 2, write 1) in r bytes; fused, one kernel per norm reads them (in a)
    # and writes the sum once. Bias grads of q, k, v (a reduction read) come with them.
    bias = a * (H + 2 * K) if cfg.qkv_bias else 0
    sums = (0, (5 * a + 2 * r) * H + bias) if fused else (0, 3 * 3 * r * H + bias)
    # Residual adds x2: read x (r) and the branch (a), write x (r); backward: x's grad is the sum of the
    # skip and the norm's dx (read 2, write 1), and the branch's grad is cast to a where r != a.
    residual = (2 * (2 * r + a) * H, 2 * 3 * r * H + (2 * (r + a) * H if r != a else 0))
    terms = {"RMSNorm": norm, "RoPE": rope, "SwiGLU": swiglu, "autocast casts": casts,
             "gradient sums": sums, "residual adds": residual}
    if setup.lora_rank:  # per adapted linear: dropout (read, write, mask), x A^T, B's output added
        rank = setup.lora_rank
        dims = [(H, H), (H, K), (H, K), (H, H), (H, I), (H, I), (I, H)]
        fwd = sum((3 * a + 1) * d_in + a * rank + 3 * a * d_out for d_in, d_out in dims)
        terms["LoRA adapters"] = (fwd, 2 * fwd)
    return terms


def estimate(setup: Setup, device: Device) -> Estimate:
    cfg = setup.model
    H, L, V = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    rows = setup.micro_batch * (2 if setup.stage == "dpo" else 1)
    computed = rows * row_width(setup, rows)
    real = computed * real_fraction(setup, rows)
    doc = setup.doc_tokens or setup.seq_len  # a token attends to doc / 2 tokens on average
    n_docs = real / doc
    lengths = [doc] * max(1, round(n_docs))
    scale = n_docs / len(lengths)  # document_flops counts whole documents; scale to the real tokens

    params = matmul_parameters(cfg)
    block_params = params - V * H
    adapter = 0
    if setup.lora_rank:
        K, I = cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        dims = [(H, H), (H, K), (H, K), (H, H), (H, I), (H, I), (I, H)]
        adapter = L * sum(setup.lora_rank * (i + o) for i, o in dims)
    lora = setup.lora_rank > 0
    model_flops = scale * document_flops(cfg, lengths, backward=True, frozen_base=lora, adapter_params=adapter)
    if setup.reference_forward:  # DPO: the reference's forward is model FLOPs too (mfu.py's convention)
        model_flops += scale * document_flops(cfg, lengths, backward=False)

    # Hardware FLOPs: matmuls on every computed token (padding included), attention on the real ones
    # (flex skips padding and other documents' blocks, but computes partial blocks whole).
    per_param = 4 if lora else 6
    matmul = (per_param * params + 6 * adapter) * computed
    forward_block_matmul = 2 * (block_params + adapter) * computed
    recompute_fraction = {"none": 0.0, "full": 1.0}.get(setup.checkpointing)
    if recompute_fraction is None:  # selective: the MLP sublayer's share of a block's matmuls
        mlp = 3 * H * cfg.intermediate_size
        recompute_fraction = mlp / (block_params / L)
    recompute_matmul = recompute_fraction * forward_block_matmul
    if setup.reference_forward:
        matmul += 2 * params * computed
    attention_model = 6 * L * H * doc * real  # fwd + bwd, causal halved
    flex = setup.doc_tokens > 0
    attention = attention_model * (1 + FLEX_BLOCK / doc if flex else 1)
    attention += attention / 3 * (1.0 if setup.checkpointing == "full" else 0.0)  # recomputed forward
    if setup.reference_forward:
        attention += attention_model / 3 * (1 + FLEX_BLOCK / doc if flex else 1)
    attention_rate = (FLEX_EFFICIENCY if flex else ATTENTION_EFFICIENCY) * device.peak_flops
    gemm_rate = GEMM_EFFICIENCY * device.peak_flops
    bandwidth = MEMORY_EFFICIENCY * device.bandwidth

    terms, basis = {}, {}
    terms["GEMMs (model)"] = matmul / gemm_rate
    basis["GEMMs (model)"] = f"{matmul / computed / 1e9:.2f} GFLOP/token at {GEMM_EFFICIENCY:.0%} of peak"
    terms["GEMMs (recompute)"] = recompute_matmul / gemm_rate
    basis["GEMMs (recompute)"] = f"checkpointing {setup.checkpointing}: {recompute_fraction:.0%} of the blocks' fwd"
    terms["attention"] = attention / attention_rate
    basis["attention"] = (f"{'flex' if flex else 'SDPA flash'} at {attention_rate / device.peak_flops:.0%} of peak"
                          + (", recompute incl." if setup.checkpointing == "full" else ""))
    # Recomputed elementwise work: full reruns the block's forward, selective the MLP sublayer's
    # (its norm, SwiGLU, the casts at gate / up and the residual add).
    mlp_share = {"RMSNorm": 0.5, "SwiGLU": 1.0, "autocast casts": 0.4, "residual adds": 0.5, "LoRA adapters": 3 / 7}
    for name, (fwd, bwd) in block_bytes(setup).items():
        passes = fwd + bwd
        if setup.checkpointing == "full":
            passes += fwd
        elif setup.checkpointing == "selective":
            passes += fwd * mlp_share.get(name, 0.0)
        if setup.reference_forward:
            passes += fwd if name != "LoRA adapters" else 0
        terms[name] = L * passes * computed / bandwidth
        basis[name] = f"{L * passes / 1e6:.2f} MB/token"
    # Cross entropy: the kernel reads a chunk's logits and writes their gradient in place (2 aV per
    # token; the torch path adds its fp32 working copy); the weight's fp32 gradient [V, H] is read and
    # written once per chunk (the chunks' dW summed into it).
    backend = "triton" if setup.triton else "torch"
    if setup.free_bytes is not None and "free_bytes" in inspect.signature(default_chunk_size).parameters:
        chunk = default_chunk_size(computed, V, torch.bfloat16, backend, free_bytes=setup.free_bytes)
    else:  # fixed chunks (a lm_loss without free-memory chunks)
        chunk = default_chunk_size(computed, V, torch.bfloat16, backend)
    ce = 2 * 2 * V + (2 * 4 * V if not setup.triton else 0)
    trains_head = not lora
    lm_grad = 2 * 4 * V * H / chunk if trains_head else 0
    final_norm = 5 * (4 if not setup.bf16_params else 2) * H
    terms["cross entropy + LM head dW"] = (ce + lm_grad + final_norm) * computed / bandwidth
    basis["cross entropy + LM head dW"] = f"{(ce + lm_grad) / 1e6:.2f} MB/token, {chunk}-row chunks"
    # Embedding: the gather (write r H), and in backward a dense [V, H] fp32 gradient zeroed and
    # scattered into, then added to .grad (per micro-step).
    emb = 2 * 4 * H * computed + (4 * 4 * V * H if trains_head else 0)
    terms["embedding"] = emb / bandwidth
    basis["embedding"] = "gather + dense [V, H] grad per micro-step"
    # Weights per micro-step: bf16 copies per forward pass (autocast casts them, FSDP2 gathers them for
    # the forward and again for the backward); gradients cast and accumulated in fp32.
    trainable = adapter if lora else params
    passes = 2 if setup.bf16_params else 1 + (1 if setup.checkpointing != "none" else 0)
    frozen_bf16 = lora and setup.stage == "dpo"  # DPO-LoRA keeps its frozen weights in bf16
    weight_bytes = (0 if frozen_bf16 and not setup.bf16_params else CAST_BYTES * params * passes)
    weight_bytes += GRAD_BYTES * trainable
    terms["weights per micro-step"] = weight_bytes / bandwidth
    basis["weights per micro-step"] = f"bf16 copies x{passes}, fp32 grad accumulation"
    terms["optimizer per step"] = OPTIMIZER_BYTES * trainable / setup.accumulation / bandwidth
    basis["optimizer per step"] = f"AdamW + clip, / {setup.accumulation} micro-steps"
    hardware = matmul + recompute_matmul + attention
    return Estimate(setup, device, terms, basis, model_flops, hardware, real, computed)


# ---------------------------------------------------------------------------------------------
# The command line


def _split_own_keys(argv: list[str]) -> tuple[dict, list[str]]:
    own, rest, i = dict(OWN_KEYS), [], 0
    while i < len(argv):
        word = argv[i]
        key, eq, value = word[2:].partition("=") if word.startswith("--") else ("", "", "")
        if key in OWN_KEYS:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"command line: --{key} needs a value")
                value, i = argv[i + 1], i + 1
            own[key] = value
        else:
            rest.append(word)
        i += 1
    return own, rest


def _stage_of(own: dict, rest: list[str]) -> str:
    if own["stage"] != "auto":
        if own["stage"] not in STAGES:
            raise ConfigError(f"key 'stage' must be one of auto, {', '.join(STAGES)}, got {own['stage']!r}")
        return own["stage"]
    path = next((rest[i + 1] for i, w in enumerate(rest[:-1]) if w == "--yaml_config"), "")
    path = path or next((w.split("=", 1)[1] for w in rest if w.startswith("--yaml_config=")), "")
    folder = os.path.basename(os.path.dirname(os.path.abspath(path))) if path else ""
    if folder in STAGES:
        return folder
    text = open(path, encoding="utf-8").read() if path and os.path.isfile(path) else ""
    if "pref_" in text:
        return "dpo"
    return "sft" if "finetuning_type" in text or "packing" in text else "pretrain"


def memory_plan(cfg, model_cfg: ModelConfig, device: Device, checkpointing: str, bf16_params: bool):
    """run/memory.py's plan of this config on one GPU of the class (its FSDP2 mixed precision where it has it)."""
    backend = "torch" if cfg.kernels == "torch" else "triton"
    extra = {"fsdp": bf16_params} if "fsdp" in inspect.signature(plan_for_config).parameters else {}
    return plan_for_config(cfg, model_cfg, 1, torch.bfloat16, "cuda", backend, checkpointing, device.memory_bytes,
                           **extra)


def setup_for_config(cfg, model_cfg: ModelConfig, device: Device, doc_tokens: int = 0):
    """The Setup a training config runs with on one GPU of this class, and its memory plan
    (enable_gradient_checkpointing auto: the cheapest mode whose plan fits, as the run chooses)."""
    if cfg.train_model_precision == "fp32":
        raise UserError("key 'train_model_precision': the estimate models bf16 training (auto or bf16), got fp32")
    bf16_params = getattr(cfg, "single_process_fsdp", "false") in ("auto", "true")
    checkpointing = cfg.enable_gradient_checkpointing
    modes = ["none", "selective", "full"] if checkpointing == "auto" else [
        {"true": "full", "false": "none"}.get(checkpointing, checkpointing)]
    plans = [memory_plan(cfg, model_cfg, device, mode, bf16_params) for mode in modes]
    plan = next((p for p in plans if p.fits()), plans[-1])
    stage = cfg.stage
    lora = getattr(cfg, "finetuning_type", "full") == "lora"
    setup = Setup(model=model_cfg, stage=stage, micro_batch=cfg.train_micro_batch_size_per_gpu,
                  seq_len=cfg.cutoff_len, accumulation=cfg.gradient_accumulation_steps,
                  checkpointing=plan.checkpointing, compiled=cfg.compile, bf16_params=bf16_params,
                  triton=cfg.kernels != "torch", lora_rank=cfg.lora_rank if lora else 0,
                  reference_forward=stage == "dpo" and not cfg.precompute_ref_log_probs,
                  doc_tokens=(doc_tokens or DOC_TOKENS[stage]) if stage != "pretrain" else 0,
                  packing=bool(getattr(cfg, "packing", False)),
                  free_bytes=max(0, device.memory_bytes - plan.total))
    return setup, plan


def changes(cfg, setup: Setup, device: Device) -> list[tuple[str, Estimate, bool]]:
    """The config's estimate with one setting changed at a time: (what, estimate, plan fits)."""
    out = []
    for mode in ("none", "selective", "full"):
        if mode != setup.checkpointing:
            fits = memory_plan(cfg, setup.model, device, mode, setup.bf16_params).fits()
            out.append((f"checkpointing {mode}", estimate(dataclasses.replace(setup, checkpointing=mode), device),
                        fits))
    plan_fits = memory_plan(cfg, setup.model, device, setup.checkpointing, not setup.bf16_params).fits()
    out.append(("autocast over fp32 weights (single_process_fsdp false)" if setup.bf16_params else
                "bf16 parameters (single_process_fsdp auto)",
                estimate(dataclasses.replace(setup, bf16_params=not setup.bf16_params), device), plan_fits))
    out.append((f"compile {'false' if setup.compiled else 'true'}",
                estimate(dataclasses.replace(setup, compiled=not setup.compiled), device), True))
    return out


def model_config_of(cfg, preset: str) -> tuple[ModelConfig, str]:
    vocab = getattr(cfg, "vocab_size", 151936)
    name = preset or cfg.model_name_or_path
    if name in PRESETS:
        return ModelConfig(vocab_size=pad_vocab_size(vocab), **PRESETS[name]), name
    if not preset and os.path.isfile(os.path.join(name, "config.json")):
        return load_model_config(os.path.join(name, "config.json")), name
    if preset:
        raise ConfigError(f"key 'model': {preset!r} is not a preset ({', '.join(PRESETS)})")
    return ModelConfig(vocab_size=151936, **PRESETS["bumblebee-1.5b"]), (
        f"bumblebee-1.5b (model_name_or_path {name!r} is not here; --model to choose)")


def flop_convention(cfg: ModelConfig, setup: Setup) -> str:
    return (f"FLOP convention: model FLOPs = 6 x {matmul_parameters(cfg) / 1e9:.3f}B matmul parameters per token "
            f"(blocks + LM head, not the embedding lookup; a frozen LoRA base weight 4) + causal attention "
            f"6 L T H per token (12 L T H halved by the mask; T = the document for SFT / DPO); recompute and "
            f"padding are overhead, not model FLOPs; MFU over the {DEVICES_PEAK_NOTE}")


DEVICES_PEAK_NOTE = "dense bf16 peak (989 TFLOP/s on H100 / H200 SXM)"


def report(est: Estimate, plan, label: str, model_name: str, variants=()) -> str:
    s, d = est.setup, est.device
    total = est.step_seconds
    width = max(len(k) for k in est.terms)
    lines = [f"speed estimate: {label} on {d.name} ({d.peak_flops / 1e12:.0f} TFLOP/s bf16 dense, "
             f"{d.bandwidth / 1e12:.2f} TB/s), on paper",
             f"model {model_name}: {matmul_parameters(s.model) / 1e9:.2f}B matmul parameters; stage {s.stage}, "
             f"micro {s.micro_batch} x {s.seq_len}, accumulation {s.accumulation}, checkpointing {s.checkpointing}, "
             f"{'compiled blocks' if s.compiled else 'eager'}, "
             f"{'bf16 parameters (FSDP2)' if s.bf16_params else 'autocast over fp32 weights'}, "
             f"kernels {'triton' if s.triton else 'torch'}"
             + (f", LoRA rank {s.lora_rank}" if s.lora_rank else "")
             + (f", documents of ~{s.doc_tokens} tokens {'packed' if s.packing else 'padded'}" if s.doc_tokens else ""),
             flop_convention(s.model, s),
             f"assumed: GEMMs at {GEMM_EFFICIENCY:.0%} of peak, attention {ATTENTION_EFFICIENCY:.0%} (flex "
             f"{FLEX_EFFICIENCY:.0%}), elementwise at {MEMORY_EFFICIENCY:.0%} of HBM bandwidth "
             f"(see the module's comments for why)",
             f"  {'term':<{width}}  ms/micro-step   share   basis"]
    for name, seconds in est.terms.items():
        lines.append(f"  {name:<{width}}  {1000 * seconds:13.2f}  {100 * seconds / total:5.1f}%   {est.basis[name]}")
    lines.append(f"  {'total':<{width}}  {1000 * total:13.2f}")
    tokens = (f"{est.tokens_per_second:,.0f} real tokens/s ({est.real_tokens / est.computed_tokens:.0%} of "
              f"{est.computed_tokens:,} computed per micro-step)" if s.doc_tokens
              else f"{est.tokens_per_second:,.0f} tokens/s")
    lines.append(f"estimate: {tokens}, MFU {100 * est.mfu:.1f}% (model {est.model_flops / est.real_tokens / 1e9:.2f} "
                 f"GFLOP/token; run {est.hardware_flops / est.real_tokens / 1e9:.2f} with recompute and padding)")
    lines.append(f"{plan.summary()}: {'fits' if plan.fits() else 'DOES NOT FIT'} (90% of the device)")
    if variants:
        lines.append("one change at a time (memory: run/memory.py's plan):")
        for what, other, fits in variants:
            lines.append(f"  {what:<56} {other.tokens_per_second:9,.0f} tokens/s  MFU {100 * other.mfu:5.1f}%"
                         f"{'' if fits else '  (does not fit)'}")
    return "\n".join(lines)


def estimate_config(argv: list[str]):
    """(Estimate, MemoryPlan, text) for a command line of this program."""
    own, rest = _split_own_keys(argv)
    device_key = own["device"].lower()
    if device_key not in DEVICES:
        raise ConfigError(f"key 'device' must be one of {', '.join(DEVICES)}, got {own['device']!r}")
    doc_tokens = 0
    if own["doc_tokens"]:
        try:
            doc_tokens = int(own["doc_tokens"])
        except ValueError:
            doc_tokens = 0
        if not 1 <= doc_tokens <= 2**20:
            raise ConfigError(f"key 'doc_tokens' must be an integer in [1, 1048576], got {own['doc_tokens']!r}")
    stage = _stage_of(own, rest)
    cfg = parse_config(rest, STAGES[stage])
    model_cfg, model_name = model_config_of(cfg, own["model"])
    if cfg.cutoff_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"key 'cutoff_len' {cfg.cutoff_len} exceeds the model's {model_cfg.max_position_embeddings}")
    device = DEVICES[device_key]
    setup, plan = setup_for_config(cfg, model_cfg, device, doc_tokens)
    est = estimate(setup, device)
    label = next((rest[i + 1] for i, w in enumerate(rest[:-1]) if w == "--yaml_config"), "defaults")
    return est, plan, report(est, plan, label, model_name, changes(cfg, setup, device))


def recipes_table(root: str = ".") -> str:
    """The recipes' table (markdown): planned memory, estimated tokens/s and MFU per device class."""
    lines = ["| config | GPU | micro x seq x accumulation | checkpointing, compile, parameters | planned memory "
             "| est. tokens/s | est. MFU |", "|---|---|---|---|---|---|---|"]
    for path, device, extra in RECIPES:
        est, plan, _ = estimate_config(["--yaml_config", os.path.join(root, path), "--device", device, *extra])
        s = est.setup
        tokens = f"{est.tokens_per_second:,.0f}" + (f" real ({est.real_tokens / est.computed_tokens:.0%})"
                                                     if s.doc_tokens else "")
        lines.append(f"| `{path}`{' ' + ' '.join(extra) if extra else ''} | {DEVICES[device].name} "
                     f"| {s.micro_batch} x {s.seq_len} x {s.accumulation} "
                     f"| {s.checkpointing}, {'compiled' if s.compiled else 'eager'}, "
                     f"{'bf16 (FSDP2)' if s.bf16_params else 'autocast fp32'}"
                     f"{', LoRA ' + str(s.lora_rank) if s.lora_rank else ''}{', packed' if s.packing else ''} "
                     f"| {plan.total / 1e9:.1f} GB ({100 * plan.total / DEVICES[device].memory_bytes:.0f}%) "
                     f"| {tokens} | {100 * est.mfu:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    if argv == ["--recipes"]:
        print(recipes_table())
        return
    print(estimate_config(argv)[2])


if __name__ == "__main__":
    run_cli(main)

