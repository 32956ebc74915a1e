"""Running the stage scripts from the tests: as the user runs them (a subprocess,
one process or several under torchrun) or in this process (train_pretrain.main)."""

import os
import subprocess
import sys

from conftest import REPO_ROOT

import train_pretrain

# Small and fast: the tiny preset on short sequences.
FAST = ["--cutoff_len", "64", "--train_micro_batch_size_per_gpu", "4", "--logging_steps", "2",
        "--eval_rows", "8", "--use_tensorboard", "false", "--plot", "false"]


def run(argv):
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # the default dataset_path is relative to the repository
    try:
        train_pretrain.main(argv)
    finally:
        os.chdir(cwd)


def cli(argv, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "train_pretrain.py")] + argv,
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def launch(nproc, argv, script="train_pretrain.py", timeout=300, env=None):
    if nproc == 1:
        cmd = [sys.executable, script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    result = subprocess.run(cmd + argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    return result
