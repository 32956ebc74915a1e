"""Faults and untrusted input around checkpoints and model directories: planted
pickle payloads, damaged checkpoints, changed settings on resume, finished models
that must not be overwritten, diverged weights, full and read-only disks."""

import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT
from helpers import read_metrics, write_shard
from runs import FAST, cli, run

from nanobumble.base.errors import DataError, UserError
from nanobumble.data.shards import META_VERSION, TokenShards
from nanobumble.evaluate import main as evaluate_main
from nanobumble.export_hf import export_hf
from nanobumble.inference.loading import load_model
from nanobumble.merge_lora import main as merge_main
from nanobumble.model.lora import inject_lora
from nanobumble.model.transformer import ModelConfig, Transformer
from nanobumble.run.config import PretrainConfig, SFTConfig
from nanobumble.run.resume import check_resume_settings
from nanobumble.store import tensor_files
from nanobumble.store.adapter import adapter_config_for, save_adapter
from nanobumble.store.checkpoint import checkpoint_problem, list_checkpoints
from nanobumble.store.model_dir import load_model_dir, save_model_dir

STEPS = FAST + ["--max_steps", "3", "--save_steps", "1", "--save_total_limit", "0", "--logging_steps", "1",
                "--eval_steps", "0"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, cache_dir):
    """checkpoint-1..3, the final model and metrics of a 3-step run."""
    out = tmp_path_factory.mktemp("base") / "run"
    run(STEPS + ["--cache_dir", cache_dir, "--output_dir", str(out)])
    return out


def copy_run(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def losses(out):
    return {m["step"]: m["train/loss"] for m in read_metrics(str(out)) if "train/loss" in m}


# --- nothing executed ------------------------------------------------------------------------------------------

class Payload:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def payload_bytes(marker: str, torch_format: bool) -> bytes:
    if not torch_format:
        return pickle.dumps(Payload(marker))
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)  # a torch zip file whose data.pkl carries the payload
    return buffer.getvalue()


CHECKPOINT_FILES = [".nanobumble-files", "complete.json", "config.json", "model.safetensors", "optimizer.safetensors",
                    "rng_state.safetensors", "tokenizer.model", "trainer_state.json", "training_args.yaml"]


def test_checkpoint_files_are_safetensors_json_yaml_and_the_tokenizer(base_run):
    checkpoint = base_run / "checkpoint-3"
    assert sorted(os.listdir(checkpoint)) == CHECKPOINT_FILES
    for name in CHECKPOINT_FILES:
        head = (checkpoint / name).read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{name} looks like a pickle or a torch zip"


@pytest.mark.parametrize("planted", CHECKPOINT_FILES[2:])  # the record and complete.json are not read on resume
def test_a_planted_pickle_never_runs_on_resume(base_run, tmp_path, cache_dir, capsys, planted):
    out = copy_run(base_run, tmp_path)
    markers = []
    checkpoint = out / "checkpoint-3"
    for i, name in enumerate([planted, "trainer_state.pt", "optimizer/.metadata", "optimizer/__0_0.distcp"]):
        markers.append(str(tmp_path / f"ran-{i}"))
        (checkpoint / name).parent.mkdir(exist_ok=True)
        (checkpoint / name).write_bytes(payload_bytes(markers[-1], torch_format=i % 2 == 1))
    run(STEPS + ["--cache_dir", cache_dir, "--output_dir", str(out), "--resume", "auto"])
    assert not any(os.path.exists(m) for m in markers), "a planted pickle ran"
    printed = capsys.readouterr().out
    assert f"{checkpoint} is damaged" in printed and f"resuming from {out / 'checkpoint-2'}" in printed
    assert losses(out)[3] == pytest.approx(losses(base_run)[3], rel=1e-6)


# --- a damaged newest checkpoint ------------------------------------------------------------------------------

def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


