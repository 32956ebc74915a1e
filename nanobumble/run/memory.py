"""The memory plan: peak bytes per rank of a training step, before the model is built.

    plan = plan_memory(model_cfg, micro_batch=8, seq_len=2048, compute_dtype=torch.bfloat16,
                       world_size=1, checkpointing="full", device_type="cuda", backend="triton")
    print(plan.summary())

Arithmetic, term by term (each term's comment says where its number comes from).
Always alive: parameters, the gradients summed so far (whole: the recipes accumulate
over several micro-steps), AdamW's two moments, the activations autograd saved. On top
of those the peak is the larger of two moments of a micro-step that is not the first
of its step (found with the profiler's memory timeline of a CPU step, tests/memory_peak.py):
    end of forward  the LM head's last chunk: logits, the torch path's fp32 temporaries,
                    the fp32 gradient buffers it fills in the forward pass; and under
                    autocast its cache of bf16 weight copies (alive until autocast exits)
    backward        the top block: its recomputed part (checkpointing), the SwiGLU's
                    [N, I] gradients, and the tied weight's gradient held for the embedding's
Which one is the peak depends on the shape and the mode (MemoryPlan.peak_phase).
Checked on CPU (fp32, plain PyTorch kernels) against the live tensor bytes of each phase
within 2% at a tiny shape, and against peak RSS within 3% at two other shapes
(tests/unit/test_memory_plan.py). Not counted: the allocator's own slack (CUDA's
caching allocator; glibc's freed heap on CPU, measured +33% of RSS at those two shapes:
see tests/memory_peak.py), workspaces inside kernels on CUDA (cuBLAS, flash attention):
the runtime term and MEMORY_MARGIN are for those.

Activations per token per layer, from what autograd saves in a Block (counted once
with torch.autograd.graph.saved_tensors_hooks on CPU, unique storages, parameters
left out; tests/unit/test_memory_plan.py recounts them). With H hidden, K = K/V
width (num_kv_heads x head_dim), I the SwiGLU width, n heads, a the compute dtype's
bytes (2 bf16, 4 fp32) and r the residual stream's (4 under autocast over fp32
weights, 2 with FSDP's bf16 parameters):

    RMSNorm, torch math    2 x 4H + 4     fp32 input (or its fp32 copy) and the normalised x, rstd
    RMSNorm, Triton        rH + 4         its input and rstd (kernels/rmsnorm.py)
    inputs of the linears  (3 + 2 + 1) aH under autocast (q, k, v and gate, up each cast the
                           normed fp32 x to bf16 again; o_proj's input is SDPA's output);
                           (1 + 1 + 1) aH otherwise (one normed x each for attention and MLP)
    attention              a(H + 2K) + 4n   q, k, v after RoPE (RoPE saves only cos/sin,
                                            shared by all layers) and the log-sum-exp
    SwiGLU                 4 aI           gate, up, silu(gate) and their product (down_proj's input)
    dense mask (CPU, SFT/DPO rows)   aT   SDPA's float mask, [rows, 1, T, T] per layer
    LoRA, per adapted linear (in -> r)   (1 + a) in + a r   dropout mask, dropped-out x, x A^T
    autocast weight copies 2 x (the block's linear weights) per layer, not per token
    bf16 parameters (FSDP)   4H per RMSNorm per layer: the torch RMSNorm's fp32 weight copy

Checkpointing (enable_gradient_checkpointing):
    none       every layer keeps all of the above.
    selective  the MLP sublayer (post-attention RMSNorm + SwiGLU) is recomputed in
               backward: a layer keeps the attention part plus its input x (rH).
               At Qwen shapes (I = 5.8 H) that drops ~3/4 of the bytes, for ~3/4 of a
               block's forward recomputed (the attention is the cheaper quarter).
    full       a layer keeps only its input (rH per token); the block is recomputed.
    selective and full also hold one layer's recomputed activations during its backward
    (counted in the backward moment).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from nanobumble.base.errors import UserError
from nanobumble.model.lm_loss import default_chunk_size
from nanobumble.model.lora import inject_lora
from nanobumble.model.transformer import CHECKPOINT_MODES, Transformer

GB = 1e9
# A plan must fit within this share of the device's memory: what the plan does not count
# (allocator fragmentation, kernel workspaces: the module docstring) and what else runs there.
MEMORY_MARGIN = 0.9
# What runs besides the model: on CUDA the context, cuBLAS workspaces and the caching
# allocator's slack; on CPU the interpreter with torch and nanobumble imported (~0.5 GB RSS).
RUNTIME_BYTES = {"cuda": 1.5 * GB, "cpu": 0.5 * GB}


@dataclasses.dataclass
class MemoryPlan:
    parameters: int
    gradients: int
    optimizer: int
    activations: int  # what autograd saved, at the end of the forward pass
    lm_head: int  # the LM head's buffers at the end of the forward pass
    autocast_cache: int  # autocast's bf16 weight copies not saved for backward, alive to the end of forward
    backward: int  # at the backward's peak, on top of the activations: see plan_memory
    other: int
    runtime: int
    checkpointing: str
    device_bytes: int | None = None  # what the device has, when known

    @property
    def end_of_forward(self) -> int:
        """On top of the activations at the end of the forward pass."""
        return self.lm_head + self.autocast_cache

    @property
    def peak_phase(self) -> str:
        return "backward" if self.backward > self.end_of_forward else "end of forward"

    @property
    def training_bytes(self) -> int:
        """Everything but the runtime: what a step adds to a process that has imported torch.
        The peak is the larger of the two moments: the LM head at the end of the forward pass,
        or the backward pass through the top block (module docstring)."""
        return (self.parameters + self.gradients + self.optimizer + self.activations
                + max(self.end_of_forward, self.backward) + self.other)

    @property
    def total(self) -> int:
        return self.training_bytes + self.runtime

    def fits(self) -> bool:
        return self.device_bytes is None or self.total <= MEMORY_MARGIN * self.device_bytes

    def summary(self) -> str:
        gb = lambda n: f"{n / GB:.2f} GB"  # noqa: E731
        line = (f"memory plan per rank: params {gb(self.parameters)}, grads {gb(self.gradients)}, "
                f"optimizer {gb(self.optimizer)}, activations {gb(self.activations)} "
                f"(checkpointing {self.checkpointing}), + the larger of end of forward {gb(self.end_of_forward)} "
                f"(LM head {gb(self.lm_head)}, autocast weight cache {gb(self.autocast_cache)}) and backward "
                f"{gb(self.backward)} (peak: {self.peak_phase}), other {gb(self.other)}, "
                f"runtime {gb(self.runtime)} = {gb(self.total)}")
        if self.device_bytes:
            line += f" of {gb(self.device_bytes)} ({100 * self.total / self.device_bytes:.0f}%)"
        return line


def _meta_model(model_cfg, lora: dict | None) -> Transformer:
    """The model on the meta device (no memory): its tensors give the exact counts."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
        if lora is not None:
            inject_lora(model, **{k: v for k, v in lora.items() if k != "seed"})
    return model


