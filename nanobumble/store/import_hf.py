"""Start from a Hugging Face Qwen2 model directory (what `save_pretrained` writes,
e.g. Qwen2.5-0.5B): its config.json becomes a ModelConfig, and its weights load
by name. The other direction is hf_export.py.

    config.json                        model_type: qwen2
    model.safetensors                  or model-0000N-of-0000M.safetensors + model.safetensors.index.json
    tokenizer.json                     byte-level BPE (loaded by hf_tokenizer.py)
    tokenizer_config.json              its chat template

Names: Qwen2ForCausalLM keeps everything but the LM head under "model."
(model.layers.0.self_attn.q_proj.weight); nanobumble drops that prefix. A tied
model may leave lm_head.weight out. Nothing here needs transformers.
"""

from __future__ import annotations

import json
import os

from nanobumble.base.errors import ConfigError
from nanobumble.model.transformer import ModelConfig
from nanobumble.store.tensor_files import DamagedFile

# The architecture's own switches: any other value changes the math nanobumble implements.
REQUIRED = {"hidden_act": "silu", "use_sliding_window": False, "rope_scaling": None}


def is_hf_config(data: dict) -> bool:
    return "model_type" in data


def model_config_from_hf(data: dict, source: str):
    """A transformers Qwen2 config.json (as a dict) -> ModelConfig."""
    if data.get("model_type") != "qwen2":
        raise ConfigError(f"{source}: model_type {data.get('model_type')!r}: only qwen2 models can be imported")
    for key, value in REQUIRED.items():
        if data.get(key, value) != value:
            raise ConfigError(f"{source}: {key}={data[key]!r} is not supported (nanobumble implements "
                              f"{key}={value!r})")
    rope = data.get("rope_parameters") or {}  # newer transformers keep rope_theta here
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"{source}: rope_parameters.rope_type={rope['rope_type']!r} is not supported")
    try:
        return ModelConfig(
            vocab_size=data["vocab_size"], hidden_size=data["hidden_size"], num_layers=data["num_hidden_layers"],
            num_heads=data["num_attention_heads"],
            num_kv_heads=data.get("num_key_value_heads", data["num_attention_heads"]),
            intermediate_size=data["intermediate_size"], max_position_embeddings=data["max_position_embeddings"],
            rope_theta=float(rope.get("rope_theta", data.get("rope_theta", 10000.0))),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)), qkv_bias=True,  # Qwen2 always has q/k/v biases
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise ConfigError(f"{source}: missing key {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def weight_files(directory: str) -> list[str]:
    """The safetensors files of a model directory: model.safetensors, or the shards
    its model.safetensors.index.json lists."""
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    index = os.path.join(directory, "model.safetensors.index.json")
    if not os.path.isfile(index):
        raise DamagedFile(f"{single}: not found (nor a model.safetensors.index.json)")
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedFile(f"{index}: not a safetensors index ({e})") from None
    missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise DamagedFile(f"{index}: lists {missing[0]}, which is not in {directory}")
    return [os.path.join(directory, name) for name in files]


def weight_name(key: str) -> str:
    """A tensor's name in a Hugging Face or nanobumble file -> nanobumble's name."""
    return key.removeprefix("model.")
