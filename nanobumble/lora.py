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
import json
import math
import os
import zlib
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import is_main
from .errors import UserError
from .files import atomic_write_text
from .model import copy_full_into
from .tensor_files import open_file, read_into, write_gathered

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTENTION_MODULES + MLP_MODULES
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_CONFIG_KEYS = ("base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora")
# An adapter directory is written as PEFT writes one, so that PeftModel.from_pretrained
# loads it onto the exported (Hugging Face) base: tensor names are the Hugging Face
# module names under PEFT's wrapper, and adapter_config.json carries PEFT's keys.
PEFT_PREFIX = "base_model.model.model."
PEFT_CONFIG = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "use_dora": False,
               "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True}
# PEFT keys that do not change what a loaded adapter computes (bookkeeping, or
# how training would have initialised it); any other key must be off/empty.
PEFT_IGNORED_KEYS = ("peft_type", "task_type", "peft_version", "inference_mode", "init_lora_weights", "revision",
                     "auto_mapping", "megatron_core", "megatron_config", "qalora_group_size", "layers_pattern",
                     "eva_config", "corda_config", "lora_ga_config")


def peft_key(name: str) -> str:
    """layers.0.self_attn.q_proj.lora_A -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"""
    return f"{PEFT_PREFIX}{name}.weight"