def plan_memory(model_cfg, micro_batch: int, seq_len: int, *, compute_dtype: torch.dtype = torch.float32,
                world_size: int = 1, lora: dict | None = None, dpo: bool = False, reference_copy: bool = False,
                checkpointing: str = "none", device_type: str = "cpu", backend: str = "torch",
                padded_rows: bool = False, device_bytes: int | None = None, fsdp: bool | None = None) -> MemoryPlan:
    """Peak memory per rank of one training step (see the module docstring).

    compute_dtype: bf16 computes under autocast over fp32 weights in one process, and
    with FSDP's bf16 parameters under FSDP (fp32 sharded master weights).
    fsdp: the model is wrapped in FSDP2 with its mixed precision (bf16 parameters gathered
    a block at a time, fp32 master weights and gradients, a bf16 residual stream), also on
    one rank; None means world_size > 1. world_size shards parameters, gradients and
    optimizer state over the ranks.
    lora: lora.inject_lora's keywords (frozen base: only adapters have gradients and
    AdamW state). dpo: each forward runs chosen + rejected, 2 x micro_batch rows, with
    per-token losses; reference_copy: DPO's frozen full copy of the model is resident.
    padded_rows: rows carry an attention mask (SFT / DPO), a dense [rows, 1, T, T]
    mask on CPU (a flex BlockMask, negligible, on CUDA). backend: the kernels (torch | triton)."""
    if checkpointing not in CHECKPOINT_MODES:
        raise ValueError(f"checkpointing must be one of {CHECKPOINT_MODES}, got {checkpointing!r}")
    cfg = model_cfg
    model = _meta_model(cfg, lora)
    params = {id(p): p for p in model.parameters()}.values()  # a tied weight once
    n_params = sum(p.numel() for p in params)
    n_trainable = sum(p.numel() for p in params if p.requires_grad)
    W = world_size
    sharded = world_size > 1 if fsdp is None else fsdp  # FSDP2's mixed precision, on 1 rank or N
    a = torch.empty((), dtype=compute_dtype).element_size()  # compute bytes
    autocast = a < 4 and not sharded  # bf16 over fp32 weights in one process: casts at every linear
    r = 4 if (autocast or a == 4) else a  # the residual stream's bytes: fp32 weights keep it fp32
    H, K, I, n, L, V = (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size, cfg.num_heads,
                        cfg.num_layers, cfg.vocab_size)
    rows = micro_batch * (2 if dpo else 1)
    N = rows * seq_len  # tokens per micro-step
    embedding_trains = model.embed_tokens.weight.requires_grad

    # Parameters: fp32 everywhere (one process: fp32 weights under autocast; FSDP: fp32 shards, on one
    # rank the whole model), each rank 1/W; DPO's frozen full reference adds another copy.
    parameters = 4 * n_params * (2 if reference_copy else 1) // W
    # Gradients: fp32, same shape (and sharding) as the trainable parameters.
    gradients = 4 * n_trainable // W
    # AdamW: exp_avg and exp_avg_sq, fp32, per trainable parameter.
    optimizer = 8 * n_trainable // W

    # Activations, per token per layer, split at the MLP sublayer (what selective recomputes).
    block = model.layers[0]

    def norm_bytes(rms: torch.nn.Module) -> int:
        if backend != "torch":
            return r * H + 4  # the Triton kernel keeps its input and rstd
        return 4 * H * (2 if rms.weight.requires_grad else 1) + 4  # fp32 x, fp32 normalised x (for w's grad)

    def input_bytes(linears: list, x_bytes: int, kept_anyway: bool) -> int:
        """What the linears reading one tensor x (x_bytes a value) keep of it, per token."""
        total, keeps_x = 0, kept_anyway
        d_in = linears[0].in_features
        cast = autocast and x_bytes != a  # each autocast linear casts x to bf16 again, and keeps its own copy
        for linear in linears:
            if linear.weight.requires_grad:  # a trained weight needs x for its gradient
                total, keeps_x = (total + a * d_in, keeps_x) if cast else (total, True)
            if hasattr(linear, "lora_A"):  # LoRA: dropout's mask and output (or x) for A, then x A^T for B
                if not isinstance(linear.lora_dropout, torch.nn.Identity):
                    total += ((1 if device_type == "cuda" else x_bytes) + a) * d_in  # CPU's mask is a float
                elif cast:
                    total += a * d_in
                else:
                    keeps_x = True
                total += a * linear.rank
        return total + (x_bytes * d_in if keeps_x and not kept_anyway else 0)

    attn, mlp = block.self_attn, block.mlp
    attn_part = (norm_bytes(block.input_layernorm) + input_bytes([attn.q_proj, attn.k_proj, attn.v_proj], r, False)
                 + a * (2 * H + 2 * K) + 4 * n  # SDPA keeps q, k, v (after RoPE), its output and log-sum-exp
                 + input_bytes([attn.o_proj], a, True))  # o_proj reads SDPA's output, kept already
    mlp_part = (norm_bytes(block.post_attention_layernorm) + input_bytes([mlp.gate_proj, mlp.up_proj], r, False)
                + 3 * a * I  # gate (for silu), silu(gate) and up (for their product)
                + input_bytes([mlp.down_proj], a, False))  # the product
    if padded_rows and device_type == "cpu":
        attn_part += a * seq_len  # SDPA's dense float mask per layer
    # Per layer, not per token: under autocast the bf16 copies of the block's weights, kept for backward.
    # With bf16 parameters (FSDP) the torch RMSNorm keeps an fp32 copy of its weight instead.
    norm_copy = 4 * H if backend == "torch" and a != 4 and not autocast else 0
    attn_fixed = (sum(2 * p.numel() for p in attn.parameters() if p.dim() == 2) if autocast else 0) + norm_copy
    mlp_fixed = (sum(2 * p.numel() for p in mlp.parameters() if p.dim() == 2) if autocast else 0) + norm_copy
    # Under LoRA the embedding is frozen: the first block's input needs no gradient, so its first
    # RMSNorm keeps nothing, the dropout before its q/k/v adapters no mask, and (autocast) q/k/v keep
    # no bf16 weight copy but lora_B's.
    first_layer_less = first_layer_fixed_less = 0
    if not embedding_trains:
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        first_layer_less = norm_bytes(block.input_layernorm) + sum(
            (1 if device_type == "cuda" else r) * H for linear in qkv
            if hasattr(linear, "lora_A") and not isinstance(linear.lora_dropout, torch.nn.Identity))
        if autocast:
            first_layer_fixed_less = sum(2 * (p.numel() if p.dim() == 2 else 0) for linear in qkv
                                         for name, p in linear.named_parameters() if name != "lora_B")
    layer_all = N * (attn_part + mlp_part) + attn_fixed + mlp_fixed
    # What the blocks keep at the end of the forward pass, and what backward recomputes of the top
    # block before its backward runs (selective: its MLP sublayer; full: the whole block).
    # Under autocast the bf16 copies of trained weights not saved stay in autocast's cache until the
    # forward's autocast region ends (the profiler's memory timeline, tests/memory_peak.py): every
    # layer's. (Autocast caches only leaves that require grad: a frozen LoRA base is cast at each use.)
    def cached(module: torch.nn.Module) -> int:
        return sum(2 * p.numel() for p in module.parameters() if p.dim() == 2 and p.requires_grad) if autocast else 0

    if checkpointing == "none":
        blocks, recomputed, autocast_cache = L * layer_all, 0, 0
    elif checkpointing == "selective":  # a layer keeps its attention part and its input x
        blocks, recomputed = L * (N * (attn_part + r * H) + attn_fixed), N * mlp_part + mlp_fixed
        autocast_cache = L * cached(mlp)
    else:  # each block's input
        blocks, recomputed = L * N * r * H, layer_all
        autocast_cache = L * (cached(attn) + cached(mlp))
    # Outside the blocks: RoPE's cos/sin (fp32, head_dim/2 each, shared by every layer), the final
    # RMSNorm, and the LM head's input and out-of-range flags (bool) when DPO's per-token path saves
    # them (the mean path saves nothing).
    if checkpointing != "full":
        blocks -= N * first_layer_less + first_layer_fixed_less
    activations = blocks + N * (4 * cfg.head_dim + norm_bytes(model.norm) + (a * H + 1 if dpo else 0)) + norm_copy

    # The LM head (model/lm_loss.py). One chunk of logits; on the torch path also its fp32 working copy
    # (bf16) and the fp32 temporary of its logsumexp (the profiler's memory timeline, tests/memory_peak.py).
    # The chunk is default_chunk_size's floor: on CUDA bigger chunks come only from memory free at the time.
    chunk = default_chunk_size(N, V, compute_dtype, backend)
    logits = chunk * V * (a + ((4 if a != 4 else 0) + 4 if backend == "torch" else 0))
    cast_weight = a * V * H if autocast else 0  # autocast's bf16 copy of the fp32 [V, H] weight
    fp32_weight = 4 * V * H if a != 4 and device_type == "cpu" else 0  # bf16 on CPU: GEMMs on fp32 copies
    weight_grad = 4 * V * H if embedding_trains and n_trainable else 0  # fp32, summed over the chunks
    if not dpo:
        # End of forward, last chunk (mean: both gradients are made in the forward pass): the fp32
        # gradient of the hidden states [N, H]; the hidden states themselves (the final norm's output,
        # not saved), and under autocast their bf16 cast.
        lm_head = logits + cast_weight + fp32_weight + weight_grad + N * H * (4 + r + (a if autocast else 0))
        lm_backward = 0
    else:
        # Per token (DPO): the forward keeps the hidden states (in activations) and the weight; its
        # backward recomputes each chunk and makes both gradients, grad_hidden in the compute dtype.
        lm_head = logits + cast_weight + (r * N * H if autocast else 0)
        lm_backward = logits + cast_weight + fp32_weight + weight_grad + a * N * H
    # A trained tied weight's gradient (fp32 under autocast, the parameter's dtype under FSDP) waits in
    # autograd's buffer through the whole backward, to be summed with the embedding's own.
    held_grad = ((4 if autocast or a == 4 else a) * V * H
                 if embedding_trains and cfg.tie_word_embeddings and n_trainable else 0)

    # Backward through the top block, at the SwiGLU's backward: the block's recomputed part (checkpointing),
    # the gradient arriving in the residual stream [N, H], and three [N, I] gradients at once (of the
    # product, of silu(gate) and of up) where the product (kept for down_proj) is already freed: net
    # 2 a I per token (the profiler's memory timeline, tests/memory_peak.py); the final norm's saved
    # tensors (and DPO's saved LM head input) are freed by then; plus the tied LM head weight's gradient.
    # For DPO the LM head's own backward, just before, may be the larger.
    freed = norm_bytes(model.norm) + (a * H + 1 if dpo else 0)
    backward = recomputed + N * (2 * a * I + r * H - freed) + held_grad
    backward = max(backward, lm_backward)

    # Other: the token ids and targets (int64); the dense mask itself (bool, CPU); with FSDP the
    # gathered bf16/fp32 copies of the root (embedding) and of two blocks (running + prefetched).
    other = 2 * 8 * N + (rows * seq_len * seq_len if padded_rows and device_type == "cpu" else 0)
    if sharded:
        block_params = sum(p.numel() for p in model.layers[0].parameters())
        other += a * (V * H + 2 * block_params) * (2 if reference_copy else 1)
    runtime = int(RUNTIME_BYTES.get(device_type, RUNTIME_BYTES["cuda"]))
    return MemoryPlan(int(parameters), int(gradients), int(optimizer), int(activations), int(lm_head),
                      int(autocast_cache), int(backward), int(other), runtime, checkpointing, device_bytes)


