"""Who may attend to whom: the one masking rule (causal, within a document, never
onto padding), as a flex_attention block mask or a dense boolean mask for SDPA,
and flex_attention itself, compiled where it pays (CUDA), built once outside any compiled
block; and the widths a compiled model pads its evaluation batches to.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.torch_version import TorchVersion


def attention_rule(documents: torch.Tensor, valid: torch.Tensor | None):
    """The one masking rule, as a flex_attention mask_mod (b, h, q, kv) -> allowed:
    causal, within one document, and never onto padding, except that a padding
    token sees itself: its output is ignored, but an empty row would make softmax NaN."""
    def allowed(b, h, q, kv):
        ok = (kv <= q) & (documents[b, q] == documents[b, kv])
        if valid is not None:
            ok = ok & (valid[b, kv] | (kv == q))
        return ok
    return allowed


def flex_attention_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401  (torch >= 2.5)
    except ImportError:
        return False
    return True


def document_attention_mask(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """The attention mask for rows whose documents start wherever position_ids is 0,
    with optional padding (attention_mask 0). A flex_attention BlockMask where flex
    attention can run this pass (CUDA; on CPU it has no backward, so only without
    gradients); otherwise the same rule as a dense [batch, 1, seq, seq] boolean mask
    for SDPA. On CUDA a dense mask would push SDPA onto its slow fp32 math path. Built
    outside the compiled blocks (Transformer.forward is not traced): they take it as an input."""
    B, T = position_ids.shape
    documents = (position_ids == 0).cumsum(-1, dtype=torch.int32)  # [B, T]: 1, 1, 1, 2, 2, ...
    valid = attention_mask.bool() if attention_mask is not None else None
    rule = attention_rule(documents, valid)
    device = position_ids.device
    if flex_attention_available() and (device.type == "cuda" or not torch.is_grad_enabled()):
        return block_mask_builder(device)(rule, B, None, T, T, device=device)
    b = torch.arange(B, device=device)[:, None, None, None]
    i = torch.arange(T, device=device)
    return rule(b, 0, i[None, None, :, None], i[None, None, None, :])


def compiles_flex(device: torch.device) -> bool:
    """Where flex attention (and its block mask) is compiled. Eager flex materialises
    every score, like SDPA's math path, so CUDA compiles it; on CPU eager is fine for
    the small no-gradient passes it serves (and inductor's CPU flex kernel takes ~30 s to compile)."""
    return device.type == "cuda"


# Built once, on first use by eager code (never inside a traced block): torch.compile's first call imports
# dynamo and inductor (seconds), which a run without flex attention should not pay at import.
_compiled_flex = None
_compiled_block_mask = None


def compiled_create_block_mask_supported() -> bool:
    """torch.compile(create_block_mask) is the way to compile the mask builder since torch 2.6, which
    deprecated create_block_mask(_compile=True) (the work-around for what compile could not do before)."""
    return TorchVersion(torch.__version__) >= "2.6.0a0"  # (2.6 pre-releases too)


def block_mask_builder(device: torch.device):
    """create_block_mask, compiled where compiles_flex(device): once per process, then reused (evaluated
    eagerly, the rule builds [B, T, T] index tensors: 8 GiB of booleans at 8 x 32k tokens)."""
    global _compiled_block_mask
    from torch.nn.attention.flex_attention import create_block_mask
    if not compiles_flex(device):
        return create_block_mask
    if _compiled_block_mask is None:
        if compiled_create_block_mask_supported():
            _compiled_block_mask = torch.compile(create_block_mask)
        else:  # older torch: the flag it had then
            _compiled_block_mask = functools.partial(create_block_mask, _compile=True)
    return _compiled_block_mask


def _eager_flex_attention(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention
    with warnings.catch_warnings():  # eager is intended here: tiny CPU shapes, no gradients
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def flex_attention_op(device: torch.device):
    """flex_attention for eager callers: compiled where compiles_flex(device) (CUDA), else eager.
    A compiled block never calls this (see flex_attend)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if not compiles_flex(device):
        return _eager_flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, enable_gqa: bool) -> torch.Tensor:
    """flex_attention with a BlockMask. Inside a compiled block, flex_attention itself: dynamo traces it into
    the block's graph and inductor writes its kernel there (building or calling a compiled function, or
    touching the warnings filters, inside traced code would break the graph). Eager: flex_attention_op."""
    if torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    return flex_attention_op(q.device)(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def bucket_width(width: int, limit: int, smallest: int = 16) -> int:
    """The width to pad a batch of `width` tokens to for a compiled model: the next power of two
    (at least `smallest`), at most `limit` (the context). Evaluation and generation see a new width
    nearly every batch; each new shape could compile again, and past torch._dynamo's recompile limit
    (8 graphs) a fullgraph block raises (a plain compile falls back to eager). Powers of two give at
    most log2(limit / smallest) + 1 widths (8 for a 2048-token context) and pad a batch by less than 2x."""
    if width >= limit:
        return width
    return min(max(smallest, 1 << (width - 1).bit_length()), limit)
