"""Resumable checkpoints.

A checkpoint, output_dir/checkpoint-{step}/, is a model directory (model_dir.py)
plus what is needed to continue exactly:
    optimizer.safetensors  the AdamW moments and step counts, unsharded, one
                           tensor per parameter ("<name>.exp_avg", ...); each
                           rank of a later run reads its own rows, whatever the
                           number of ranks
    rng_state.safetensors  the random generators
    trainer_state.json     step and world size
The data position is the step itself: every batch is drawn from (seed, step,
sample index).

Every file is safetensors, JSON, YAML or a sentencepiece model: nothing on a
load path unpickles, so a checkpoint from someone else cannot run code. Sharded
tensors are gathered one at a time and rank 0 writes them (tensor_files.py).
Each file goes to a temporary name first and a checkpoint to a temporary
directory, renamed when complete, so a crash never leaves a half-written one
under the final name; `checkpoint_problem` still checks each before resuming.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from nanobumble.base.distributed import barrier, is_main
from nanobumble.base.errors import DataError, UserError
from nanobumble.base.files import atomic_write_text
from nanobumble.base.output_guard import record, remove_entry
from nanobumble.base.reading import read_json
from nanobumble.data.tokenizer import load_tokenizer
from nanobumble.model.transformer import Transformer
from nanobumble.store.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_param_name,
    load_adapter,
    read_adapter_config,
)
from nanobumble.store.model_dir import (
    check_weight_names,
    expected_weight_shapes,
    load_model_config,
    load_model_weights,
    save_model_dir,
)
from nanobumble.store.run_files import read_training_args
from nanobumble.store.tensor_files import (
    DamagedFile,
    check_float,
    header_dtypes,
    header_shapes,
    open_file,
    read_into,
    write_gathered,
)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Checkpoint directories by name, oldest first (see checkpoint_problem for
    whether one is intact)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest intact checkpoint."""
    for _, path in reversed(list_checkpoints(output_dir)):
        if checkpoint_problem(path) is None:
            return path
    return None


