"""Fold a LoRA adapter into its base model and write a plain model directory.

    python -m nanobumble.merge_lora --base_model_path checkpoints/sft/tiny \
        --lora_model_path checkpoints/dpo/tiny_lora --save_path checkpoints/dpo/tiny_merged

The result loads like any other model directory (chat, further training):
config.json and model.safetensors from the merged weights; tokenizer.model and
training_args.yaml from the adapter directory when it has them, else from the
base (an empty mapping when neither has training_args.yaml).
"""

from __future__ import annotations

import argparse
import os

from nanobumble.base.errors import UserError, run_cli
from nanobumble.data.tokenizer import has_tokenizer, load_tokenizer
from nanobumble.model.lora import merge_lora
from nanobumble.store.adapter import ADAPTER_CONFIG, load_adapter
from nanobumble.store.model_dir import check_output_dir, load_model_dir, save_model_dir


def _first_existing(name: str, *directories: str) -> str | None:
    for directory in directories:
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanobumble.merge_lora", description=__doc__.split("\n")[0])
    parser.add_argument("--base_model_path", required=True, help="model directory the adapter was trained on")
    parser.add_argument("--lora_model_path", required=True, help="directory with adapter_model.safetensors "
                                                                 "and adapter_config.json")
    parser.add_argument("--save_path", required=True, help="where to write the merged model directory")
    parser.add_argument("--overwrite_output_dir", default="false", choices=["true", "false"],
                        help="replace a model already in save_path")
    args = parser.parse_args(argv)

    for flag, path, needed in (("--base_model_path", args.base_model_path, "config.json"),
                               ("--lora_model_path", args.lora_model_path, ADAPTER_CONFIG)):
        if not os.path.isdir(path):
            raise UserError(f"{flag} {path}: no such directory")
        if not os.path.isfile(os.path.join(path, needed)):
            raise UserError(f"{flag} {path}: has no {needed}")
    for flag, path in (("--base_model_path", args.base_model_path), ("--lora_model_path", args.lora_model_path)):
        if os.path.abspath(args.save_path) == os.path.abspath(path):
            raise UserError(f"--save_path is {flag}: the merge would replace its own input (and a second run "
                            f"would merge the adapter twice); pick another directory")
    check_output_dir(args.save_path, args.overwrite_output_dir == "true", "--save_path")
    tokenizer_dir = next((d for d in (args.lora_model_path, args.base_model_path) if has_tokenizer(d)), None)
    if tokenizer_dir is None:
        raise UserError(f"neither {args.lora_model_path} nor {args.base_model_path} has a tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)

    model, _ = load_model_dir(args.base_model_path)
    config = load_adapter(model, args.lora_model_path)
    merge_lora(model)

    args_file = _first_existing("training_args.yaml", args.lora_model_path)
    if args_file:
        with open(args_file, encoding="utf-8") as f:
            training_args_yaml = f.read()
    else:
        training_args_yaml = "{}\n"
    save_model_dir(args.save_path, model, tokenizer, training_args_yaml)

    trained_on = config["base_model_name_or_path"]
    print(f"merged {args.lora_model_path} (r={config['r']}, lora_alpha={config['lora_alpha']}, "
          f"use_rslora={str(config['use_rslora']).lower()}, targets {','.join(config['target_modules'])}) "
          f"into {args.base_model_path}")
    if trained_on and os.path.abspath(trained_on) != os.path.abspath(args.base_model_path):
        print(f"note: the adapter was trained on {trained_on}")
    print(f"wrote {args.save_path}: config.json, model.safetensors ({model.num_parameters():,} parameters), "
          f"{', '.join(tokenizer.files)} (from {tokenizer_dir}), training_args.yaml"
          f"{' (from ' + args.lora_model_path + ')' if args_file else ' (empty)'}")


if __name__ == "__main__":
    run_cli(main)
