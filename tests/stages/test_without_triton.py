"""The README's first commands, as a user runs them, on a machine where Triton
cannot be imported (a Mac, Windows, or a Linux box without the wheel):
train_pretrain.py with no arguments at all, then SFT and DPO on its model, each
in a process where `import triton` fails, and nothing under nanobumble/kernels/
loads."""

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from helpers import read_metrics

from nanobumble.store.model_dir import load_model_dir

# Runs a script as `python SCRIPT ARGS` would, after making `import triton` fail.
# At the end it says whether any Triton kernel module was imported.
LAUNCHER = """
import runpy, sys
sys.modules["triton"] = None  # import triton -> ImportError
try:
    import triton
    print("triton imported")
except ImportError:
    print("triton blocked")
script, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    print("kernels loaded:", sorted(m for m in sys.modules if m.startswith("nanobumble.kernels")))
"""


def run_without_triton(cwd, script, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO_ROOT  # the scripts import nanobumble from the repository
    result = subprocess.run([sys.executable, "-c", LAUNCHER, os.path.join(REPO_ROOT, script), *args],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "triton blocked" in result.stdout and "kernels loaded: []" in result.stdout
    return result.stdout


def test_pretrain_sft_dpo_run_where_triton_cannot_be_imported(tmp_path):
    """A short pretraining, then SFT and DPO on its model, each in a process without Triton."""
    os.symlink(os.path.join(REPO_ROOT, "datasets"), tmp_path / "datasets")
    quiet = ["--use_tensorboard", "false", "--plot", "false"]
    out = run_without_triton(tmp_path, "train_pretrain.py", "--max_steps", "6", "--save_steps", "3", *quiet)
    assert "tok/s" in out
    base = tmp_path / "checkpoints/pretrain/tiny_base"
    assert any(n.startswith("checkpoint-") for n in os.listdir(base))
    load_model_dir(str(base))
    run_without_triton(tmp_path, "train_sft.py", "--max_steps", "4", "--eval_steps", "2", *quiet)
    assert os.path.isfile(tmp_path / "checkpoints/sft/tiny_instruct/model.safetensors")
    run_without_triton(tmp_path, "train_dpo.py", "--max_steps", "3", "--eval_steps", "3", *quiet)
    assert os.path.isfile(tmp_path / "checkpoints/dpo/tiny_dpo_lora/adapter_model.safetensors")


@pytest.mark.slow
def test_the_readme_commands_with_no_arguments_where_triton_cannot_be_imported(tmp_path):
    """The whole no-argument pretraining (about two minutes), then SFT and DPO."""
    # The scripts' defaults are relative to the working directory: the bundled data
    # is linked in, and every output lands under tmp_path.
    os.symlink(os.path.join(REPO_ROOT, "datasets"), tmp_path / "datasets")
    quiet = ["--use_tensorboard", "false", "--plot", "false"]

    out = run_without_triton(tmp_path, "train_pretrain.py")  # no arguments at all
    base = tmp_path / "checkpoints/pretrain/tiny_base"
    assert "eta" in out and "tok/s" in out and "plots/loss.png" in out
    files = set(os.listdir(base))
    assert {"config.json", "model.safetensors", "tokenizer.model", "training_args.yaml", "metrics.jsonl",
            "plots"} <= files
    assert any(n.startswith("checkpoint-") for n in files) and any(n.startswith("events.out.tfevents") for n in files)
    assert sorted(os.listdir(base / "plots")) == ["grad_norm.png", "loss.png", "lr.png", "throughput.png", "val.png"]
    metrics = read_metrics(str(base))
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert losses[-1] < losses[0] - 1.0  # clearly falling
    val = [m for m in metrics if "val/loss" in m]
    assert val and 0 < val[-1]["val/bpb"] < val[-1]["val/loss"] * 2
    assert {"train/lr", "train/grad_norm", "train/tokens_per_sec"} <= set(metrics[0])
    model, _ = load_model_dir(str(base))  # the final directory loads as a model
    assert model.num_parameters() > 1e6

    run_without_triton(tmp_path, "train_sft.py", "--max_steps", "4", "--eval_steps", "2", *quiet)
    assert os.path.isfile(tmp_path / "checkpoints/sft/tiny_instruct/model.safetensors")

    run_without_triton(tmp_path, "train_dpo.py", "--max_steps", "3", "--eval_steps", "3", *quiet)
    assert os.path.isfile(tmp_path / "checkpoints/dpo/tiny_dpo_lora/adapter_model.safetensors")
