"""LoRA adapter files, as PEFT writes them: adapter_model.safetensors (the A and
B matrices) and adapter_config.json (rank, alpha, dropout, target modules). The
LoRA math itself is model/lora.py.

An adapter directory is written as PEFT writes one, so that PeftModel.from_pretrained
loads it onto the exported (Hugging Face) base: tensor names are the Hugging Face
module names under PEFT's wrapper, and adapter_config.json carries PEFT's keys.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from nanobumble.base.distributed import is_main
from nanobumble.base.errors import UserError
from nanobumble.base.files import atomic_write_text
from nanobumble.base.reading import cut, read_json
from nanobumble.model.lora import (
    ALL_MODULES,
    inject_lora,
    is_lora_param,
    lora_layers,
    lora_scaling,
    lora_settings_problem,
    parse_target_modules,
)
from nanobumble.store.tensor_files import open_file, read_into, write_gathered

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
        raise UserError(f"{source}: peft_type {cut(repr(config.get('peft_type')))} / task_type "
                        f"{cut(repr(config.get('task_type')))}: only LORA adapters for CAUSAL_LM are supported")
    for key, value in config.items():
        if key in ADAPTER_CONFIG_KEYS or key in PEFT_IGNORED_KEYS:
            continue
        if not (value in (None, False, "none") or value == [] or value == {}):
            raise UserError(f"{source}: {cut(key)}={cut(repr(value))} is not supported (nanobumble's LoRA implements "
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
    problem = lora_settings_problem(out["r"], out["lora_alpha"], out["lora_dropout"],
                                    names=("r", "lora_alpha", "lora_dropout"))
    if problem:
        raise UserError(f"{source}: {problem}")
    if not isinstance(out["use_rslora"], bool):
        raise UserError(f"{source}: use_rslora must be true or false, got {cut(repr(out['use_rslora']))}")
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
    if not os.path.exists(config_file):
        raise UserError(f"{config_file}: not found (not a LoRA adapter directory?)")
    return validate_adapter_config(read_json(config_file), config_file)


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