def _optimizer_tensors(model: Transformer, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """The optimizer's state dict keyed by parameter name (its tensors sharded like
    the parameters), and its tensors as ("<parameter>.<key>", tensor) in a fixed order."""
    state = get_optimizer_state_dict(model, optimizer)
    named = [(f"{param}.{key}", value) for param in sorted(state["state"])
             for key, value in sorted(state["state"][param].items())]
    return state, named


def save_checkpoint(output_dir: str, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                    tokenizer, training_args_yaml: str, save_total_limit: int,
                    adapter_config: dict | None = None, data_sha256: str = "") -> str:
    """Every rank calls this. Written under a temporary name, renamed by rank 0.
    data_sha256 (the training data's content hash) lets a resumed run check its data."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    try:
        save_model_dir(tmp, model, tokenizer, training_args_yaml, adapter_config)
        write_gathered(os.path.join(tmp, "optimizer.safetensors"), _optimizer_tensors(model, optimizer)[1])
        if is_main():
            write_gathered(os.path.join(tmp, "rng_state.safetensors"), list(rng_state().items()))
            world_size = dist.get_world_size() if dist.is_initialized() else 1
            atomic_write_text(os.path.join(tmp, "trainer_state.json"),
                              json.dumps({"step": step, "world_size": world_size, "data_sha256": data_sha256}) + "\n")
    except BaseException:
        if is_main():  # a full disk: free what the half-written checkpoint took
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main():
        record(output_dir, os.path.basename(final))
        if os.path.lexists(final):  # a resumed run saving the same step again
            old = os.path.join(output_dir, f".old-checkpoint-{step}")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            remove_entry(old)
        else:
            os.rename(tmp, final)
        if save_total_limit > 0:
            for _, path in list_checkpoints(output_dir)[:-save_total_limit]:
                remove_entry(path)
    barrier()
    return final


def read_trainer_state(path: str) -> dict:
    state_file = os.path.join(path, "trainer_state.json")
    if not os.path.lexists(state_file):  # anything else by that name is read_json's to name
        old = " (written by an older nanobumble, trainer_state.pt)" \
            if os.path.exists(os.path.join(path, "trainer_state.pt")) else ""
        raise DamagedFile(f"{state_file}: not found{old}")
    state = read_json(state_file, error=DamagedFile)
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) and state[k] >= 0
                                              for k in ("step", "world_size")):
        raise DamagedFile(f"{state_file}: expected {{\"step\": <int>, \"world_size\": <int>}}")
    return state


def checkpoint_problem(path: str) -> str | None:
    """What is wrong with a checkpoint directory, or None when it is intact: every
    file present and readable, the weights matching config.json, the optimizer
    state matching the weights. Reads headers only."""

    try:
        state = read_trainer_state(path)
        match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
        if match and int(match.group(1)) != state["step"]:
            return f"trainer_state.json says step {state['step']}"
        for name in ("training_args.yaml", "rng_state.safetensors", "optimizer.safetensors"):
            if not os.path.isfile(os.path.join(path, name)) or os.path.getsize(os.path.join(path, name)) == 0:
                return f"{os.path.join(path, name)}: missing or empty"
        read_training_args(path, required=True)  # a mapping of keys, or UserError
        load_tokenizer(path)
        with torch.device("meta"):
            model = Transformer(load_model_config(os.path.join(path, "config.json")))
        if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
            read_adapter_config(path)
            weights_file = os.path.join(path, ADAPTER_WEIGHTS)
            trained = {adapter_param_name(key): shape for key, shape in header_shapes(weights_file).items()}
        else:
            weights_file = os.path.join(path, "model.safetensors")
            trained = header_shapes(weights_file)
            if model.config.tie_word_embeddings:
                trained.pop("lm_head.weight", None)
            check_weight_names(weights_file, trained, expected_weight_shapes(model))
        optimizer_file = os.path.join(path, "optimizer.safetensors")
        stored = header_shapes(optimizer_file)
        expected = {f"{name}.{key}": shape for name, shape in trained.items() for key in ("exp_avg", "exp_avg_sq")}
        expected |= {f"{name}.step": () for name in trained}  # AdamW's count, one per parameter
        if stored != expected:
            wrong = sorted(set(stored) ^ set(expected)) or sorted(k for k in stored if stored[k] != expected[k])
            return f"{optimizer_file} does not match the weights ({', '.join(wrong[:3])})"
        check_float(weights_file, header_dtypes(weights_file))
        check_float(optimizer_file, header_dtypes(optimizer_file))
        check_rng_file(os.path.join(path, "rng_state.safetensors"))
    except (DamagedFile, UserError, DataError, ValueError, TypeError, OSError, RuntimeError, yaml.YAMLError) as e:
        return str(e)
    return None


def load_checkpoint(path: str, model: Transformer, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights (or, for a LoRA run, the adapter), the optimizer (each rank
    reading its own rows) and the random generators; return the step."""

    if os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)):
        load_adapter(model, path)
    else:
        load_model_weights(model, path)
    state, named = _optimizer_tensors(model, optimizer)  # the target layout, filled in below
    optimizer_file = os.path.join(path, "optimizer.safetensors")
    with open_file(optimizer_file) as f:
        missing = sorted({name for name, _ in named} - set(f.keys()))
        if missing:
            raise DamagedFile(f"{optimizer_file}: no state for {missing[:3]} (a checkpoint of another model "
                              f"or finetuning_type?)")
        for name, tensor in named:
            read_into(f, name, tensor, optimizer_file)
    set_optimizer_state_dict(model, optimizer, state)
    with open_file(os.path.join(path, "rng_state.safetensors")) as f:
        set_rng_state({name: f.get_tensor(name) for name in f.keys()})
    return read_trainer_state(path)["step"]


def check_rng_file(path: str) -> None:
    """rng_state.safetensors as rng_state() writes it: "torch" (and "cuda.N") byte vectors."""
    shapes, dtypes = header_shapes(path), header_dtypes(path)
    names = set(shapes)
    if "torch" not in names or any(not re.fullmatch(r"torch|cuda\.\d+", name) for name in names):
        raise DamagedFile(f"{path}: expected the tensors torch and cuda.N, got {sorted(names)[:5]}")
    for name in names:
        if dtypes[name] != "U8" or len(shapes[name]) != 1:
            raise DamagedFile(f"{path}: tensor {name} is {dtypes[name]} {list(shapes[name])}, expected a U8 vector")


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[f"cuda.{i}"] for i in range(len(state)) if f"cuda.{i}" in state]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
