"""The no-argument pretraining with precision auto against fp32 on this CPU: whole runs,
alternated, and the final losses (issue 25's "done when" for CPUs with native bf16).

    python tests/bench_cpu_bf16.py                      # 3 runs each, seeds 42, 43, 44
    python tests/bench_cpu_bf16.py --runs 1 --max_steps 40   # a short look (extra keys go to train_pretrain.py)

On a CPU with native bf16 (AMX, AVX512-BF16: the "cpu:" line says "native bf16: yes")
auto is bf16 autocast. NANOBUMBLE_CPU_BF16=1 forces it on any CPU, to measure the
emulated bf16 of a CPU without (slower than fp32 there). Run i trains seed 41 + i
twice, auto then fp32, so a change in the machine's load falls on both. The cache
(tokenizer, token shards) is filled first by an untimed one-step run.

Prints per run: precision, seconds, final train/loss and val/loss; then each
precision's mean time, the speed-up, and whether every auto run's final val/loss
lies within the spread (min..max) of the fp32 seeds.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["--plot", "false", "--use_tensorboard", "false", "--overwrite_output_dir", "true"]


def last_metrics(output_dir: str) -> dict:
    """The last train/loss and val/loss of metrics.jsonl."""
    found = {}
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            found.update({k: v for k, v in record.items() if k in ("train/loss", "val/loss")})
    return found


def run(output_dir: str, extra: list[str]) -> tuple[float, str, dict]:
    """One whole train_pretrain.py run: (seconds, its cpu and model lines, final losses)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "train_pretrain.py", "--output_dir", output_dir, *QUIET, *extra],
                          cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"train_pretrain.py failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith(("cpu: ", "model: "))]
    return seconds, "\n".join(lines), last_metrics(output_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(os.path.join(tmp, "warm"), ["--max_steps", "1", *extra])  # tokenizer and shards into the cache
        rows = []
        for i in range(1, args.runs + 1):
            for precision in ("auto", "fp32"):
                seconds, lines, losses = run(os.path.join(tmp, f"{precision}{i}"),
                                             ["--seed", str(41 + i), "--train_model_precision", precision, *extra])
                if i == 1:
                    print(lines, flush=True)
                rows.append((precision, 41 + i, seconds, losses.get("train/loss"), losses.get("val/loss")))
                print(f"{precision:>4} seed {41 + i}: {seconds:7.1f} s, final train/loss {losses.get('train/loss')}, "
                      f"val/loss {losses.get('val/loss')}", flush=True)
    mean = {p: sum(r[2] for r in rows if r[0] == p) / args.runs for p in ("auto", "fp32")}
    print(f"mean seconds: auto {mean['auto']:.1f}, fp32 {mean['fp32']:.1f}; auto is {mean['fp32'] / mean['auto']:.2f}x "
          f"fp32's speed")
    fp32 = [r[4] for r in rows if r[0] == "fp32" and r[4] is not None]
    auto = [r[4] for r in rows if r[0] == "auto" and r[4] is not None]
    if fp32 and auto:
        low, high = min(fp32), max(fp32)
        inside = all(low <= loss <= high for loss in auto)
        print(f"final val/loss: fp32 seeds {low:.4f} .. {high:.4f}; auto {', '.join(f'{x:.4f}' for x in auto)}: "
              f"{'within' if inside else 'NOT within'} the fp32 spread")


if __name__ == "__main__":
    main()