def device_memory_bytes(device: torch.device) -> int:
    """What one rank may use: the GPU's total memory, or on CPU the physical RAM (or the
    cgroup's limit, when lower) shared by the ranks on this machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def plan_for_config(cfg, model_cfg, world_size: int, compute_dtype: torch.dtype, device_type: str,
                    backend: str, checkpointing: str, device_bytes: int | None = None,
                    fsdp: bool | None = None) -> MemoryPlan:
    """plan_memory for a training config (PretrainConfig, SFTConfig, DPOConfig). fsdp: the model
    runs under FSDP2's mixed precision (also on one rank); None means world_size > 1."""
    lora = None
    if getattr(cfg, "finetuning_type", "full") == "lora":
        lora = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                "target_modules": cfg.lora_target_modules, "use_rslora": cfg.use_rslora}
    dpo = cfg.stage == "dpo"
    return plan_memory(model_cfg, cfg.train_micro_batch_size_per_gpu, cfg.cutoff_len, compute_dtype=compute_dtype,
                       world_size=world_size, lora=lora, dpo=dpo,
                       reference_copy=dpo and lora is None and not cfg.precompute_ref_log_probs,
                       checkpointing=checkpointing, device_type=device_type, backend=backend,
                       padded_rows=cfg.stage in ("sft", "dpo"), device_bytes=device_bytes, fsdp=fsdp)


