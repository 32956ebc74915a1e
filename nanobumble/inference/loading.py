"""Loading a trained model to use it: chat.py, python -m nanobumble.serve and
python -m nanobumble.evaluate share these, so they load and address a model the
same way.

A model path is a model directory (model.safetensors, or a Hugging Face
directory), or a LoRA run's output directory (adapter files only), whose base
model is read from adapter_config.json. An adapter path adds a LoRA adapter on
top, unmerged. Chat or completion: a model whose (adapter's) training_args.yaml
says stage sft or dpo is a chat model; any other is a base model that continues
text as it is.
"""

from __future__ import annotations

import os
import re
import sys

import torch

from nanobumble.base.errors import ConfigError, UserError
from nanobumble.base.precision import PRECISIONS
from nanobumble.data.tokenizer import load_tokenizer
from nanobumble.store.adapter import ADAPTER_CONFIG, load_adapter, read_adapter_config
from nanobumble.store.model_dir import check_model_dir, load_model_dir
from nanobumble.store.run_files import read_training_args

CHAT_STAGES = ("sft", "dpo")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_sampling_keys(cfg) -> None:
    """The keys chat.py and the server share that are not numbers: device, precision,
    system prompt (their numbers are held to NUMBERS in run/config.py, by check_numbers)."""
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"key 'precision' must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"key 'device' must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    try:
        cfg.system_prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8 come from the command line as lone surrogates
        raise ConfigError("key 'system_prompt' is not UTF-8 text") from None


def read_stage(directory: str) -> str | None:
    """The `stage` key of directory/training_args.yaml, if there is one."""
    args = read_training_args(directory) if directory else {}
    return str(args["stage"]) if args.get("stage") else None


def resolve_mode(mode: str, model_path: str, adapter_path: str) -> tuple[str, str]:
    """(mode, why). auto: chat if the adapter's or the model's training_args.yaml
    has stage sft or dpo, else completion."""
    if mode != "auto":
        return mode, "--mode"
    for directory in (adapter_path, model_path):
        stage = read_stage(directory)
        if stage in CHAT_STAGES:
            return "chat", f"{os.path.join(directory, 'training_args.yaml')} has stage: {stage}"
    return "completion", "no training_args.yaml with stage: sft or dpo"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name}: CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def load_model(model_path: str, adapter_path: str, device: torch.device, dtype: torch.dtype):
    """(model in eval mode, tokenizer, model_path, adapter_path): the paths as resolved,
    a LoRA run's directory standing for its base model plus its adapter."""
    if not os.path.isdir(model_path):
        raise UserError(f"model_path {model_path}: no such directory")
    if not os.path.isfile(os.path.join(model_path, "model.safetensors")) and not adapter_path \
            and os.path.isfile(os.path.join(model_path, ADAPTER_CONFIG)):
        adapter_path, model_path = model_path, read_adapter_config(model_path)["base_model_name_or_path"]
        log(f"{adapter_path} holds a LoRA adapter; base model: {model_path}")
    check_model_dir(model_path, "model_path")
    model, _ = load_model_dir(model_path)
    if adapter_path:
        adapter = load_adapter(model, adapter_path)
        log(f"adapter: {adapter_path} (r={adapter['r']}, {', '.join(adapter['target_modules'])})")
    model.to(device=device, dtype=dtype).eval()
    return model, load_tokenizer(model_path), model_path, adapter_path
