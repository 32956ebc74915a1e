"""Fold a LoRA adapter into its base model and write a plain model directory.

    python -m nanobumble.merge_lora --base_model_path checkpoints/sft/tiny \
        --lora_model_path checkpoints/dpo/tiny_lora --save_path checkpoints/dpo/tiny_merged

The result loads like any other model directory (chat, further training):
config.json and model.safetensors from the merged weights; tokenizer.model and
training_args.yaml from the adapter directory when it has them, else from the
base (an empty mapping when neither has training_args.yaml).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from nanobumble.base.errors import UserError, run_cli
from nanobumble.base.output_guard import publish_directory
from nanobumble.data.tokenizer import has_tokenizer, load_tokenizer
from nanobumble.model.lora import merge_lora
from nanobumble.run.config import parse_config
from nanobumble.store.adapter import ADAPTER_CONFIG, load_adapter
from nanobumble.store.model_dir import load_model_dir, save_model_dir, weights_usable


@dataclass
class MergeConfig:
    base_model_path: str  # model directory the adapter was trained on
    lora_model_path: str  # directory with adapter_model.safetensors and adapter_config.json
    save_path: str  # where to write the merged model directory
    overwrite_output_dir: bool = False  # replace a model already in save_path


def _first_existing(name: str, *directories: str) -> str | None:
    for directory in directories:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, MergeConfig)

    for flag, path, needed in (("--base_model_path", cfg.base_model_path, "config.json"),
                               ("--lora_model_path", cfg.lora_model_path, ADAPTER_CONFIG)):
        if not os.path.isdir(path):
            raise UserError(f"{flag} {path}: no such directory")
        if not os.path.isfile(os.path.join(path, needed)):
            raise UserError(f"{flag} {path}: has no {needed}")
    inputs = {"--base_model_path": cfg.base_model_path, "--lora_model_path": cfg.lora_model_path}
    tokenizer_dir = next((d for d in (cfg.lora_model_path, cfg.base_model_path) if has_tokenizer(d)), None)
    if tokenizer_dir is None:
        raise UserError(f"neither {cfg.lora_model_path} nor {cfg.base_model_path} has a tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)

    # the merged directory appears whole or not at all, never in place of an input (base/output_guard.py)
    with publish_directory(cfg.save_path, inputs, cfg.overwrite_output_dir, "--save_path") as tmp:
        model, _ = load_model_dir(cfg.base_model_path)
        config = load_adapter(model, cfg.lora_model_path)
        merge_lora(model)
        if not weights_usable(model, torch.device("cpu")):
            raise UserError(f"the merged weights are not finite (NaN/inf in {cfg.base_model_path} or the adapter "
                            f"{cfg.lora_model_path}, or a lora_alpha that overflows); nothing is written")
        args_file = _first_existing("training_args.yaml", cfg.lora_model_path)
        if args_file:
            with open(args_file, encoding="utf-8") as f:
                training_args_yaml = f.read()
        else:
            training_args_yaml = "{}\n"
        save_model_dir(tmp, model, tokenizer, training_args_yaml)

    trained_on = config["base_model_name_or_path"]
    print(f"merged {cfg.lora_model_path} (r={config['r']}, lora_alpha={config['lora_alpha']}, "
          f"use_rslora={str(config['use_rslora']).lower()}, targets {','.join(config['target_modules'])}) "
          f"into {cfg.base_model_path}")
    if trained_on and os.path.realpath(trained_on) != os.path.realpath(cfg.base_model_path):
        print(f"note: the adapter was trained on {trained_on}")
    print(f"wrote {cfg.save_path}: config.json, model.safetensors ({model.num_parameters():,} parameters), "
          f"{', '.join(tokenizer.files)} (from {tokenizer_dir}), training_args.yaml"
          f"{' (from ' + cfg.lora_model_path + ')' if args_file else ' (empty)'}")


if __name__ == "__main__":
    run_cli(main)
