"""The decoder-only transformer, in the shape of Qwen2 ("bumblebee").

    tokens -> embedding -> N x [RMSNorm -> attention (GQA, RoPE) -> +residual,
                                RMSNorm -> SwiGLU MLP -> +residual]
           -> RMSNorm -> LM head (tied to the embedding) -> logits

Parameter names follow Qwen2 (self_attn.q_proj, mlp.gate_proj, ...) so the
weights map one to one onto that family.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanobumble.base.errors import ConfigError
from nanobumble.base.reading import cut
from nanobumble.model.attention import document_attention_mask, flex_attend
from nanobumble.model.layers import apply_rope, resolve_backend, rms_norm, rope_cos_sin, triton_kernels
from nanobumble.model.lm_loss import linear_cross_entropy


MAX_MODEL_SIZE = 2**24  # any size of a model (width, layers, vocabulary, positions): far above real ones
CHECKPOINT_MODES = ("none", "selective", "full")  # Transformer.gradient_checkpointing (True = full, False = none)


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention: each K/V head serves num_heads/num_kv_heads query heads
    intermediate_size: int = 384  # SwiGLU hidden width
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self):
        """Refuse a shape no model can have, naming the key (a ConfigError is a ValueError)."""
        for field in dataclasses.fields(self):  # field.type is the annotation as a string ("int", ...)
            value = getattr(self, field.name)
            if field.type == "bool" and not isinstance(value, bool):
                raise ConfigError(f"model key '{field.name}' must be true or false, got {value!r}")
            # bool is an int to Python, but never a size
            if field.type == "int" and (isinstance(value, bool) or not isinstance(value, int)
                                        or not 1 <= value <= MAX_MODEL_SIZE):
                raise ConfigError(f"model key '{field.name}' must be an integer in [1, 2^24], got {cut(repr(value))}")
            if field.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or not 0 < value < math.inf):
                raise ConfigError(f"model key '{field.name}' must be a positive number, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(f"head dimension hidden_size / num_heads = {self.hidden_size // self.num_heads} "
                              "must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# Named shapes. vocab_size comes from the tokenizer when the model is built.
PRESETS: dict[str, dict] = {
    # A few million parameters: trains on a laptop CPU in minutes.
    "tiny": dict(hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2, intermediate_size=512,
                 max_position_embeddings=1024, rope_theta=10000.0),
    # Qwen2.5-1.5B's shape: 1.54B parameters with its 151,936-token vocabulary.
    "bumblebee-1.5b": dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                           intermediate_size=8960, max_position_embeddings=32768, rope_theta=1e6),
}


def pad_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Round the embedding table up so matrix shapes stay friendly to GPU tiles."""
    return (vocab_size + multiple - 1) // multiple * multiple


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        if backend == "triton":
            return triton_kernels().rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