def adapter_param_name(key: str) -> str:
    """A tensor name in adapter_model.safetensors (PEFT's, or the bare parameter
    name older nanobumble adapters used) -> the parameter's name here."""
    return key.removeprefix(PEFT_PREFIX).removesuffix(".weight")


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
        raise UserError(f"lora_target_modules: unknown module(s) {unknown or repr(target_modules)}; "
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


def inject_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str] | str,
                use_rslora: bool = False, seed: int = 0) -> int:
    """Wrap every targeted projection in model.layers with a LoRALinear, freeze
    everything else, and return the number of trainable parameters."""
    targets = parse_target_modules(target_modules)
    if rank < 1:
        raise UserError(f"lora_rank must be a positive integer, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"lora_dropout must be in [0, 1), got {dropout}")
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


def adapter_config_for(model: nn.Module, base_model_name_or_path: str) -> dict:
    """The adapter_config.json contents describing the adapters injected into model."""
    layers = [(name, layer) for name, layer in lora_layers(model)]
    if not layers:
        raise ValueError("the model has no LoRA adapters")
    first = layers[0][1]
    targets = [t for t in ALL_MODULES if any(name.endswith(f".{t}") for name, _ in layers)]
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return {"base_model_name_or_path": base_model_name_or_path, "r": first.rank, "lora_alpha": first.alpha,
            "lora_dropout": dropout, "target_modules": targets, "use_rslora": first.use_rslora}


def validate_adapter_config(config: dict, source: str) -> dict:
    """Check every key and value; `source` names the file in the error. PEFT's
    keys are accepted when they leave the math as nanobumble does it (no DoRA, no
    trained biases, no extra saved modules, one rank and alpha for all layers...)."""
    if not isinstance(config, dict):
        raise UserError(f"{source}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA" or config.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserError(f"{source}: peft_type {config.get('peft_type')!r} / task_type {config.get('task_type')!r}: "
                        f"only LORA adapters for CAUSAL_LM are supported")
    for key, value in config.items():
        if key in ADAPTER_CONFIG_KEYS or key in PEFT_IGNORED_KEYS:
            continue
        if not (value in (None, False, "none") or value == [] or value == {}):
            raise UserError(f"{source}: {key}={value!r} is not supported (nanobumble's LoRA implements "
                            f"{', '.join(ADAPTER_CONFIG_KEYS[1:])} only; an unknown key or an option that "
                            f"changes the math)")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if missing:
        raise UserError(f"{source}: missing key(s) {missing}")
    out = {"base_model_name_or_path": config.get("base_model_name_or_path", ""), "r": config["r"],
           "lora_alpha": config["lora_alpha"], "lora_dropout": config.get("lora_dropout", 0.0),
           "target_modules": config["target_modules"], "use_rslora": config.get("use_rslora", False)}
    if not isinstance(out["base_model_name_or_path"], str):
        raise UserError(f"{source}: base_model_name_or_path must be a string")
    if isinstance(out["r"], bool) or not isinstance(out["r"], int) or out["r"] < 1:
        raise UserError(f"{source}: r must be a positive integer, got {out['r']!r}")
    if isinstance(out["lora_alpha"], bool) or not isinstance(out["lora_alpha"], (int, float)) \
            or out["lora_alpha"] <= 0:
        raise UserError(f"{source}: lora_alpha must be a positive number, got {out['lora_alpha']!r}")
    dropout = out["lora_dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise UserError(f"{source}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(out["use_rslora"], bool):
        raise UserError(f"{source}: use_rslora must be true or false, got {out['use_rslora']!r}")
    if not isinstance(out["target_modules"], list) or not all(isinstance(t, str) for t in out["target_modules"]):
        raise UserError(f"{source}: target_modules must be a list of names")
    try:
        out["target_modules"] = parse_target_modules(out["target_modules"])
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    return out


def read_adapter_config(path: str) -> dict:
    """adapter_config.json from an adapter directory (or the file itself), validated."""
    config_file = path if path.endswith(".json") else os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_file):
        raise UserError(f"{config_file}: not found (not a LoRA adapter directory?)")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file}: not valid JSON ({e})") from None
    return validate_adapter_config(config, config_file)


def save_adapter(path: str, model: nn.Module, adapter_config: dict) -> None:
    """Write adapter_model.safetensors + adapter_config.json, each atomically.
    Every rank calls it (to gather shards); rank 0 writes."""
    config = validate_adapter_config(adapter_config, "adapter_config")
    if not any(is_lora_param(name) for name, _ in model.named_parameters()):  # the same answer on every rank
        raise ValueError("the model has no LoRA adapters to save")
    main = is_main()
    if main:
        os.makedirs(path, exist_ok=True)
    write_gathered(os.path.join(path, ADAPTER_WEIGHTS),
                   [(peft_key(name), param) for name, param in model.named_parameters() if is_lora_param(name)])
    if not main:
        return
    atomic_write_text(os.path.join(path, ADAPTER_CONFIG), json.dumps({**PEFT_CONFIG, **config}, indent=2) + "\n")


@torch.no_grad()
def load_adapter(model: nn.Module, path: str, seed: int = 0) -> dict:
    """Inject adapters as described by path/adapter_config.json (unless the model
    already carries matching ones) and load path/adapter_model.safetensors.
    Returns the adapter config."""
    config = read_adapter_config(path)
    weights_file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights_file):
        raise UserError(f"{weights_file}: not found")
    existing = [layer for _, layer in lora_layers(model)]
    if not existing:
        inject_lora(model, config["r"], config["lora_alpha"], config["lora_dropout"], config["target_modules"],
                    config["use_rslora"], seed)
    elif any(layer.scaling != lora_scaling(config["r"], config["lora_alpha"], config["use_rslora"])
             for layer in existing):
        raise UserError(f"{path}: the model's adapters have a different scaling than {ADAPTER_CONFIG} describes")
    params = {name: p for name, p in model.named_parameters() if is_lora_param(name)}
    with open_file(weights_file) as f:
        keys = {adapter_param_name(key): key for key in f.keys()}
        stored = set(keys)
        missing, unexpected = sorted(set(params) - stored), sorted(stored - set(params))
        if missing or unexpected:
            raise UserError(f"{weights_file}: adapter does not match the model and {ADAPTER_CONFIG} "
                            f"(missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                            f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''})")
        for name in sorted(stored):
            shape = tuple(f.get_slice(keys[name]).get_shape())
            if shape != tuple(params[name].shape):
                raise UserError(f"{weights_file}: tensor {name} has shape {shape}, the model expects "
                                f"{tuple(params[name].shape)} (r={config['r']} in {ADAPTER_CONFIG})")
        for name in sorted(stored):
            read_into(f, keys[name], params[name], weights_file)
    return config


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
