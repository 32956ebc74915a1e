"""Quality benchmark: does every stage make the model better at its defaults, on held-out data?

    python tests/bench_quality.py                        # pretrain -> SFT -> DPO, 3 seeds (about 25 min on 2 CPU cores)
    python tests/bench_quality.py --seeds 0 --work_dir /tmp/bq --pretrained /tmp/bq/pretrain
    python -m pytest -m bench_long tests/bench/test_bench_quality.py -s

One no-argument pretraining (`python train_pretrain.py`, only output_dir and
cache_dir redirected), then for each seed, on the word-transform task of
tests/word_task.py (its data drawn with that seed):

    SFT   `python train_sft.py` at its defaults from the pretrained model
    DPO   `python train_dpo.py` at its defaults (LoRA) from the SFT model, validated on
          the held-out prompts' preference pairs

Each script runs as a subprocess, as a user would run it; only the paths, the
seed and --plot/--use_tensorboard false are passed (DPO also gets
--eval_dataset_path and --eval_rows to score all the held-out pairs;
--sft_args / --dpo_args add overrides, for experiments). After each stage:
greedy exact match on the held-out prompts (nanobumble.evaluate's exact-match
task, through the chat template with the system prompt training used), counted
case-sensitively (evaluate casefolds, which would score "uppercase" answers
left in lower case as right). Prints a table with the pretraining's val bpb,
DPO's held-out reward accuracy and val/drift/chosen (the chosen answers' mean
log-prob per token minus the SFT model's), and the wall time of each stage.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from helpers import format_table, read_metrics
from word_task import write_word_task

from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT
from nanobumble.evals.scoring import run_tasks
from nanobumble.evals.tasks import load_tasks
from nanobumble.inference.loading import load_model

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)

QUIET = ["--plot", "false", "--use_tensorboard", "false"]


def run_script(script: str, args: list[str], log_path: str) -> float:
    """Run a training script as a user would; its output goes to log_path. Returns seconds."""
    start = time.time()
    with open(log_path, "w") as log:
        result = subprocess.run([sys.executable, script] + args, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        with open(log_path) as log:
            raise RuntimeError(f"{script} {shlex.join(args)} failed:\n{log.read()[-3000:]}")
    return time.time() - start


def last_value(output_dir: str, key: str) -> float:
    """The last logged value of a metric in output_dir/metrics.jsonl."""
    return [m[key] for m in read_metrics(output_dir) if key in m][-1]


def exact_match(model_path: str, task_file: str, adapter_path: str = "",
                system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> float:
    """Greedy exact match on the held-out prompts, through the chat template, case-sensitive."""
    model, tokenizer, _, _ = load_model(model_path, adapter_path, torch.device("cpu"), torch.float32)
    result = run_tasks(model, tokenizer, load_tasks([task_file]), torch.device("cpu"), torch.float32,
                       batch_size=50, chat=True, max_new_tokens=24, system_prompt=system_prompt)[0]
    return sum(d["output"].strip() in d["answers"] for d in result.details) / result.n


def pretrain(work_dir: str, cache_dir: str) -> tuple[str, float]:
    """The no-argument pretraining into work_dir/pretrain; (model directory, seconds)."""
    output_dir = os.path.join(work_dir, "pretrain")
    seconds = run_script("train_pretrain.py", ["--output_dir", output_dir, "--cache_dir", cache_dir] + QUIET,
                         os.path.join(work_dir, "pretrain.log"))
    return output_dir, seconds


def sft_and_dpo(work_dir: str, base: str, cache_dir: str, seed: int, sizes: tuple[int, int, int],
                sft_args: list[str] = (), dpo_args: list[str] = ()) -> dict:
    """SFT then DPO at the scripts' defaults (plus any overrides) for one seed; their numbers."""
    root = os.path.join(work_dir, f"seed{seed}")
    paths = write_word_task(os.path.join(root, "data"), seed, *sizes)
    sft_dir, dpo_dir = os.path.join(root, "sft"), os.path.join(root, "dpo")
    common = ["--seed", str(seed), "--cache_dir", cache_dir, "--overwrite_output_dir", "true"] + QUIET
    row = {"seed": seed}
    row["sft_seconds"] = run_script("train_sft.py", ["--model_name_or_path", base, "--dataset_path", paths["sft"],
                                                     "--output_dir", sft_dir] + common + list(sft_args),
                                    os.path.join(root, "sft.log"))
    row["sft_em"] = exact_match(sft_dir, paths["held_out"])
    row["sft_val_loss"] = last_value(sft_dir, "val/loss")
    row["dpo_seconds"] = run_script("train_dpo.py", ["--model_name_or_path", sft_dir, "--dataset_path", paths["dpo"],
                                                     "--eval_dataset_path", paths["held_out_pairs"],
                                                     "--eval_rows", "100000", "--output_dir", dpo_dir]
                                    + common + list(dpo_args), os.path.join(root, "dpo.log"))
    row["dpo_em"] = exact_match(sft_dir, paths["held_out"], adapter_path=dpo_dir)
    row["reward_acc"] = last_value(dpo_dir, "val/rewards/accuracies")
    row["drift"] = last_value(dpo_dir, "val/drift/chosen")
    with open(os.path.join(root, "dpo.log")) as log:
        row["warned"] = "likelihood displacement" in log.read()
    return row


