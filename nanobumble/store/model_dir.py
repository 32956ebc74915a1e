"""Model directories: what model_name_or_path points at, and what every stage
writes at the root of its output_dir when it finishes.

    config.json  model.safetensors  tokenizer.model  training_args.yaml

(a LoRA run writes adapter_model.safetensors + adapter_config.json instead of
model.safetensors, see adapter.py; a Hugging Face Qwen2 directory is read too,
see import_hf.py). Sharded tensors are gathered one at a time and rank 0 writes
them (tensor_files.py); every file goes to a temporary name first.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from nanobumble.base.distributed import all_reduce_sum, barrier, is_main
from nanobumble.base.errors import ConfigError, UserError
from nanobumble.base.files import atomic_write_bytes, atomic_write_text
from nanobumble.base.output_guard import check_writable, record
from nanobumble.base.precision import autocast
from nanobumble.base.reading import cut, read_json
from nanobumble.data.tokenizer import has_tokenizer
from nanobumble.model.lora import is_lora_param
from nanobumble.model.transformer import PRESETS, ModelConfig, Transformer, pad_vocab_size
from nanobumble.store.adapter import save_adapter
from nanobumble.store.import_hf import is_hf_config, model_config_from_hf, weight_files, weight_name
from nanobumble.store.tensor_files import DamagedFile, open_file, read_into, write_gathered

MODEL_FILES = ("config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors")
# Written last into every model directory nanobumble writes: {"files": {name: size}}.
# Loaders require it, so a directory whose writing was cut short never loads.
COMPLETE = "complete.json"


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


def check_model_dir(path: str, key: str) -> None:
    """A full model directory to start from or load (what pretraining or SFT
    wrote, or a Hugging Face Qwen2 one); key names the setting in the error."""


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
    check_complete(path)


def save_model_dir(path: str, model: Transformer, tokenizer, training_args_yaml: str,
                   adapter_config: dict | None = None) -> None:
    """Write (or overwrite) a model directory: the full weights, or for a LoRA run
    (adapter_config given) only the adapter, beside config.json, the tokenizer's
    files and training_args.yaml, and last complete.json. Its old complete.json
    goes first, so a directory cut short in between does not load. tokenizer is a
    loaded tokenizer (its files are kept in memory: the directory it came from
    may be a checkpoint that rotation deletes) or the path of a tokenizer.model.
    Every rank calls it (to gather shards); rank 0 writes."""
    if isinstance(tokenizer, str):
        with open(tokenizer, "rb") as f:
            tokenizer_files = {"tokenizer.model": f.read()}
    else:
        tokenizer_files = tokenizer.files
    weights = ("adapter_model.safetensors", "adapter_config.json") if adapter_config is not None \
        else ("model.safetensors",)
    names = (*weights, "config.json", *tokenizer_files, "training_args.yaml", COMPLETE)
    if is_main():
        os.makedirs(path, exist_ok=True)
        record(path, *names)
        if os.path.lexists(os.path.join(path, COMPLETE)):
            os.remove(os.path.join(path, COMPLETE))
    barrier()
    if adapter_config is not None:
        save_adapter(path, model, adapter_config)
    else:
        write_gathered(os.path.join(path, "model.safetensors"), _weights(model))
    if not is_main():
        return
    atomic_write_text(os.path.join(path, "config.json"), model_config_json(model.config))
    for name, data in tokenizer_files.items():
        atomic_write_bytes(os.path.join(path, name), data)
    atomic_write_text(os.path.join(path, "training_args.yaml"), training_args_yaml)
    sizes = {name: os.path.getsize(os.path.join(path, name)) for name in names if name != COMPLETE}
    atomic_write_text(os.path.join(path, COMPLETE), json.dumps({"files": sizes}, indent=1) + "\n")


def check_complete(directory: str) -> None:
    """Refuse a model directory nanobumble was still writing: its complete.json
    (written last) is missing, or names a file that is not there. Directories
    that are complete by construction pass without one: a Hugging Face model (not
    ours) and a checkpoint (written aside and renamed, checked on resume). Sizes
    are recorded but not compared: a file edited by hand is the readers' to judge."""
    if os.path.isfile(os.path.join(directory, "trainer_state.json")) or _is_hf_directory(directory):
        return
    path = os.path.join(directory, COMPLETE)
    if not os.path.isfile(path):
        raise UserError(f"{directory} is incomplete: no {COMPLETE}, which nanobumble writes last (the program "
                        f"writing it was stopped before it finished, or an older nanobumble wrote it; if you "
                        f"know its files are whole, write {{}} into {path})")
    content = read_json(path)
    names = content.get("files", {}) if isinstance(content, dict) else None
    if not isinstance(names, dict):
        raise UserError(f'{path}: damaged (expected {{"files": {{name: size}}}})')
    missing = [name for name in names if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise UserError(f"{directory} is incomplete: {', '.join(missing[:5])} missing ({path} lists it)")


def _is_hf_directory(directory: str) -> bool:
    try:
        config = read_json(os.path.join(directory, "config.json"))
        return isinstance(config, dict) and is_hf_config(config)
    except UserError:  # no config.json, or a damaged one: the loaders say which
        return False


@torch.no_grad()
def weights_usable(model: Transformer, device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """Every weight finite, and a forward pass through them too (a diverged update
    can leave huge but finite weights that give NaN logits): checked before any
    model is published. Every rank calls this (with a sharded model the forward
    pass is a collective)."""
    bad = torch.zeros((), device=device)
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        bad += (~torch.isfinite(local)).sum()
    length = min(model.config.vocab_size, model.config.max_position_embeddings + 1, 33)
    probe = torch.arange(length, device=device)[None]
    was_training = model.training
    model.eval()  # no dropout: the probe draws no random numbers
    with autocast(device, dtype):
        loss = model(probe[:, :-1], probe[:, 1:])
    model.train(was_training)
    bad += ~torch.isfinite(loss.float())
    return all_reduce_sum(bad).item() == 0


def expected_weight_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    """What model.safetensors must hold for this model (adapters are stored apart)."""


    return {name: tuple(p.shape) for name, p in model.named_parameters() if not is_lora_param(name)}


def check_weight_names(weights_file: str, stored: dict, expected: dict) -> None:
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise DamagedFile(f"{weights_file}: weights do not match config.json "
                          f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, shape in stored.items():
        if shape != expected[name]:
            raise DamagedFile(f"{weights_file}: tensor {name} has shape {shape}, config.json says {expected[name]}")


def check_stored_weights(model: Transformer, directory: str) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """The weight files of a model directory against the model (which may still be
    on the meta device: so absurd sizes in config.json are caught from the headers
    before anything is allocated). Returns the files and where each weight is:
    our name -> (file, the name inside it). A mismatch raises DamagedFile."""
    check_complete(directory)
    files = weight_files(directory)
    where: dict[str, tuple[str, str]] = {}
    stored: dict[str, tuple[int, ...]] = {}
    for path in files:
        with open_file(path) as f:
            for key in f.keys():
                where[weight_name(key)] = (path, key)
                stored[weight_name(key)] = tuple(f.get_slice(key).get_shape())
    if model.config.tie_word_embeddings:  # a tied weight is listed once, as embed_tokens.weight
        stored.pop("lm_head.weight", None)
        where.pop("lm_head.weight", None)
    check_weight_names(files[0] if len(files) == 1 else directory, stored, expected_weight_shapes(model))
    return files, where


@torch.no_grad()
def load_model_weights(model: Transformer, directory: str) -> None:
    """Load the full weights of a model directory (model.safetensors, or the shards
    of a Hugging Face model) into a model, sharded or not: each rank reads only
    its own rows. LoRA adapter parameters, if injected, are not in the files. A
    file that does not match the model raises DamagedFile naming it."""
    files, where = check_stored_weights(model, directory)
    params = {name: p for name, p in model.named_parameters() if not is_lora_param(name)}
    for path in files:
        with open_file(path) as f:
            for name, (file, key) in where.items():
                if file == path:
                    read_into(f, key, params[name], path)


def load_model_dir(path: str) -> tuple[Transformer, ModelConfig]:
    cfg = load_model_config(os.path.join(path, "config.json"))
    with torch.device("meta"):
        check_stored_weights(Transformer(cfg), path)  # before the weights are allocated
    model = Transformer(cfg)
    load_model_weights(model, path)
    return model, cfg


def model_config_for(name_or_path: str, vocab_size: int) -> ModelConfig:
    """A preset by name (with the tokenizer's vocabulary) or the config.json of a model directory."""
    if name_or_path in PRESETS:
        return ModelConfig(vocab_size=pad_vocab_size(vocab_size), **PRESETS[name_or_path])
    config_file = os.path.join(name_or_path, "config.json")
    if not os.path.isfile(config_file):
        raise ConfigError(
            f"key 'model_name_or_path': '{name_or_path}' is neither a preset ({', '.join(PRESETS)}) "
            f"nor a model directory with config.json")
    return load_model_config(config_file)


def load_model_config(config_file: str) -> ModelConfig:
    """A model directory's config.json; anything wrong with it is a ConfigError naming the file."""
    data = read_json(config_file, error=ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{config_file}: expected a JSON object of model keys, got {type(data).__name__}")

    if is_hf_config(data):
        return model_config_from_hf(data, config_file)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{config_file}: unknown model keys {cut(repr(unknown))} (known: {', '.join(sorted(known))})")
    try:
        return ModelConfig(**data)
    except ConfigError as e:
        raise ConfigError(f"{config_file}: {e}") from None


def model_config_json(cfg: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2) + "\n"


