"""Model directories and resumable checkpoints.

A model directory (what model_name_or_path points at):
    config.json  model.safetensors  tokenizer.model  training_args.yaml
(a LoRA run writes adapter_model.safetensors + adapter_config.json instead of
model.safetensors).

A checkpoint, output_dir/checkpoint-{step}/, is a model directory plus what is
needed to continue exactly:
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

from .distributed import barrier, is_main
from .errors import DataError, UserError
from .files import atomic_write_bytes, atomic_write_text
from .model import ModelConfig, Transformer, load_model_config, model_config_json
from .tensor_files import DamagedFile, header_shapes, open_file, read_into, write_gathered

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MODEL_FILES = ("config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors")


def gather_full_on_main(named_tensors) -> dict[str, torch.Tensor]:
    """Each tensor whole and on the CPU, kept by rank 0 only; other ranks return {}.

    A sharded (FSDP2 DTensor) tensor is all-gathered, which is a collective: every
    rank must call this with the same names in the same order. A non-zero rank
    never holds more than its shards plus one full tensor."""
    main = is_main()
    state = {}
    for name, tensor in named_tensors:
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        if main:
            state[name] = tensor.detach().to("cpu").contiguous()
        del tensor  # on other ranks: freed here, before the next gather
    return state


def _weights(model: Transformer) -> list[tuple[str, torch.Tensor]]:
    """What model.safetensors holds. A tied LM head is the embedding: stored once."""
    tied = model.config.tie_word_embeddings
    return [(name, tensor) for name, tensor in model.state_dict().items() if not (tied and name == "lm_head.weight")]


def model_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Full weights on the CPU on rank 0, {} on other ranks (every rank must call this)."""
    return gather_full_on_main(_weights(model))


def holds_model(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in MODEL_FILES)


def check_output_dir(path: str, overwrite: bool, flag: str = "output_dir") -> None:
    """A directory we are about to write a model into: refuse a file, an unwritable
    place, or (unless overwrite) a finished model that would be replaced."""
    if holds_model(path) and not overwrite:
        raise UserError(f"{flag} {path} already holds a model; pick another directory, "
                        f"or pass --overwrite_output_dir true to replace it")
    check_writable(path, flag)


def check_writable(path: str, flag: str) -> None:
    """Fail early, naming the key, when path (or, before it exists, the directory
    that will hold it) cannot be written to: not hours later at the first save."""
    existing = os.path.abspath(path)
    while not os.path.isdir(existing):
        if os.path.exists(existing):
            raise UserError(f"{flag} {path}: {existing} is a file, not a directory")
        existing = os.path.dirname(existing)
    probe = os.path.join(existing, f".write-test-{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable ({existing}: {e.strerror})") from None


def check_model_dir(path: str, key: str) -> None:
    """A full model directory to start from or load (what pretraining or SFT
    wrote, or a Hugging Face Qwen2 one); key names the setting in the error."""
    from .tokenizer import has_tokenizer

    if os.path.isfile(os.path.join(path, "adapter_config.json")) and \
            not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise UserError(f"{key} {path} holds a LoRA adapter, not a full model: fold it into its base first with "
                        f"python -m nanobumble.merge_lora --base_model_path <base> --lora_model_path {path} "
                        f"--save_path <merged>")
    expected = "(expected a model directory written by train_pretrain.py or train_sft.py, or a Qwen2 one)"
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{key} {path}: no config.json {expected}")
    if not any(os.path.isfile(os.path.join(path, name))
               for name in ("model.safetensors", "model.safetensors.index.json")):
        raise UserError(f"{key} {path}: no model.safetensors {expected}")
    if not has_tokenizer(path):
        raise UserError(f"{key} {path}: no tokenizer.model or tokenizer.json {expected}")


def save_model_dir(path: str, model: Transformer, tokenizer, training_args_yaml: str,
                   adapter_config: dict | None = None) -> None:
    """Write (or overwrite, file by file atomically) a model directory: the full
    weights, or for a LoRA run (adapter_config given) only the adapter, beside
    config.json, the tokenizer's files and training_args.yaml. tokenizer is a
    loaded tokenizer (its files are kept in memory: the directory it came from
    may be a checkpoint that rotation deletes) or the path of a tokenizer.model.
    Every rank calls it (to gather shards); rank 0 writes."""
    if is_main():
        os.makedirs(path, exist_ok=True)
    barrier()
    if adapter_config is not None:
        from .lora import save_adapter
        save_adapter(path, model, adapter_config)
    else:
        write_gathered(os.path.join(path, "model.safetensors"), _weights(model))
    if not is_main():
        return
    atomic_write_text(os.path.join(path, "config.json"), model_config_json(model.config))
    if isinstance(tokenizer, str):
        with open(tokenizer, "rb") as f:
            tokenizer_files = {"tokenizer.model": f.read()}
    else:
        tokenizer_files = tokenizer.files
    for name, data in tokenizer_files.items():
        atomic_write_bytes(os.path.join(path, name), data)
    atomic_write_text(os.path.join(path, "training_args.yaml"), training_args_yaml)


def expected_weight_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    """What model.safetensors must hold for this model (adapters are stored apart)."""
    from .lora import is_lora_param

    return {name: tuple(p.shape) for name, p in model.named_parameters() if not is_lora_param(name)}


