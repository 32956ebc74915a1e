"""Evaluate a model on benchmark files: the command line of nanobumble/evals/
(tasks.py: the file formats and prompts; scoring.py: how each kind is scored).

    python -m nanobumble.evaluate --model_path checkpoints/sft/tiny_instruct \
        --tasks datasets/eval/ceval/val datasets/eval/mmlu/test --num_fewshot 5
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from nanobumble.base.errors import UserError, run_cli
from nanobumble.base.output_guard import publish_file
from nanobumble.base.precision import PRECISIONS, resolve_precision
from nanobumble.base.reading import read_json
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT
from nanobumble.evals.scoring import flat_metrics, format_table, overall_accuracy, run_tasks
from nanobumble.evals.tasks import BPB, load_tasks
from nanobumble.inference.loading import load_model, resolve_device, resolve_mode
from nanobumble.run.config import _check_choice, _check_range, check_numbers, parse_config


@dataclass
class EvalConfig:
    model_path: str  # a model directory (or a LoRA run's output directory)
    tasks: list[str]  # task files or directories of them: --tasks a.csv dir/ ...
    adapter_path: str = ""  # a LoRA adapter applied on top of model_path
    num_fewshot: int = 0  # solved dev examples before each question
    batch_size: int = 8  # sequences per forward
    mode: str = "auto"  # exact-match prompts: chat | completion (raw) | auto (as chat.py decides)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # chat mode's system turn
    max_new_tokens: int = 32  # longest generated answer
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    output: str = ""  # the results JSON ("" = eval_results.json beside the model)

    def __post_init__(self):
        check_numbers(self)  # ranges: NUMBERS in run/config.py
        _check_range(self, "tasks", lambda v: len(v) > 0, "one or more task files or directories")
        _check_choice(self, "mode", ("auto", "chat", "completion"))
        _check_choice(self, "precision", PRECISIONS)


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, EvalConfig)

    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    tasks = load_tasks(cfg.tasks, cfg.num_fewshot)  # a bad file fails before the model loads
    # An --output that can never be written fails now, not after the whole evaluation.
    if cfg.output and os.path.isdir(cfg.output):
        raise UserError(f"--output {cfg.output}: is a directory; expected the results file's name")

    model, tokenizer, model_path, adapter_path = load_model(cfg.model_path, cfg.adapter_path, device, dtype)
    output = cfg.output or os.path.join(adapter_path or model_path, "eval_results.json")
    inputs = {f"the task file {task.path}": task.path for task, _ in tasks}
    for directory in filter(None, (model_path, adapter_path)):  # the files the model came from
        inputs.update({f"{directory}'s {name}": os.path.join(directory, name) for name in os.listdir(directory)
                       if os.path.join(directory, name) != output or not is_results_file(output)})
    mode, _ = resolve_mode(cfg.mode, model_path, adapter_path)
    zero_shot = " (bits per byte: 0-shot)" if cfg.num_fewshot and any(t.kind == BPB for t, _ in tasks) else ""
    print(f"model: {model_path}{f' + adapter {adapter_path}' if adapter_path else ''} on {device} "
          f"{str(dtype).removeprefix('torch.')}; {len(tasks)} task files, {cfg.num_fewshot}-shot{zero_shot}, "
          f"exact match in {mode} mode", file=sys.stderr)
    # checked (and locked) before the work: never a model's file, never a file this program did not write
    with publish_file(output, inputs, "--output", is_results_file) as tmp:
        results = run_tasks(model, tokenizer, tasks, device, dtype, cfg.batch_size, mode == "chat",
                            cfg.max_new_tokens, cfg.system_prompt, progress=True)
        print(format_table(results))
        report = {"model_path": model_path, "adapter_path": adapter_path, "num_fewshot": cfg.num_fewshot,
                  "mode": mode, "device": str(device), "precision": str(dtype).removeprefix("torch."),
                  "metrics": flat_metrics(results), "overall": overall_accuracy(results),
                  "tasks": {r.name: {"path": r.path, "type": r.kind, "n": r.n, "num_fewshot": r.num_fewshot,
                                     **r.metrics, "details": r.details} for r in results}}
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    print(f"results: {output}", file=sys.stderr)


def is_results_file(path: str) -> bool:
    """Whether path holds an earlier results file of this program (which it may replace)."""
    try:
        report = read_json(path, max_bytes=1 << 29)  # per-item details make large files
    except (UserError, OSError):
        return False
    return isinstance(report, dict) and {"metrics", "tasks", "model_path"} <= set(report)


if __name__ == "__main__":
    run_cli(main)
