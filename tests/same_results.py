"""Fingerprint what a short run of every training stage produces, to check that a
change (a refactor, say) leaves the trained weights and logged metrics bit for bit
the same.

    python tests/same_results.py REPO [--work DIR] [--python PY]

runs, in REPO with PY (default: this interpreter), a few steps of each stage:

    1. pretrain, one process                 -> WORK/pretrain
    2. pretrain, two processes (torchrun)    -> WORK/pretrain2
    3. SFT, full fine-tuning of 1            -> WORK/sft_full
    4. SFT, LoRA on 1                        -> WORK/sft_lora
    5. DPO, LoRA (its default) on 3          -> WORK/dpo_lora
    6. DPO, full, precomputed reference, 3   -> WORK/dpo_full

each with its own output_dir and cache_dir under WORK (default: a fresh temporary
directory). It then prints "<sha256>  <path>" for every *.safetensors file and every
metrics.jsonl (with the timing keys of TIMING_KEYS removed from each line) under the
output dirs, sorted by path relative to WORK, and a last line with the sha256 of all
those lines. Run it on two checkouts and diff the outputs:

    python tests/same_results.py /path/to/old > old.txt
    python tests/same_results.py /path/to/new > new.txt
    diff old.txt new.txt

A failing stage stops the script with the end of its output and exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

# Keys of metrics.jsonl that measure speed, not results (run/stage.py, Progress.report):
# throughput, and model FLOPs utilisation (logged on CUDA only; derived from throughput).
TIMING_KEYS = ("train/tokens_per_sec", "train/mfu")

COMMON = ["--use_tensorboard", "false", "--plot", "false"]

# (name, torchrun ranks or 0 for a plain process, script, arguments); {W} is the work dir.
STAGES = [
    ("pretrain", 0, "train_pretrain.py",
     ["--max_steps", "30", "--save_steps", "10", "--eval_steps", "10"]),
    ("pretrain2", 2, "train_pretrain.py",
     ["--max_steps", "10", "--save_steps", "5", "--eval_steps", "5"]),
    ("sft_full", 0, "train_sft.py",
     ["--model_name_or_path", "{W}/pretrain", "--max_steps", "12", "--save_steps", "5", "--eval_steps", "4"]),
    ("sft_lora", 0, "train_sft.py",
     ["--model_name_or_path", "{W}/pretrain", "--finetuning_type", "lora",
      "--max_steps", "8", "--save_steps", "4", "--eval_steps", "4"]),
    ("dpo_lora", 0, "train_dpo.py",
     ["--model_name_or_path", "{W}/sft_full", "--finetuning_type", "lora",
      "--max_steps", "8", "--save_steps", "4", "--eval_steps", "4"]),
    ("dpo_full", 0, "train_dpo.py",
     ["--model_name_or_path", "{W}/sft_full", "--finetuning_type", "full", "--precompute_ref_log_probs", "true",
      "--max_steps", "6", "--save_steps", "3", "--eval_steps", "3"]),
]


def stage_env() -> dict[str, str]:
    """The environment of every stage: fixed hashing, and no Triton interpreter."""
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = "0"
    env.pop("TRITON_INTERPRET", None)
    env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # deterministic cuBLAS on a GPU; ignored on CPU
    return env


def run_stage(repo: str, work: str, python: str, name: str, ranks: int, script: str, args: list[str]) -> None:
    args = [a.replace("{W}", work) for a in args]
    command = [python]
    if ranks:  # torchrun, on this machine only
        command += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command += [script, *args, "--output_dir", os.path.join(work, name),
                "--cache_dir", os.path.join(work, "cache_" + name), *COMMON]
    log_path = os.path.join(work, f"{name}.log")
    print(f"[{name}] {' '.join(command)}", file=sys.stderr, flush=True)
    started = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        result = subprocess.run(command, cwd=repo, env=stage_env(), stdout=log, stderr=subprocess.STDOUT)
    print(f"[{name}] {time.time() - started:.0f}s, exit {result.returncode}", file=sys.stderr, flush=True)
    if result.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-4000:]
        sys.exit(f"stage {name} failed (exit {result.returncode}); end of {log_path}:\n{tail}")


def metrics_bytes(path: str) -> bytes:
    """metrics.jsonl without the timing keys, one JSON object per line as logged."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = {k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
                lines.append(json.dumps(record) + "\n")
    return "".join(lines).encode()


def fingerprint(work: str) -> list[str]:
    """'<sha256>  <relative path>' for the results under the stages' output dirs."""
    found = []
    for name, *_ in STAGES:
        for root, _, files in os.walk(os.path.join(work, name)):
            for file in files:
                if file.endswith(".safetensors") or file == "metrics.jsonl":
                    found.append(os.path.relpath(os.path.join(root, file), work))
    lines = []
    for rel in sorted(found):
        path = os.path.join(work, rel)
        if rel.endswith("metrics.jsonl"):
            data = metrics_bytes(path)
        else:
            with open(path, "rb") as f:
                data = f.read()
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {rel}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo", help="root of the nanobumble checkout to run")
    parser.add_argument("--work", help="a new or empty directory for the outputs, caches and logs "
                                       "(default: a fresh temporary one)")
    parser.add_argument("--python", default=sys.executable, help="interpreter to run the stages with")
    args = parser.parse_args()
    repo = os.path.abspath(args.repo)
    work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix="same_results-")
    os.makedirs(work, exist_ok=True)
    print(f"work dir: {work}", file=sys.stderr, flush=True)

    for name, ranks, script, stage_args in STAGES:
        run_stage(repo, work, args.python, name, ranks, script, stage_args)

    lines = fingerprint(work)
    for line in lines:
        print(line)
    total = hashlib.sha256("".join(line + "\n" for line in lines).encode()).hexdigest()
    print(f"{total}  ALL ({len(lines)} files)")


if __name__ == "__main__":
    main()