def table_rows(base_em: float, bpb: float, pretrain_seconds: float, runs: list[dict]) -> tuple[list, list]:
    seeds = [r["seed"] for r in runs]
    header = ["stage"] + [f"exact match seed {s}" for s in seeds] + \
             ["mean", "val bpb", "held-out reward acc", "val/drift/chosen", "minutes per seed"]
    blank = [""] * len(seeds)

    def row(stage, key, *rest):
        values = [r[key] for r in runs]
        return [stage] + [f"{v:.3f}" for v in values] + [f"{statistics.mean(values):.3f}"] + list(rest)

    mean = lambda key: statistics.mean(r[key] for r in runs)  # noqa: E731
    pretrain_time = "reused" if pretrain_seconds != pretrain_seconds else f"{pretrain_seconds / 60:.1f} (once)"  # NaN
    rows = [["pretrain (no arguments)"] + blank + [f"{base_em:.3f}", f"{bpb:.3f}", "", "", pretrain_time],
            row("SFT (defaults)", "sft_em", "", "", "", f"{mean('sft_seconds') / 60:.1f}"),
            row("DPO (defaults, LoRA)", "dpo_em", "", f"{mean('reward_acc'):.3f}",
                f"{mean('drift'):.3f}", f"{mean('dpo_seconds') / 60:.1f}")]
    return header, rows


def run_benchmark(work_dir: str, seeds: list[int], sizes: tuple[int, int, int] = (3000, 3000, 200),
                  pretrained: str = "", sft_args: list[str] = (), dpo_args: list[str] = ()) -> str:
    """The whole benchmark; returns the printed table."""
    start = time.time()
    cache_dir = os.path.join(work_dir, "cache")
    if pretrained:
        base, pretrain_seconds = pretrained, float("nan")
    else:
        base, pretrain_seconds = pretrain(work_dir, cache_dir)
    bpb = last_value(base, "val/bpb")
    runs = []
    for seed in seeds:
        runs.append(sft_and_dpo(work_dir, base, cache_dir, seed, sizes, sft_args, dpo_args))
        print(f"seed {seed}: {runs[-1]}", flush=True)
    first_data = os.path.join(work_dir, f"seed{seeds[0]}", "data", "held_out.jsonl")
    base_em = exact_match(base, first_data)
    header, rows = table_rows(base_em, bpb, pretrain_seconds, runs)
    drifts = ", ".join(f"{r['drift']:.3f}" for r in runs)
    warned = sum(r["warned"] for r in runs)
    title = (f"word-transform task ({sizes[0]} SFT instructions, {sizes[1]} pairs, {sizes[2]} held-out prompts; "
             f"greedy, case-sensitive exact match), {os.cpu_count()} CPU cores, {(time.time() - start) / 60:.0f} min"
             + (f"; overrides SFT {shlex.join(sft_args)} DPO {shlex.join(dpo_args)}" if sft_args or dpo_args else ""))
    return (format_table(title, header, rows) +
            f"\nDPO val/drift/chosen per seed: {drifts}; likelihood-displacement warnings: {warned} of {len(runs)} runs")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default="", help="where the runs go (default: a temporary directory)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated")
    parser.add_argument("--sft", type=int, default=3000, help="SFT instructions")
    parser.add_argument("--pairs", type=int, default=3000, help="preference pairs")
    parser.add_argument("--held_out", type=int, default=200, help="held-out prompts")
    parser.add_argument("--pretrained", default="", help="reuse this pretrained model instead of pretraining")
    parser.add_argument("--sft_args", default="", help="extra train_sft.py arguments (experiments)")
    parser.add_argument("--dpo_args", default="", help="extra train_dpo.py arguments (experiments)")
    parser.add_argument("--output", default="", help="also write the table to this file")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        table = run_benchmark(args.work_dir or scratch, seeds, (args.sft, args.pairs, args.held_out),
                              args.pretrained, shlex.split(args.sft_args), shlex.split(args.dpo_args))
    print("\n" + table)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
