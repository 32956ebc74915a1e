"""The pipeline on a machine where Triton cannot be imported (a Mac, Windows, or a
Linux box without the wheel): the three stage scripts run as a user runs them, in
a process where `import triton` fails, and nothing under nanobumble/kernels/ loads."""

import os
import subprocess
import sys

from conftest import REPO_ROOT

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
    # The scripts' defaults are relative to the working directory: the bundled data
    # is linked in, and every output lands under tmp_path.
    os.symlink(os.path.join(REPO_ROOT, "datasets"), tmp_path / "datasets")
    quiet = ["--use_tensorboard", "false", "--plot", "false"]

    run_without_triton(tmp_path, "train_pretrain.py")  # no arguments at all
    assert os.path.isfile(tmp_path / "checkpoints/pretrain/tiny_base/model.safetensors")

    run_without_triton(tmp_path, "train_sft.py", "--max_steps", "4", "--eval_steps", "2", *quiet)
    assert os.path.isfile(tmp_path / "checkpoints/sft/tiny_instruct/model.safetensors")

    run_without_triton(tmp_path, "train_dpo.py", "--max_steps", "3", "--eval_steps", "3", *quiet)
    assert os.path.isfile(tmp_path / "checkpoints/dpo/tiny_dpo_lora/adapter_model.safetensors")
