"""The model card (README.md) an export carries: what the model is, the stages
that trained it (read from each stage's training_args.yaml, following
model_name_or_path back), the data, and the last logged metrics.
"""

from __future__ import annotations

import json
import math
import os

from nanobumble.base.errors import DataError, UserError
from nanobumble.data.records import list_data_files
from nanobumble.data.shards import read_meta
from nanobumble.model.transformer import ModelConfig
from nanobumble.store.checkpoint import read_trainer_state
from nanobumble.store.run_files import read_metrics, read_training_args
from nanobumble.store.tensor_files import DamagedFile


def training_lineage(model_dir: str, args: dict, max_stages: int = 10) -> list[dict]:
    """training_args of this model, then of the model it started from (model_name_or_path),
    and so on while those directories are still here: newest first."""
    lineage, seen = [args], {os.path.abspath(model_dir)}
    while len(lineage) < max_stages:
        parent = str(lineage[-1].get("model_name_or_path") or "")
        if not os.path.isdir(parent) or os.path.abspath(parent) in seen:
            break
        seen.add(os.path.abspath(parent))
        try:
            parent_args = read_training_args(parent)
        except UserError:
            break  # a damaged ancestor only shortens the model card
        if not parent_args:
            break
        lineage.append(parent_args)
    return lineage


def data_summary(dataset_path: str) -> str:
    """The dataset path, with its size when it is still readable from here."""

    if not dataset_path:
        return ""
    text = f"`{dataset_path}`"
    try:
        if os.path.isfile(os.path.join(dataset_path, "meta.json")):  # prepared token shards
            meta = read_meta(dataset_path)
            return text + f" ({meta['train_tokens']:,} training tokens)"
        files = list_data_files(dataset_path)
        size = sum(os.path.getsize(path) for path in files)
        size_text = f"{size / 1e6:,.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"
        return text + f" ({len(files)} file{'s' * (len(files) != 1)}, {size_text})"
    except (DataError, OSError, KeyError, TypeError, ValueError):
        return text

HOUSEKEEPING_METRICS = ("train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu", "train/tokens",
                        "train/padded_tokens")


def final_metrics(model_dir: str, args: dict) -> tuple[str, dict[str, tuple[int, float]]]:
    """(where they came from, {metric: (step, last value)}) from metrics.jsonl. A merged
    LoRA run keeps its metrics in the adapter directory, and a checkpoint in its run's
    directory (output_dir): used when that directory's training_args.yaml is the model's
    own, i.e. the same run, and for a checkpoint only up to its step."""
    last_step = math.inf
    if os.path.isfile(os.path.join(model_dir, "trainer_state.json")):  # a checkpoint
        try:
            last_step = read_trainer_state(model_dir)["step"]
        except (DamagedFile, KeyError):
            return "", {}
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        run_dir = str(args.get("output_dir") or "")
        same_run = run_dir and os.path.isdir(run_dir) and os.path.isfile(os.path.join(run_dir, "metrics.jsonl"))
        try:
            same_run = same_run and read_training_args(run_dir) == args
        except UserError:
            same_run = False
        if not same_run:
            return "", {}
        path = os.path.join(run_dir, "metrics.jsonl")
    last: dict[str, tuple[int, float]] = {}
    records, _ = read_metrics(path)  # a damaged line (a killed run) does not stop the export
    for record in records:
        if record["step"] > last_step:
            continue
        for key, value in record.items():
            if key != "step" and key not in HOUSEKEEPING_METRICS and isinstance(value, (int, float)):
                last[key] = (record["step"], float(value))
    return path, last


def stage_summary(args: dict) -> str:
    stage = str(args.get("stage") or "unknown")
    details = [str(args[key]) for key in ("finetuning_type",) if key in args]
    if stage == "dpo" and "pref_loss" in args:
        details.append(f"{args['pref_loss']}, beta {args.get('pref_beta')}")
    steps = args.get("max_steps")
    if isinstance(steps, (int, float)) and steps > 0:  # max_steps overrides num_epochs
        details.append(f"{steps} steps")
    elif "num_epochs" in args:
        details.append(f"{args['num_epochs']} epochs")
    return stage + (f" ({', '.join(details)})" if details else "")


def model_card(model_path: str, args: dict, cfg: ModelConfig, num_parameters: int, dtype_name: str,
               system_prompt: str) -> str:
    """README.md of the export: what the model is, how it was trained, how it ended."""
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [nanobumble, qwen2]", "---",
             f"# {os.path.basename(os.path.normpath(model_path))}", "",
             f"Qwen2ForCausalLM exported by nanobumble from `{model_path}`: {num_parameters / 1e6:.1f}M parameters, "
             f"{dtype_name}, {cfg.num_layers} layers, vocabulary {cfg.vocab_size}, "
             f"context {cfg.max_position_embeddings} tokens.", ""]
    lineage = training_lineage(model_path, args) if args else []
    if lineage:
        lines += ["## Training", "", "| stage | started from | data |", "|---|---|---|"]
        for stage_args in reversed(lineage):  # oldest first
            lines.append(f"| {stage_summary(stage_args)} | `{stage_args.get('model_name_or_path', '')}` | "
                         f"{data_summary(str(stage_args.get('dataset_path') or ''))} |")
        lines.append("")
    else:
        lines += ["No training_args.yaml: the training history is unknown.", ""]
    lines += [f"Chat template system prompt: {json.dumps(system_prompt, ensure_ascii=False)}"
              if system_prompt else "Chat template: no system prompt is added.", ""]
    source, metrics = final_metrics(model_path, args)
    if metrics:
        lines += ["## Final metrics", "", f"Last logged values, from `{source}`:", "",
                  "| metric | value | step |", "|---|---|---|"]
        lines += [f"| {key} | {value:.4g} | {step} |" for key, (step, value) in metrics.items()]
        lines.append("")
    return "\n".join(lines)