DAMAGE = {
    "truncated weights": lambda c: truncate(c / "model.safetensors"),
    "wrong config.json": lambda c: (c / "config.json").write_text(
        (c / "config.json").read_text().replace('"intermediate_size": ', '"intermediate_size": 1')),
    "no trainer state": lambda c: (c / "trainer_state.json").unlink(),
    "no optimizer": lambda c: (c / "optimizer.safetensors").unlink(),
    "truncated optimizer": lambda c: truncate(c / "optimizer.safetensors", 0.9),
    "empty tokenizer": lambda c: (c / "tokenizer.model").write_bytes(b""),
    "garbage trainer state": lambda c: (c / "trainer_state.json").write_text('{"step": "three"}'),
    # the checks cover every tensor and key a resume loads, with its dtype
    "integer weights": lambda c: retype(c / "model.safetensors", torch.int32),
    "integer moments": lambda c: retype(c / "optimizer.safetensors", torch.int8),
    "a missing moment": lambda c: drop_tensor(c / "optimizer.safetensors", ".exp_avg_sq"),
    "rng state of other keys": lambda c: save_tensors(c / "rng_state.safetensors", {"numpy": torch.zeros(4)}),
}


def save_tensors(path, tensors):
    from safetensors.torch import save_file
    save_file(tensors, str(path))


def retype(path, dtype):
    """The same names and shapes, the bytes of another dtype (a lie the header tells)."""
    from safetensors.torch import load_file
    save_tensors(path, {k: v.to(dtype) for k, v in load_file(str(path)).items()})


def drop_tensor(path, suffix):
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    del tensors[next(name for name in sorted(tensors) if name.endswith(suffix))]
    save_tensors(path, tensors)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_auto_skips_a_damaged_newest_checkpoint(base_run, tmp_path, cache_dir, capsys, damage):
    out = copy_run(base_run, tmp_path)
    DAMAGE[damage](out / "checkpoint-3")
    assert checkpoint_problem(str(out / "checkpoint-3")) is not None
    # the run was killed in the middle of logging step 3: a torn last line
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 3, "train/lo')
    run(STEPS + ["--cache_dir", cache_dir, "--output_dir", str(out), "--resume", "auto"])
    printed = capsys.readouterr().out
    assert f"warning: {out / 'checkpoint-3'} is damaged" in printed
    assert (out / "damaged-checkpoint-3").is_dir()  # moved aside, not deleted
    assert [s for s, _ in list_checkpoints(str(out))] == [1, 2, 3]
    assert losses(out) == pytest.approx(losses(base_run), rel=1e-6)
    assert checkpoint_problem(str(out / "checkpoint-3")) is None


def test_an_empty_newer_checkpoint_directory_is_skipped(base_run, tmp_path, cache_dir, capsys):
    out = copy_run(base_run, tmp_path)
    (out / "checkpoint-99").mkdir()
    run(STEPS + ["--cache_dir", cache_dir, "--output_dir", str(out), "--resume", "auto"])
    printed = capsys.readouterr().out
    assert "checkpoint-99 is damaged" in printed and f"resuming from {out / 'checkpoint-3'}" in printed


