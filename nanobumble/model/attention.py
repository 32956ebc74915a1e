"""Who may attend to whom: the one masking rule (causal, within a document, never
onto padding), as a flex_attention block mask or a dense boolean mask for SDPA,
and flex_attention itself, compiled where it pays (CUDA).
"""

from __future__ import annotations

import warnings

import torch


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
    for SDPA. On CUDA a dense mask would push SDPA onto its slow fp32 math path."""
    B, T = position_ids.shape
    documents = (position_ids == 0).cumsum(-1, dtype=torch.int32)  # [B, T]: 1, 1, 1, 2, 2, ...
    valid = attention_mask.bool() if attention_mask is not None else None
    rule = attention_rule(documents, valid)
    device = position_ids.device
    if flex_attention_available() and (device.type == "cuda" or not torch.is_grad_enabled()):
        from torch.nn.attention.flex_attention import create_block_mask
        # Compiled where flex attention is: evaluated eagerly, the rule builds [B, T, T] index tensors.
        return create_block_mask(rule, B, None, T, T, device=device, _compile=compiles_flex(device))
    b = torch.arange(B, device=device)[:, None, None, None]
    i = torch.arange(T, device=device)
    return rule(b, 0, i[None, None, :, None], i[None, None, None, :])

_compiled_flex = None

def compiles_flex(device: torch.device) -> bool:
    """Where flex attention (and its block mask) is compiled. Eager flex materialises
    every score, like SDPA's math path, so CUDA compiles it; on CPU eager is fine for
    the small no-gradient passes it serves."""
    return device.type == "cuda"


def _eager_flex_attention(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention
    with warnings.catch_warnings():  # eager is intended here: tiny CPU shapes, no gradients
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def flex_attention_op(device: torch.device):
    """flex_attention, compiled where compiles_flex(device) (CUDA), else eager."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if not compiles_flex(device):
        return _eager_flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex
