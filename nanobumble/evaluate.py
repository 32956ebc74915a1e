"""Evaluate a model on benchmark files: the command line of nanobumble/evals/
(tasks.py: the file formats and prompts; scoring.py: how each kind is scored).

    python -m nanobumble.evaluate --model_path checkpoints/sft/tiny_instruct \
        --tasks datasets/eval/ceval/val datasets/eval/mmlu/test --num_fewshot 5 [--limit 100]

The results JSON is laid out as lm-evaluation-harness's results file, so the
same readers work on both:

    results           {task: {"name", "alias", "sample_len", "acc,none", "acc_stderr,none", ...}}
                      (metrics: acc, acc_norm, bpb, exact_match; a stderr is "N/A" where there is none)
    groups            {"overall": the same, over every multiple-choice and continuation question}
    group_subtasks    {"overall": [its tasks]}
    configs           {task: {"task", "dataset_path", "type", "num_fewshot", "metric_list"}}
    versions          {task: SCORING_VERSION}       n-shot   {task: solved examples per question}
    higher_is_better  {task: {metric: bool}}        n-samples  {task: {"original", "effective"}}
    samples           {task: [per item: doc_id, file:line, log-likelihoods or output, its metric values]}
    config            model, model_args (model_path, adapter_path), batch_size, device, precision,
                      mode, max_new_tokens, limit (null: none)
    date, total_evaluation_time_seconds, model_source, model_name
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

from nanobumble.base.cpu import apply_num_threads, cpu_line
from nanobumble.base.errors import UserError, run_cli
from nanobumble.base.output_guard import publish_file
from nanobumble.base.precision import PRECISIONS, resolve_precision
from nanobumble.base.reading import read_json
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT
from nanobumble.evals.scoring import TaskResult, format_table, overall_accuracy, run_tasks
from nanobumble.evals.tasks import BPB, apply_limit, load_tasks
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
    precision: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | bf16 | fp32
    num_threads: int = 0  # CPU threads for PyTorch's operations; 0: the free physical cores at start (base/cpu.py)
    output: str = ""  # the results JSON ("" = eval_results.json beside the model)
    limit: float = 0  # the first N items of each task; 0 < N < 1: that fraction (rounded up); 0: all

    def __post_init__(self):
        check_numbers(self)  # ranges: NUMBERS in run/config.py
        _check_range(self, "tasks", lambda v: len(v) > 0, "one or more task files or directories")
        # lm_eval truncates 2.5 to 2; a count that is not whole is more likely a typo
        _check_range(self, "limit", lambda v: v < 1 or v == int(v), "a whole number of items, or a fraction < 1")
        _check_choice(self, "mode", ("auto", "chat", "completion"))
        _check_choice(self, "precision", PRECISIONS)


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, EvalConfig)

    device = resolve_device(cfg.device)
    if cfg.num_threads or device.type == "cpu":
        apply_num_threads(cfg.num_threads)
    dtype = resolve_precision(cfg.precision, device)
    started = time.time()
    tasks = apply_limit(load_tasks(cfg.tasks, cfg.num_fewshot), cfg.limit)  # a bad file fails before the model loads
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
    if device.type == "cpu":
        print(cpu_line(), file=sys.stderr)  # cpu: ..., native bf16: no (flags: avx2); threads: ...
    print(f"model: {model_path}{f' + adapter {adapter_path}' if adapter_path else ''} on {device} "
          f"{str(dtype).removeprefix('torch.')}; {len(tasks)} task files, {cfg.num_fewshot}-shot{zero_shot}, "
          f"exact match in {mode} mode{f', limit {cfg.limit:g}' if cfg.limit else ''}", file=sys.stderr)
    # checked (and locked) before the work: never a model's file, never a file this program did not write
    with publish_file(output, inputs, "--output", is_results_file) as tmp:
        results = run_tasks(model, tokenizer, tasks, device, dtype, cfg.batch_size, mode == "chat",
                            cfg.max_new_tokens, cfg.system_prompt, progress=True)
        print(format_table(results, cfg.limit))
        report = results_json(results, cfg, model_path, adapter_path, mode, device, dtype, started)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    print(f"results: {output}", file=sys.stderr)


# Bumped when a prompt or a scoring rule changes, so that results from before and after are not compared
# (lm-evaluation-harness's task versions).
SCORING_VERSION = 1
HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "bpb": False, "exact_match": True}


def metric_entries(name: str, n: int, values: dict[str, float], stderrs: dict[str, float | str]) -> dict:
    """lm-evaluation-harness's per-task entry: "acc,none" and "acc_stderr,none" (",none": no filter)."""
    entry: dict = {"name": name, "alias": name, "sample_len": n}
    for metric, value in values.items():
        entry[f"{metric},none"] = value
        entry[f"{metric}_stderr,none"] = stderrs[metric]
    return entry


def results_json(results: list[TaskResult], cfg: EvalConfig, model_path: str, adapter_path: str, mode: str,
                 device, dtype, started: float) -> dict:
    """The results file, in lm-evaluation-harness's layout (the module docstring)."""
    report: dict = {"results": {r.name: metric_entries(r.name, r.n, r.metrics, r.stderrs) for r in results}}
    overall = overall_accuracy(results)
    if overall:
        report["groups"] = {"overall": metric_entries("overall", overall["n"], {"acc": overall["acc"]},
                                                      {"acc": overall["acc_stderr"]})}
    report["group_subtasks"] = {"overall": overall["tasks"]} if overall else {}
    report["configs"] = {r.name: {"task": r.name, "dataset_path": r.path, "type": r.kind,
                                  "num_fewshot": r.num_fewshot, "metric_list": [{"metric": m} for m in r.metrics]}
                         for r in results}
    report["versions"] = {r.name: SCORING_VERSION for r in results}
    report["n-shot"] = {r.name: r.num_fewshot for r in results}
    report["higher_is_better"] = {r.name: {m: HIGHER_IS_BETTER[m] for m in r.metrics} for r in results}
    report["n-samples"] = {r.name: {"original": r.total or r.n, "effective": r.n} for r in results}
    report["samples"] = {r.name: r.details for r in results}
    report["config"] = {"model": "nanobumble", "model_args": {"model_path": model_path, "adapter_path": adapter_path},
                        "batch_size": cfg.batch_size, "device": str(device),
                        "precision": str(dtype).removeprefix("torch."), "mode": mode,
                        "max_new_tokens": cfg.max_new_tokens, "limit": cfg.limit or None}
    report["date"] = started
    report["total_evaluation_time_seconds"] = str(time.time() - started)  # a string, as lm-evaluation-harness's
    report["model_source"], report["model_name"] = "nanobumble", model_path
    return report


def is_results_file(path: str) -> bool:
    """Whether path holds an earlier results file of this program (which it may replace)."""
    try:
        report = read_json(path, max_bytes=1 << 29)  # per-item details make large files
    except (UserError, OSError):
        return False
    if not isinstance(report, dict):
        return False
    # this layout, or the one before it ("metrics", "tasks", "model_path")
    return report.get("model_source") == "nanobumble" and {"results", "n-samples", "config"} <= set(report) or \
        {"metrics", "tasks", "model_path"} <= set(report)


if __name__ == "__main__":
    run_cli(main)