def check_weight_names(weights_file: str, stored: dict, expected: dict) -> None:
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise DamagedFile(f"{weights_file}: weights do not match config.json "
                          f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, shape in stored.items():
        if shape != expected[name]:
            raise DamagedFile(f"{weights_file}: tensor {name} has shape {shape}, config.json says {expected[name]}")


@torch.no_grad()
def load_model_weights(model: Transformer, directory: str) -> None:
    """Load the full weights of a model directory (model.safetensors, or the shards
    of a Hugging Face model) into a model, sharded or not: each rank reads only
    its own rows. LoRA adapter parameters, if injected, are not in the files. A
    file that does not match the model raises DamagedFile naming it."""
    from .import_hf import weight_files, weight_name
    from .lora import is_lora_param

    params = {name: p for name, p in model.named_parameters() if not is_lora_param(name)}
    files = weight_files(directory)
    where: dict[str, tuple[str, str]] = {}  # our name -> (file, the name inside it)
    stored: dict[str, tuple[int, ...]] = {}
    for path in files:
        with open_file(path) as f:
            for key in f.keys():
                where[weight_name(key)] = (path, key)
                stored[weight_name(key)] = tuple(f.get_slice(key).get_shape())
    if model.config.tie_word_embeddings:  # a tied weight is listed once, as embed_tokens.weight
        stored.pop("lm_head.weight", None)
    check_weight_names(files[0] if len(files) == 1 else directory, stored, expected_weight_shapes(model))
    for path in files:
        with open_file(path) as f:
            for name in stored:
                if where[name][0] == path:
                    read_into(f, where[name][1], params[name], path)


def load_model_dir(path: str) -> tuple[Transformer, ModelConfig]:
    cfg = load_model_config(os.path.join(path, "config.json"))
    model = Transformer(cfg)
    load_model_weights(model, path)
    return model, cfg


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
                    adapter_config: dict | None = None, data_signature: str = "") -> str:
    """Every rank calls this. Written under a temporary name, renamed by rank 0.
    data_signature (records.files_signature) lets a resumed run check its data."""
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
                              json.dumps({"step": step, "world_size": world_size, "data": data_signature}) + "\n")
    except BaseException:
        if is_main():  # a full disk: free what the half-written checkpoint took
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main():
        if os.path.exists(final):  # a resumed run saving the same step again
            old = os.path.join(output_dir, f".old-checkpoint-{step}")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        if save_total_limit > 0:
            for _, path in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(path)
    barrier()
    return final


def read_trainer_state(path: str) -> dict:
    state_file = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_file):
        old = " (written by an older nanobumble, trainer_state.pt)" \
            if os.path.exists(os.path.join(path, "trainer_state.pt")) else ""
        raise DamagedFile(f"{state_file}: not found{old}")
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{state_file}: not valid JSON ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) and state[k] >= 0
                                              for k in ("step", "world_size")):
        raise DamagedFile(f"{state_file}: expected {{\"step\": <int>, \"world_size\": <int>}}")
    return state


def checkpoint_problem(path: str) -> str | None:
    """What is wrong with a checkpoint directory, or None when it is intact: every
    file present and readable, the weights matching config.json, the optimizer
    state matching the weights. Reads headers only."""
    from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_param_name, read_adapter_config
    from .tokenizer import load_tokenizer

    try:
        state = read_trainer_state(path)
        match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
        if match and int(match.group(1)) != state["step"]:
            return f"trainer_state.json says step {state['step']}"
        for name in ("training_args.yaml", "rng_state.safetensors", "optimizer.safetensors"):
            if not os.path.isfile(os.path.join(path, name)) or os.path.getsize(os.path.join(path, name)) == 0:
                return f"{os.path.join(path, name)}: missing or empty"
        with open(os.path.join(path, "training_args.yaml"), encoding="utf-8") as f:
            if not isinstance(yaml.safe_load(f), dict):
                return "training_args.yaml is not a mapping"
        header_shapes(os.path.join(path, "rng_state.safetensors"))
        load_tokenizer(path)
        with torch.device("meta"):
            model = Transformer(load_model_config(os.path.join(path, "config.json")))
        if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
            read_adapter_config(path)
            trained = {adapter_param_name(key): shape
                       for key, shape in header_shapes(os.path.join(path, ADAPTER_WEIGHTS)).items()}
        else:
            weights_file = os.path.join(path, "model.safetensors")
            trained = header_shapes(weights_file)
            if model.config.tie_word_embeddings:
                trained.pop("lm_head.weight", None)
            check_weight_names(weights_file, trained, expected_weight_shapes(model))
        moments = {name.removesuffix(".exp_avg"): shape
                   for name, shape in header_shapes(os.path.join(path, "optimizer.safetensors")).items()
                   if name.endswith(".exp_avg")}
        if moments != trained:
            return "optimizer.safetensors does not match the weights"
    except (DamagedFile, UserError, DataError, ValueError, TypeError, OSError, RuntimeError, yaml.YAMLError) as e:
        return str(e)
    return None


def load_checkpoint(path: str, model: Transformer, optimizer: torch.optim.Optimizer) -> int:
    """Restore weights (or, for a LoRA run, the adapter), the optimizer (each rank
    reading its own rows) and the random generators; return the step."""
    from .lora import ADAPTER_WEIGHTS, load_adapter

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
