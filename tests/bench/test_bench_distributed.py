"""Training throughput with 1 and 2 processes: `python -m pytest -m bench tests/bench/test_bench_distributed.py`.

Runs train_pretrain.py itself (under torchrun for 2 processes) and reads the
tokens/s it logs after warm-up. Prints a table; asserts no speed. (bumblebee-1.5b
tokens/s and MFU on a GPU are in tests/bench/test_bench_pretrain.py.)
"""

import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, print_table
from helpers import read_metrics

pytestmark = pytest.mark.bench


def train(nproc, argv, output_dir):
    cmd = [sys.executable, "train_pretrain.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "train_pretrain.py"]
    result = subprocess.run(cmd + argv + ["--output_dir", str(output_dir), "--use_tensorboard", "false",
                                          "--plot", "false", "--save_steps", "0", "--eval_steps", "0",
                                          "--val_ratio", "0.01"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [m for m in read_metrics(str(output_dir)) if "train/tokens_per_sec" in m]
    return logged[-1]  # the last window, after warm-up


def test_bench_processes(tmp_path, capsys):
    rows = []
    cache = str(tmp_path / "cache")
    # The same global batch (16 rows of 256) for both: 2 micro-steps of 8 on one process, 1 on each of two.
    common = ["--max_steps", "30", "--logging_steps", "10", "--cutoff_len", "256", "--cache_dir", cache,
              "--train_micro_batch_size_per_gpu", "8"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for nproc, accum in [(1, 2), (2, 1)]:
        if device == "cuda" and nproc > torch.cuda.device_count():
            continue
        m = train(nproc, common + ["--gradient_accumulation_steps", str(accum)], tmp_path / f"run{nproc}")
        rows.append(["tiny", f"{nproc} x {device}", f"{m['train/tokens_per_sec']:,.0f}", f"{m['train/loss']:.3f}"])
    with capsys.disabled():
        print_table("training throughput by process count (train_pretrain.py, last logged window)",
                    ["model", "processes", "tokens/s", "loss"], rows)
        print("(both rows train on the same global batch, so their losses agree; on a 2-core machine "
              "two processes share the same cores, so expect no speed-up there)")
