"""LoRA: train a small low-rank update beside frozen weights.

A targeted projection y = x W^T + b becomes

    y = x W^T + b + scaling * dropout(x) A^T B^T,   A: [r, in], B: [out, r]

with scaling = alpha / r (or alpha / sqrt(r) for rsLoRA, which keeps the
update's size steady as r grows). B starts at zero, so the adapted model is
exactly the base model at step 0. Only A and B train: a rank-8 adapter on the
attention projections of a 1.5B model is a few million parameters, so the
optimizer state is tiny and the base weights need no gradients.

The base weight and bias keep their names (q_proj.weight, q_proj.bias), so a
model.safetensors loads into an adapted model unchanged; the adapter adds
q_proj.lora_A and q_proj.lora_B. An adapter is saved on its own
(adapter_model.safetensors + adapter_config.json) and can later be merged into
the weights (W += scaling * B A), giving a plain model again.

Order with FSDP2: build on the meta device, inject_lora, shard, to_empty, load
the base weights, then init_lora_weights (new modules added after sharding
would not be managed by FSDP).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanobumble.base.errors import UserError
from nanobumble.base.reading import Number, cut
from nanobumble.model.transformer import copy_full_into

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTENTION_MODULES + MLP_MODULES


def lora_scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRALinear(nn.Linear):
    """An nn.Linear (same weight and bias Parameters, not copies) plus a low-rank adapter."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)  # may be None
        weight = base.weight
        # Same device and dtype as the base weight: meta on a meta model, filled in by init_lora_weights.
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, device=weight.device, dtype=weight.dtype))
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = lora_scaling(rank, alpha, use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapter_enabled = True
        if weight.device.type != "meta":  # a usable layer on its own; inject_lora re-seeds it by name
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.adapter_enabled:
            return out
        # x -> r -> out: never forms the [out, in] product B A.
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"


def parse_target_modules(target_modules: list[str] | str) -> list[str]:
    """"q_proj,v_proj" or ["q_proj", "v_proj"] -> a checked list; "all" means all seven projections."""
    names = target_modules.split(",") if isinstance(target_modules, str) else list(target_modules)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(ALL_MODULES)
    unknown = [n for n in names if n not in ALL_MODULES]
    if unknown or not names:
        raise UserError(f"lora_target_modules: unknown module(s) {cut(unknown or repr(target_modules))}; "
                        f"valid: {', '.join(ALL_MODULES)} (or all)")
    return list(dict.fromkeys(names))  # keep order, drop repeats


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def is_lora_param(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


@torch.no_grad()
def init_lora_weights(model: nn.Module, seed: int = 0) -> None:
    """A as nn.Linear initialises its weight (kaiming-uniform, a=sqrt(5)), B zeros.
    Each A comes from a generator seeded by (seed, name), so the values do not
    depend on the device or on how the model is sharded."""
    for name, param in model.named_parameters():
        if name.endswith(".lora_A"):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            value = torch.empty(param.shape)
            nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
        elif name.endswith(".lora_B"):
            value = torch.zeros(param.shape)
        else:
            continue
        copy_full_into(param, value.to(param.dtype))


# The values each LoRA setting accepts, for the training configs (run/config.py's
# table) and adapter_config.json alike. A rank past a few thousand is more than a
# layer's width and only costs memory; an alpha past 2^16 scales the update absurdly.
LORA_RANK = Number(1, 4096, integer=True)
LORA_ALPHA = Number(0, 2**16, low_open=True)
LORA_DROPOUT = Number(0, 1, high_open=True)


def lora_settings_problem(rank, alpha, dropout, names: tuple[str, str, str] = ("lora_rank", "lora_alpha",
                                                                               "lora_dropout")) -> str | None:
    """"key 'X' must be ..., got V" for the first bad LoRA rank, alpha or dropout, or
    None; the keys named as the caller's (a config's lora_rank, or adapter_config.json's r)."""
    for name, rule, value in zip(names, (LORA_RANK, LORA_ALPHA, LORA_DROPOUT), (rank, alpha, dropout)):
        problem = rule.problem(name, value)
        if problem:
            return problem
    return None


def inject_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str] | str,
                use_rslora: bool = False, seed: int = 0) -> int:
    """Wrap every targeted projection in model.layers with a LoRALinear, freeze
    everything else, and return the number of trainable parameters."""
    targets = parse_target_modules(target_modules)
    problem = lora_settings_problem(rank, alpha, dropout)
    if problem:
        raise UserError(problem)
    if next(lora_layers(model), None) is not None:
        raise UserError("the model already has LoRA adapters (merge them first to add new ones)")
    found = []
    for parent_name, parent in model.layers.named_modules():
        for attr in targets:
            base = getattr(parent, attr, None)
            if type(base) is not nn.Linear:
                continue
            if hasattr(base.weight, "device_mesh"):
                raise RuntimeError("inject_lora must run before the model is sharded (FSDP2 would not manage "
                                   "the new parameters)")
            layer = LoRALinear(base, rank, alpha, dropout, use_rslora)
            layer.train(base.training)
            setattr(parent, attr, layer)
            found.append(layer)
    if not found:
        raise UserError(f"lora_target_modules {targets}: no such projection in the model")
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_param(name))
    if found[0].lora_A.device.type != "meta":  # a meta model is initialised once materialised
        init_lora_weights(model, seed)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model (e.g. DPO's reference policy) without a second copy of
    the weights: every adapter off inside the block, each back to its previous
    state afterwards, also when the block raises."""
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous):
            layer.adapter_enabled = enabled


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight (W += scaling * B A, computed in fp32)
    and put a plain nn.Linear, holding the same Parameters, back in its place.
    Expects an unsharded model. requires_grad of the base weights is left as is."""
    for name, layer in list(lora_layers(model)):
        if hasattr(layer.weight, "device_mesh"):
            raise RuntimeError("merge_lora needs an unsharded model (load it in one process)")
        delta = layer.scaling * (layer.lora_B.float() @ layer.lora_A.float())
        layer.weight.copy_((layer.weight.float() + delta).to(layer.weight.dtype))
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = layer.weight
        plain.bias = layer.bias
        plain.train(layer.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, plain)
