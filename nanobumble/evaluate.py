"""Evaluate a model on benchmark files (the format of each task file, and how it is
scored, is described in nanobumble/evals/tasks.py).

    python -m nanobumble.evaluate --model_path checkpoints/sft/tiny_instruct \
        --tasks datasets/eval/ceval/val datasets/eval/mmlu/test --num_fewshot 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from nanobumble.base.errors import run_cli
from nanobumble.base.files import atomic_write_text
from nanobumble.base.precision import resolve_precision
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT
from nanobumble.evals.tasks import flat_metrics, format_table, load_tasks, overall_accuracy, run_tasks
from nanobumble.inference.loading import load_model, resolve_device, resolve_mode
from nanobumble.store.model_dir import check_writable


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanobumble.evaluate", description="Evaluate a model on benchmark files.")
    parser.add_argument("--model_path", required=True, help="a model directory (or a LoRA run's output directory)")
    parser.add_argument("--adapter_path", default="", help="a LoRA adapter applied on top of model_path")
    parser.add_argument("--tasks", required=True, nargs="+", help="task files or directories of them")
    parser.add_argument("--num_fewshot", type=int, default=0, help="solved dev examples before each question")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="sequences per forward")
    parser.add_argument("--mode", default="auto", choices=["auto", "chat", "completion"],
                        help="exact-match prompts: chat template or raw (auto: as chat.py decides)")
    parser.add_argument("--system_prompt", default=DEFAULT_SYSTEM_PROMPT, help="chat mode's system turn")
    parser.add_argument("--max_new_tokens", type=positive_int, default=32, help="longest generated answer")
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--output", default="", help="the results JSON (default: eval_results.json beside the model)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    tasks = load_tasks(args.tasks, args.num_fewshot)  # a bad file fails before the model loads
    model, tokenizer, model_path, adapter_path = load_model(args.model_path, args.adapter_path, device, dtype)
    output = args.output or os.path.join(adapter_path or model_path, "eval_results.json")
    check_writable(os.path.dirname(os.path.abspath(output)), "--output")  # before the work, not after
    mode, _ = resolve_mode(args.mode, model_path, adapter_path)
    print(f"model: {model_path}{f' + adapter {adapter_path}' if adapter_path else ''} on {device} "
          f"{str(dtype).removeprefix('torch.')}; {len(tasks)} task files, {args.num_fewshot}-shot, "
          f"exact match in {mode} mode", file=sys.stderr)
    results = run_tasks(model, tokenizer, tasks, device, dtype, args.batch_size, mode == "chat", args.max_new_tokens,
                        args.system_prompt, progress=True)
    print(format_table(results))
    report = {"model_path": model_path, "adapter_path": adapter_path, "num_fewshot": args.num_fewshot, "mode": mode,
              "device": str(device), "precision": str(dtype).removeprefix("torch."), "metrics": flat_metrics(results),
              "overall": overall_accuracy(results),
              "tasks": {r.name: {"path": r.path, "type": r.kind, "n": r.n, **r.metrics, "details": r.details}
                        for r in results}}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    atomic_write_text(output, json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    print(f"results: {output}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