def test_resuming_a_named_damaged_checkpoint_is_one_line_and_exit_2(base_run, tmp_path, cache_dir):
    out = copy_run(base_run, tmp_path)
    truncate(out / "checkpoint-2" / "optimizer.safetensors")
    result = cli(STEPS + ["--cache_dir", cache_dir, "--output_dir", str(out), "--resume",
                          str(out / "checkpoint-2")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "checkpoint-2" in result.stderr and "optimizer.safetensors" in result.stderr


# --- resume refuses a different run ---------------------------------------------------------------------------

@pytest.mark.parametrize("change,key", [(["--cutoff_len", "32"], "cutoff_len"), (["--seed", "7"], "seed"),
                                        (["--max_grad_norm", "0.5"], "max_grad_norm"),
                                        (["--learning_rate", "2e-3"], "allow_schedule_change"),
                                        (["--max_steps", "5"], "allow_schedule_change"),
                                        (["--train_micro_batch_size_per_gpu", "2"], "global batch")])
def test_resume_refuses_changed_settings(base_run, tmp_path, cache_dir, change, key):
    out = copy_run(base_run, tmp_path)
    with pytest.raises(UserError, match=key):
        run(STEPS + ["--cache_dir", cache_dir, "--output_dir", str(out), "--resume", "auto"] + change)


def test_resume_allows_cadence_schedule_when_asked_and_the_same_global_batch(base_run, tmp_path, cache_dir, capsys):
    out = copy_run(base_run, tmp_path)
    run(STEPS + ["--cache_dir", cache_dir, "--output_dir", str(out), "--resume", "auto", "--logging_steps", "3",
                 "--train_micro_batch_size_per_gpu", "2", "--gradient_accumulation_steps", "2",
                 "--learning_rate", "2e-3", "--allow_schedule_change", "true"])
    printed = capsys.readouterr().out
    assert "key 'logging_steps' was 1" in printed and "key 'learning_rate' was 0.001" in printed
    assert "global batch 4 rows split as 2 x 2 x 1 ranks (was 4 x 1 x 1 ranks)" in printed


def test_the_refusal_names_the_key_and_both_values(tmp_path):
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    before = SFTConfig(finetuning_type="full")
    (checkpoint / "training_args.yaml").write_text(yaml.safe_dump(before.__dict__))
    (checkpoint / "trainer_state.json").write_text('{"step": 5, "world_size": 2}')
    with pytest.raises(UserError, match=r"key 'finetuning_type' was 'full' in .*training_args.yaml, now 'lora'"):
        check_resume_settings(SFTConfig(finetuning_type="lora"), 2, str(checkpoint))
    with pytest.raises(UserError, match=r"was 8 x 1 x 2 ranks = 16 rows .* now 8 x 1 x 1 ranks = 8"):
        check_resume_settings(SFTConfig(finetuning_type="full"), 1, str(checkpoint))
    check_resume_settings(SFTConfig(finetuning_type="full", gradient_accumulation_steps=2), 1, str(checkpoint))
    with pytest.raises(UserError, match="stage"):
        check_resume_settings(PretrainConfig(), 2, str(checkpoint))


# --- a finished model is not overwritten ----------------------------------------------------------------------

def test_a_fresh_run_does_not_replace_a_finished_model(base_run, tmp_path, cache_dir):
    out = copy_run(base_run, tmp_path)
    for _, path in list_checkpoints(str(out)):
        shutil.rmtree(path)
    weights, metrics = (out / "model.safetensors").read_bytes(), (out / "metrics.jsonl").read_bytes()
    result = cli(STEPS + ["--cache_dir", cache_dir, "--output_dir", str(out)])
    assert result.returncode == 2 and "already holds a model" in result.stderr and str(out) in result.stderr
    assert "--overwrite_output_dir" in result.stderr
    assert (out / "model.safetensors").read_bytes() == weights and (out / "metrics.jsonl").read_bytes() == metrics
    with pytest.raises(UserError, match="already holds a model"):  # nothing to resume: a fresh run too
        run(STEPS + ["--cache_dir", cache_dir, "--output_dir", str(out), "--resume", "auto"])

    run(STEPS + ["--cache_dir", cache_dir, "--output_dir", str(out), "--overwrite_output_dir", "true",
                 "--max_steps", "1", "--save_steps", "0", "--seed", "3"])
    assert (out / "model.safetensors").read_bytes() != weights
    assert {m["step"] for m in read_metrics(str(out))} == {1}  # a fresh log


def test_a_fresh_run_with_overwrite_removes_old_checkpoints(base_run, tmp_path, cache_dir):
    out = copy_run(base_run, tmp_path)
    run(STEPS + ["--cache_dir", cache_dir, "--output_dir", str(out), "--overwrite_output_dir", "true",
                 "--max_steps", "1", "--save_steps", "0"])
    assert list_checkpoints(str(out)) == []  # a later --resume auto cannot pick up the old run


def tiny_model_dir(path, tokenizer_file, seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=320, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                    intermediate_size=64, max_position_embeddings=64))
    save_model_dir(str(path), model, str(tokenizer_file), "{}\n")
    return model


def test_merge_and_export_refuse_to_overwrite(base_run, tmp_path):
    tokenizer = base_run / "tokenizer.model"
    base = tiny_model_dir(tmp_path / "base", tokenizer)
    inject_lora(base, 2, 4.0, 0.0, "q_proj", False, seed=1)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name.endswith("lora_B"):
                param.normal_()
    save_adapter(str(tmp_path / "adapter"), base, adapter_config_for(base, str(tmp_path / "base")))
    base_weights = (tmp_path / "base" / "model.safetensors").read_bytes()
    merge = ["--base_model_path", str(tmp_path / "base"), "--lora_model_path", str(tmp_path / "adapter")]

    with pytest.raises(UserError, match="--save_path .* is --base_model_path"):
        merge_main(merge + ["--save_path", str(tmp_path / "base"), "--overwrite_output_dir", "true"])
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == base_weights

    tiny_model_dir(tmp_path / "other", tokenizer, seed=5)
    other = (tmp_path / "other" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="exists and is not empty"):
        merge_main(merge + ["--save_path", str(tmp_path / "other")])
    assert (tmp_path / "other" / "model.safetensors").read_bytes() == other
    merge_main(merge + ["--save_path", str(tmp_path / "other"), "--overwrite_output_dir", "true"])
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != other

    export_hf(str(tmp_path / "base"), str(tmp_path / "hf"))
    exported = (tmp_path / "hf" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="save_path .* exists and is not empty"):
        export_hf(str(tmp_path / "other"), str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == exported
    export_hf(str(tmp_path / "other"), str(tmp_path / "hf"), overwrite=True)
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() != exported


TOOLS = {
    "sft": ["train_sft.py", "--model_name_or_path", "{model}", "--output_dir", "{tmp}/sft", "--max_steps", "1"],
    "dpo": ["train_dpo.py", "--model_name_or_path", "{model}", "--output_dir", "{tmp}/dpo", "--max_steps", "1"],
    "chat": ["chat.py", "--model_path", "{model}", "--prompt", "hello"],
    "merge": ["-m", "nanobumble.merge_lora", "--base_model_path", "{model}", "--lora_model_path", "{tmp}/adapter",
              "--save_path", "{tmp}/merged"],
    "export": ["-m", "nanobumble.export_hf", "--model_path", "{model}", "--save_path", "{tmp}/hf"],
}


@pytest.mark.parametrize("tool,damage", [("sft", "truncated"), ("dpo", "wrong shape"), ("chat", "truncated"),
                                         ("merge", "wrong shape"), ("export", "truncated")])
def test_damaged_weights_are_one_line_in_every_tool(base_run, tmp_path, tool, damage):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.model", "training_args.yaml", "complete.json"):
        shutil.copy(base_run / name, model / name)
    if damage == "truncated":
        truncate(model / "model.safetensors")
    else:
        state = load_file(str(model / "model.safetensors"))
        state["norm.weight"] = torch.ones(state["norm.weight"].shape[0] + 1)
        save_file(state, str(model / "model.safetensors"))
    if tool == "merge":
        adapted = Transformer(load_model_dir(str(base_run))[1])
        inject_lora(adapted, 2, 4.0, 0.0, "q_proj", False, seed=1)
        save_adapter(str(tmp_path / "adapter"), adapted, adapter_config_for(adapted, str(model)))
    argv = [arg.format(model=model, tmp=tmp_path) for arg in TOOLS[tool]]
    result = subprocess.run([sys.executable] + argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{model / 'model.safetensors'}" in result.stderr
    assert ("norm.weight" in result.stderr) if damage == "wrong shape" else ("not a readable" in result.stderr)


# --- diverged weights are never saved -------------------------------------------------------------------------

def test_diverged_weights_are_not_written(tmp_path, cache_dir):
    out = tmp_path / "run"
    result = cli(FAST + ["--cache_dir", cache_dir, "--output_dir", str(out), "--learning_rate", "1e30",
                         "--max_steps", "1", "--eval_steps", "0"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "step 1: the weights are no longer usable" in result.stderr
    assert not (out / "model.safetensors").exists()

    with pytest.raises(UserError, match=r"step 1: .* last good checkpoint is none"):
        run(FAST + ["--cache_dir", cache_dir, "--output_dir", str(tmp_path / "saves"), "--learning_rate", "1e30",
                    "--max_steps", "3", "--save_steps", "1", "--eval_steps", "0"])
    assert list_checkpoints(str(tmp_path / "saves")) == []


# --- the file system: not a directory, read-only, full ---------------------------------------------------------

def test_output_dir_that_is_a_file(tmp_path, cache_dir):
    (tmp_path / "file").write_text("x")
    result = cli(FAST + ["--cache_dir", cache_dir, "--output_dir", str(tmp_path / "file" / "run")])
    assert result.returncode == 2 and "output_dir" in result.stderr and "is a file" in result.stderr


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint(base_run, tmp_path, cache_dir, monkeypatch, capsys):
    out = copy_run(base_run, tmp_path)
    shutil.rmtree(out / "checkpoint-3")
    before = {name: (out / "checkpoint-2" / name).read_bytes() for name in CHECKPOINT_FILES}
    real_write = tensor_files.write_gathered

    def disk_fills_up(path, named_tensors, metadata=None):
        if path.endswith("optimizer.safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real_write(path, named_tensors, metadata)

    import nanobumble.store.checkpoint
    monkeypatch.setattr(nanobumble.store.checkpoint, "write_gathered", disk_fills_up)
    monkeypatch.setattr(sys, "argv", ["train_pretrain.py"] + STEPS + [
        "--cache_dir", cache_dir, "--output_dir", str(out), "--resume", "auto"])
    import train_pretrain
    from nanobumble.base.errors import run_cli
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        with pytest.raises(SystemExit) as stop:
            run_cli(train_pretrain.main)
    finally:
        os.chdir(cwd)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "optimizer.safetensors" in err and "Traceback" not in err
    assert sorted(os.listdir(out / "checkpoint-2")) == CHECKPOINT_FILES
    assert {name: (out / "checkpoint-2" / name).read_bytes() for name in CHECKPOINT_FILES} == before
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]  # the half checkpoint is gone


def private_mounts_work() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True)
    return probe.returncode == 0


def in_private_mount(mount_dir, options: str, script: str) -> subprocess.CompletedProcess:
    """Run a shell script with a fresh tmpfs (mount options given) at mount_dir,
    seen only by this process tree: a real full or read-only file system."""
    command = f"mount -t tmpfs -o {options} none {mount_dir} && {script}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", command], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


needs_mounts = pytest.mark.skipif(not private_mounts_work(), reason="needs unshare with user and mount namespaces")


@needs_mounts
def test_read_only_output_and_cache_dirs(tmp_path, cache_dir):
    mount = tmp_path / "ro"
    mount.mkdir()
    train = f"{sys.executable} train_pretrain.py " + " ".join(FAST)
    result = in_private_mount(mount, "ro", f"{train} --cache_dir {cache_dir} --output_dir {mount}/run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"output_dir {mount}/run is not writable" in result.stderr and "Read-only" in result.stderr

    result = in_private_mount(mount, "ro", f"{train} --cache_dir {mount}/cache --output_dir {tmp_path}/run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{mount}/cache" in result.stderr and "Read-only" in result.stderr


@needs_mounts
def test_a_real_full_disk_keeps_the_last_checkpoint(base_run, tmp_path, cache_dir):
    src = copy_run(base_run, tmp_path)
    shutil.rmtree(src / "checkpoint-3")
    used = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    mount, kept = tmp_path / "disk", tmp_path / "kept"
    mount.mkdir()
    args = " ".join(STEPS + ["--cache_dir", cache_dir, "--output_dir", f"{mount}/run", "--resume", "auto"])
    # room for what is there plus a little: the next checkpoint cannot fit
    result = in_private_mount(mount, f"size={used + (1 << 20)}",
                              f"cp -a {src} {mount}/run && {sys.executable} train_pretrain.py {args}; "
                              f"status=$?; cp -a {mount}/run {kept}; exit $status")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "No space left on device" in result.stderr and "Traceback" not in result.stderr
    assert "enforce fail" not in result.stderr
    assert checkpoint_problem(str(kept / "checkpoint-2")) is None
    assert not (kept / "checkpoint-3").exists()
    assert not [name for name in os.listdir(kept) if name.startswith(".tmp")]
    load_model_dir(str(kept / "checkpoint-2"))


# --- kill -9 at random moments --------------------------------------------------------------------------------

@pytest.mark.slow
def test_twenty_random_kills_then_resume_equal_an_uninterrupted_run(tmp_path, cache_dir):
    import random
    import signal
    import time

    from safetensors.torch import load_file

    args = FAST + ["--max_steps", "150", "--save_steps", "1", "--save_total_limit", "2", "--logging_steps", "1",
                   "--eval_steps", "10", "--cache_dir", cache_dir]
    straight = tmp_path / "straight"
    run(args + ["--output_dir", str(straight)])

    killed = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    while kills < 20:
        process = subprocess.Popen([sys.executable, "train_pretrain.py"] + args + [
            "--output_dir", str(killed), "--resume", "auto"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        # Let it log 1 to 4 steps (each followed by a save), then kill it a random moment
        # later: in a training step or in the middle of writing a checkpoint. Counting
        # steps, not seconds, keeps 20 kills inside the run however fast the machine is.
        logged, wanted = 0, rng.randint(1, 4)
        for line in process.stdout:
            logged += line.startswith("step ")
            if logged == wanted:
                break
        time.sleep(rng.uniform(0.0, 0.5))
        if process.poll() is not None:
            break  # the run finished first
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    assert kills == 20, f"the run finished after {kills} kills: give it more steps"
    result = cli(args + ["--output_dir", str(killed), "--resume", "auto"])
    assert result.returncode == 0, result.stderr[-3000:]

    assert losses(killed) == losses(straight)  # every step's loss, bit for bit
    expected, got = load_file(str(straight / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert not [name for name in os.listdir(killed) if name.startswith((".tmp", ".old", "damaged"))]


# --- the output guard (base/output_guard.py): one door out ------------------------------------------------


def test_a_second_program_on_a_locked_output_dir_is_refused(base_run, tmp_path, cache_dir):
    import fcntl

    out = copy_run(base_run, tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live run holds it
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        result = cli(STEPS + ["--cache_dir", cache_dir, "--output_dir", str(out), "--resume", "auto"])
    finally:
        os.close(fd)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"pid {os.getpid()}" in result.stderr and "in use" in result.stderr
    assert {p: p.read_bytes() for p in before} == before


def test_resume_with_overwrite_is_refused(base_run, tmp_path, cache_dir):
    out = copy_run(base_run, tmp_path)
    with pytest.raises(UserError, match="pass one of them"):
        run(STEPS + ["--cache_dir", cache_dir, "--output_dir", str(out), "--resume", "auto",
                     "--overwrite_output_dir", "true"])


def test_an_output_dir_inside_the_data_is_refused(tmp_path, cache_dir):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(REPO_ROOT, "datasets", "pretrain"), data)
    with pytest.raises(UserError, match="lies inside dataset_path"):
        run(STEPS + ["--cache_dir", cache_dir, "--dataset_path", str(data), "--output_dir", str(data / "run")])
    assert not (data / "run").exists()


def test_overwrite_removes_only_what_nanobumble_wrote(base_run, tmp_path, cache_dir):
    out = copy_run(base_run, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    os.symlink(outside, out / "checkpoint-7")  # not written by nanobumble: never followed, never removed
    (out / "notes.txt").write_text("a person's notes")
    with pytest.raises(UserError, match="checkpoint-7, which nanobumble did not write"):
        run(STEPS + ["--cache_dir", cache_dir, "--output_dir", str(out), "--overwrite_output_dir", "true"])
    os.remove(out / "checkpoint-7")
    shutil.rmtree(out / "checkpoint-1")
    os.symlink(outside, out / "checkpoint-1")  # a checkpoint it wrote, now a link: the link goes, not its target
    run(STEPS + ["--cache_dir", cache_dir, "--output_dir", str(out), "--overwrite_output_dir", "true",
                 "--max_steps", "1", "--save_steps", "0"])
    assert (outside / "keep.txt").read_text() == "mine"
    assert (out / "notes.txt").read_text() == "a person's notes" and list_checkpoints(str(out)) == []


def test_resume_auto_keeps_what_is_already_in_damaged_checkpoint(base_run, tmp_path, cache_dir, capsys):
    out = copy_run(base_run, tmp_path)
    (out / "damaged-checkpoint-3").mkdir()
    (out / "damaged-checkpoint-3" / "notes.txt").write_text("looked at this one")
    (out / ".tmp-checkpoint-9").mkdir()  # what a killed save left: swept
    truncate(out / "checkpoint-3" / "model.safetensors")
    run(STEPS + ["--cache_dir", cache_dir, "--output_dir", str(out), "--resume", "auto"])
    assert (out / "damaged-checkpoint-3" / "notes.txt").read_text() == "looked at this one"
    assert (out / "damaged-checkpoint-3-2" / "model.safetensors").is_file()
    assert not (out / ".tmp-checkpoint-9").exists()


def test_a_model_directory_cut_short_does_not_load(base_run, tmp_path):
    model = tmp_path / "model"
    tiny_model_dir(model, base_run / "tokenizer.model")
    load_model(str(model), "", torch.device("cpu"), torch.float32)
    (model / "training_args.yaml").unlink()  # as a kill before its last files were written
    with pytest.raises(UserError, match="incomplete"):
        load_model(str(model), "", torch.device("cpu"), torch.float32)
    (model / "complete.json").unlink()
    with pytest.raises(UserError, match="no complete.json"):
        load_model(str(model), "", torch.device("cpu"), torch.float32)


# Runs a module as `python -m` would, dying like kill -9 at its first rename (os.replace / os.rename): every
# file and directory is written under a temporary name and renamed, so this stops it in the middle of writing.
KILLED_AT_FIRST_RENAME = """
import os, runpy, sys
os.replace = os.rename = lambda *args, **kwargs: os._exit(9)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module", ["nanobumble.merge_lora", "nanobumble.export_hf"])
def test_a_merge_or_export_killed_while_writing_leaves_nothing_at_save_path(base_run, tmp_path, module):
    tokenizer = base_run / "tokenizer.model"
    base = tiny_model_dir(tmp_path / "base", tokenizer)
    inject_lora(base, 2, 4.0, 0.0, "q_proj", False, seed=1)
    save_adapter(str(tmp_path / "adapter"), base, adapter_config_for(base, str(tmp_path / "base")))
    argv = {"nanobumble.merge_lora": ["--base_model_path", str(tmp_path / "base"),
                                      "--lora_model_path", str(tmp_path / "adapter")],
            "nanobumble.export_hf": ["--model_path", str(tmp_path / "base")]}[module]
    argv += ["--save_path", str(tmp_path / "out")]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_FIRST_RENAME, module, *argv], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith(".") and not name.endswith(".lock")]
    assert leftovers, os.listdir(tmp_path)  # what it was writing, beside the output

    done = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not any(os.path.exists(tmp_path / name) for name in leftovers)  # swept
    assert (tmp_path / "out" / ("complete.json" if "merge" in module else "config.json")).is_file()


def test_absurd_sizes_in_config_json_are_refused_before_allocating(base_run, tmp_path):
    model = tmp_path / "model"
    tiny_model_dir(model, base_run / "tokenizer.model")
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_size=2**17, intermediate_size=2**19, num_heads=2**10, num_kv_heads=2**10)
    (model / "config.json").write_text(json.dumps(config))
    (model / "complete.json").write_text("{}")
    with pytest.raises(UserError, match="config.json"):  # not an allocation failure of ~100 GB
        load_model_dir(str(model))


def test_merge_and_export_refuse_an_output_linked_to_their_input_and_non_finite_weights(base_run, tmp_path):
    tokenizer = base_run / "tokenizer.model"
    base = tiny_model_dir(tmp_path / "base", tokenizer)
    base_weights = (tmp_path / "base" / "model.safetensors").read_bytes()
    inject_lora(base, 2, 4.0, 0.0, "q_proj", False, seed=1)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if name.endswith("lora_B"):
                param.fill_(float("nan"))
    save_adapter(str(tmp_path / "adapter"), base, adapter_config_for(base, str(tmp_path / "base")))
    merge = ["--base_model_path", str(tmp_path / "base"), "--lora_model_path", str(tmp_path / "adapter")]
    with pytest.raises(UserError, match="not finite"):
        merge_main(merge + ["--save_path", str(tmp_path / "merged")])
    assert not (tmp_path / "merged").exists()

    os.symlink(tmp_path / "base", tmp_path / "link")
    with pytest.raises(UserError, match="is --base_model_path"):
        merge_main(merge + ["--save_path", str(tmp_path / "link"), "--overwrite_output_dir", "true"])
    with pytest.raises(UserError, match="save_path .* is model_path"):
        export_hf(str(tmp_path / "base"), str(tmp_path / "link"), overwrite=True)
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == base_weights


def test_evaluate_never_writes_over_a_models_file(base_run, tmp_path):
    model = copy_run(base_run, tmp_path)  # a trained model: the evaluation itself would succeed
    weights = (model / "model.safetensors").read_bytes()
    (tmp_path / "text.jsonl").write_text('{"text": "hello world"}\n')
    with pytest.raises(UserError, match="model.safetensors"):
        evaluate_main(["--model_path", str(model), "--tasks", str(tmp_path / "text.jsonl"), "--output",
                       str(model / "model.safetensors")])
    assert (model / "model.safetensors").read_bytes() == weights


def test_shard_ids_beyond_the_vocabulary_are_refused_when_opened(tmp_path):
    write_shard(str(tmp_path / "train_000.bin"), np.array([1, 2, 300, 4], dtype=np.int64), 65536)
    (tmp_path / "meta.json").write_text(json.dumps({"format_version": META_VERSION, "vocab_size": 256,
                                                    "train_shards": ["train_000.bin"], "train_tokens": 4}))
    with pytest.raises(DataError, match="token id 300 is beyond the vocabulary"):
        TokenShards(str(tmp_path), "train")