def choose_checkpointing(cfg, model_cfg, world_size: int, compute_dtype: torch.dtype, device_type: str,
                         backend: str, device_bytes: int, fsdp: bool | None = None) -> tuple[str, MemoryPlan]:
    """The checkpointing mode (none | selective | full) and its plan: the key's own
    (true = full, false = none), or with auto the cheapest that fits the device.
    A plan that does not fit is a UserError naming the keys to change, unless memory_check is false."""
    def plan(mode: str) -> MemoryPlan:
        return plan_for_config(cfg, model_cfg, world_size, compute_dtype, device_type, backend, mode, device_bytes,
                               fsdp)

    setting = cfg.enable_gradient_checkpointing
    if setting == "auto":
        plans = [plan(mode) for mode in CHECKPOINT_MODES]
        chosen = next((p for p in plans if p.fits()), plans[-1])
    else:
        chosen = plan({"true": "full", "false": "none"}.get(setting, setting))
    if not chosen.fits() and cfg.memory_check:
        keys = ["train_micro_batch_size_per_gpu", "cutoff_len"]
        if setting != "auto" and chosen.checkpointing != "full":
            keys.append("enable_gradient_checkpointing (auto or true)")
        if getattr(cfg, "finetuning_type", "full") == "full" and cfg.stage != "pretrain":
            keys.append("finetuning_type lora")
        keys.append("more ranks (torchrun --nproc_per_node)")
        raise UserError(f"{chosen.summary()}: does not fit {MEMORY_MARGIN:.0%} of the device's memory; lower "
                        f"{', '.join(keys)}, or set memory_check false to try anyway")
    return chosen.checkpointing, chosen