class KVCache:
    """Keys and values of the tokens seen so far, for generating one token at a time,
    for a batch of rows that each hold their own sequence.

    Per layer [batch, num_kv_heads, max_len, head_dim]: with grouped-query attention
    only the K/V heads are stored, num_heads / num_kv_heads times less memory than
    caching every query head. The storage is allocated at the first write, in the
    dtype the model computes in (under autocast or FSDP mixed precision, bf16).
    `lengths[row]` is how many positions of that row are filled: rows of different
    lengths decode side by side, and a freed row (reset) takes a new sequence while
    the others go on. lengths lives on the CPU, so bookkeeping never waits for the GPU.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device | str):
        if not 0 < max_len <= cfg.max_position_embeddings:
            raise ValueError(f"KVCache max_len must be in [1, {cfg.max_position_embeddings}], got {max_len}")
        self.shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.keys: list[torch.Tensor | None] = [None] * cfg.num_layers
        self.values: list[torch.Tensor | None] = [None] * cfg.num_layers
        self.device = torch.device(device)
        self.batch_size, self.max_len = batch_size, max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long)

    def reset(self, row: int) -> None:
        """Free a row for a new sequence (its old keys are never looked at again)."""
        self.lengths[row] = 0

    def begin(self, rows: torch.Tensor, new: torch.Tensor, T: int) -> torch.Tensor:
        """Prepare one forward: input row b continues cache row rows[b] with new[b] real
        tokens (then right padding up to T). Returns the position ids [B, T] (on the CPU)."""
        start = self.lengths[rows]
        end = start + new
        if (end > self.max_len).any():
            raise ValueError(f"KVCache is full: {int(start.max())} cached + {T} new tokens > max_len {self.max_len}")
        positions = start[:, None] + torch.arange(T)
        width = min(int((start + T).max()), self.max_len)  # the key slots any real query of this forward sees
        self._rows, self._width, self._end = rows.to(self.device), width, end
        self._all_rows = len(rows) == self.batch_size and bool((rows == torch.arange(self.batch_size)).all())
        self._padded = bool((new < T).any())
        self._spans = list(zip(rows.tolist(), start.tolist(), new.tolist())) if self._padded else None
        self._positions = positions.to(self.device)
        # a query at position p sees its own row's slots 0..p: the cached ones and the new ones up to itself
        self.mask = (torch.arange(width)[None, None, :] <= positions[:, :, None])[:, None].to(self.device)
        return positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's k, v ([batch, new, kv_heads, head_dim]) at each row's own
        positions; return the keys and values its rows attend over, [batch, kv_heads, width, head_dim]."""
        if self.keys[layer] is None:
            self.keys[layer] = torch.zeros(self.shape, device=self.device, dtype=k.dtype)
            self.values[layer] = torch.zeros(self.shape, device=self.device, dtype=v.dtype)
        keys, values = self.keys[layer], self.values[layer]
        if self._padded:  # a right-padded prefill: only each row's real tokens go in
            for b, (row, start, new) in enumerate(self._spans):
                keys[row, :, start:start + new] = k[b, :new].transpose(0, 1)
                values[row, :, start:start + new] = v[b, :new].transpose(0, 1)
        else:  # advanced indices first: the indexed slots are [batch, new, kv_heads, head_dim], as k
            keys[self._rows[:, None], :, self._positions] = k
            values[self._rows[:, None], :, self._positions] = v
        if self._all_rows:
            return keys[:, :, :self._width], values[:, :, :self._width]
        return (keys[:, :, :self._width].index_select(0, self._rows),
                values[:, :, :self._width].index_select(0, self._rows))

    def finish(self) -> None:
        """After the forward: each row has grown by its real tokens."""
        self.lengths[self._rows.cpu()] = self._end
        self.mask = self._positions = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str,
                attn_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        rope = triton_kernels().apply_rope if backend == "triton" else apply_rope
        q, k = rope(q, k, cos, sin)
        if kv_cache is not None:
            return self._forward_cached(q, k, v, kv_cache, layer)
        # [batch, heads, seq, head_dim]; enable_gqa lets each K/V head serve its group of query heads.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = self.num_heads != self.num_kv_heads
        if attn_mask is None:  # one document per row, no padding: the fast causal kernels
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif isinstance(attn_mask, torch.Tensor):  # dense boolean mask (CPU training)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        else:  # a flex_attention BlockMask: only the blocks that hold allowed pairs are computed
            y = flex_attend(q, k, v, attn_mask, gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _forward_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                        layer: int) -> torch.Tensor:
        B, T = q.shape[:2]
        keys, values = kv_cache.update(layer, k, v)
        # each row sees only its own filled slots, up to the query's position (kv_cache.begin built the mask)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=kv_cache.mask,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self._compiled = None  # set by compile()

    def compile(self, **kwargs) -> None:
        """torch.compile this block's computation with fullgraph=True (a graph break raises), keyword
        arguments passed on (backend=..., dynamic=...). What is compiled is the layer itself, not
        __call__: hooks (FSDP2's all-gather) stay outside it. Every block runs the same code, so one
        graph serves all layers. dynamic is left to dynamo: the first shape compiles static, a second
        one (evaluation, unpacked SFT) compiles once with symbolic sizes instead of once per shape;
        evaluation pads to attention.bucket_width besides. (With fullgraph, going past dynamo's
        recompile limit, 8 graphs of this code, raises instead of falling back to eager.)

        Two things stay out of the graph. The KV-cache path (generation) runs eagerly: its per-row
        Python bookkeeping (spans, widths, the layer index) would specialise the graph on every
        prompt. And the Triton kernels: inside the compiled block RMSNorm and RoPE are the PyTorch
        math (layers.py), which inductor fuses with their neighbours into kernels of its own (on CUDA,
        Triton kernels). The hand-written ones, launched from autograd.Functions, break the graph
        where the tests run them (under TRITON_INTERPRET=1 dynamo stops inside the launch), so no
        CPU test could check them traced. The final norm and the LM head, outside the blocks, keep them."""
        kwargs.setdefault("fullgraph", True)
        self._compiled = torch.compile(self._layer, **kwargs)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str,
                attn_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                layer: int = 0, checkpoint_mlp: bool = False) -> torch.Tensor:
        if self._compiled is not None and kv_cache is None:
            return self._compiled(x, cos, sin, "torch", attn_mask, checkpoint_mlp=checkpoint_mlp)
        return self._layer(x, cos, sin, backend, attn_mask, kv_cache, layer, checkpoint_mlp)

    def _layer(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str,
               attn_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
               layer: int = 0, checkpoint_mlp: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x, backend), cos, sin, backend, attn_mask, kv_cache, layer)
        if checkpoint_mlp:  # selective checkpointing: only x is kept; norm + SwiGLU are recomputed in backward
            return x + checkpoint(self._mlp_sublayer, x, backend, use_reentrant=False)
        return x + self._mlp_sublayer(x, backend)

    def _mlp_sublayer(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        return self.mlp(self.post_attention_layernorm(x, backend))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        self.kernels = "auto"  # auto | triton | torch: see model/layers.py: resolve_backend
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if self.embed_tokens.weight.device.type != "meta":  # meta models are initialised once materialised
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """GPT-2 style: N(0, 0.02), with the projections that write into the residual
        stream scaled by 1/sqrt(2 * layers) so its variance does not grow with depth;
        biases 0, norms 1. Every parameter comes from its own generator seeded by
        (seed, name), so the values do not depend on the device or on how the
        model is sharded: one process and N processes start from the same weights."""
        residual_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                value = torch.ones(param.shape)
            elif name.endswith(".bias"):
                value = torch.zeros(param.shape)
            else:
                std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                value = torch.randn(param.shape, generator=generator) * std
            copy_full_into(param, value)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied weight is counted once

    @property
    def compiled(self) -> bool:
        """Whether the blocks are compiled (Block.compile): callers then pad to attention.bucket_width."""
        return any(block.compiled for block in self.layers)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                reduction: str = "mean", kv_cache: KVCache | None = None,
                cache_rows: torch.Tensor | list[int] | None = None, last_only: bool = False):
        """Logits [batch, seq, vocab]; or, when targets are given, the cross-entropy
        over the targets that are not -100: "mean" or "sum" (a scalar), or "none"
        (per-token losses [batch, seq], 0 where ignored, and each token's logits
        averaged over the vocabulary, for monitoring). With targets the
        [tokens x vocab] logits never exist whole: the LM head and the loss run a
        chunk of tokens at a time.

        position_ids default to 0..seq-1 in every row. Given explicitly, they may
        restart at 0 inside a row (several documents packed into one row): each
        token then attends only to earlier tokens of its own document.
        attention_mask [batch, seq] (1 = token, 0 = padding) keeps every token from
        attending to padding; without position_ids the positions then count the
        real tokens only, so a left-padded row sees what it would see unpadded.

        With a kv_cache (generation), row b of input_ids continues the sequence of
        cache row cache_rows[b] (default: row b): its tokens sit at positions
        cache.lengths[row].. and attend to that row's cached tokens and to each
        other causally; the row then grows by its tokens. attention_mask here may
        only mark right padding (a batch of prompts of different lengths): a row
        grows by its 1s, and the logits after its padding mean nothing. last_only:
        only each row's last real token's logits, [batch, vocab] (a prompt's logits
        [tokens x vocab] are large and all but the last unused). This path uses
        the plain PyTorch math (model/layers.py), never the Triton kernels."""
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        backend = resolve_backend(self.kernels, input_ids.device)
        attn_mask = None
        if kv_cache is not None:  # (kv_cache.max_len <= max_position_embeddings: positions stay in range)
            if position_ids is not None:
                raise ValueError("position_ids cannot be combined with a kv_cache")
            rows = torch.arange(B) if cache_rows is None else torch.as_tensor(cache_rows, dtype=torch.long).cpu()
            new = torch.full((B,), T) if attention_mask is None else attention_mask.long().sum(-1).cpu()
            backend = "torch"
            position_ids = kv_cache.begin(rows, new, T).to(input_ids.device)
            last = (new - 1).to(input_ids.device)
        else:
            if position_ids is None and attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            if position_ids is not None:
                attn_mask = document_attention_mask(position_ids, attention_mask)
            else:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        x = self.embed_tokens(input_ids)
        # gradient_checkpointing: False / "none" keeps every activation; True / "full" keeps only each block's
        # input and recomputes the block in backward; "selective" recomputes only the MLP sublayer (its norm
        # and SwiGLU: ~3/4 of a block's activations at Qwen shapes, for ~3/4 of a block's recompute).
        mode = {True: "full", False: "none"}.get(self.gradient_checkpointing, self.gradient_checkpointing)
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"gradient_checkpointing must be one of {CHECKPOINT_MODES} or a bool, got {mode!r}")
        if not self.training or kv_cache is not None:
            mode = "none"
        for i, layer in enumerate(self.layers):
            if mode == "full":
                x = checkpoint(layer, x, cos, sin, backend, attn_mask, use_reentrant=False)
            elif mode == "selective":
                x = layer(x, cos, sin, backend, attn_mask, checkpoint_mlp=True)
            else:
                x = layer(x, cos, sin, backend, attn_mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.finish()
            if last_only:
                x = x[torch.arange(B, device=x.device), last]
        x = self.norm(x, backend)
        if targets is None:
            return self.lm_head(x)
        # Fused LM head + loss, a chunk of tokens at a time: the [tokens x vocab]
        # logits (2.5 GB for 8k tokens at vocab 151,936 in bf16) never exist at once.
        out = linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), reduction,
                                   backend=backend)
        if reduction == "none":
            losses, mean_logits = out
            return losses.view(B, T), mean_logits.view(B, T)
        return out



@torch.no_grad()
def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) tensor into a parameter, which may be an FSDP2
    DTensor shard: each rank keeps only its own slice of `full`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        # Every rank holds the same full tensor, so no rank needs to send it (src_data_rank=None).
        shard = distribute_tensor(full.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                                  src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)


