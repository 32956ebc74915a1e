"""Model directories and resumable checkpoints.

A model directory (what model_name_or_path points at):
    config.json  model.safetensors  tokenizer.model  training_args.yaml

A checkpoint, output_dir/checkpoint-{step}/, is a model directory plus the
trainer state needed to continue exactly: optimizer/ (the AdamW moments, saved
by torch.distributed.checkpoint: each rank writes its own shard, and a later
run with a different number of ranks reshards on load) and trainer_state.pt
(step, RNG state). The data position is the step itself, because every batch
is drawn from (seed, step, sample index).

model.safetensors is always the consolidated model: sharded parameters are
gathered and rank 0 writes the file. Every write goes to a temporary name first
and is renamed into place, so a crash or a NaN can never leave a half-written
checkpoint behind.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from .model import ModelConfig, Transformer, copy_full_into, load_model_config, model_config_json


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _copy_atomic(src: str, dst: str) -> None:
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def gather_full_on_main(named_tensors) -> dict[str, torch.Tensor]:
    """Each tensor whole and on the CPU, kept by rank 0 only; other ranks return {}.

    A sharded (FSDP2 DTensor) tensor is all-gathered, which is a collective: every
    rank must call this with the same names in the same order. Gathering one
    tensor at a time, moving it to the CPU at once and dropping it on the other
    ranks means a non-zero rank never holds more than its shards plus one full
    tensor, and the GPU never more than one gathered tensor."""
    main = _is_main()
    state = {}
    for name, tensor in named_tensors:
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        if main:
            state[name] = tensor.detach().to("cpu").contiguous()
        del tensor  # on other ranks: freed here, before the next gather
    return state


def model_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Full weights on the CPU on rank 0, {} on other ranks (every rank must call
    this: sharded tensors are gathered). A tied LM head is the embedding, so it is
    stored once."""
    tied = model.config.tie_word_embeddings
    return gather_full_on_main((name, tensor) for name, tensor in model.state_dict().items()
                               if not (tied and name == "lm_head.weight"))


def save_model_dir(path: str, model: Transformer, tokenizer_file: str | bytes, training_args_yaml: str,
                   adapter_config: dict | None = None) -> None:
    """Write (or overwrite, file by file atomically) a model directory: the full
    weights, or for a LoRA run (adapter_config given) only the adapter, beside
    config.json, tokenizer.model and training_args.yaml. tokenizer_file is a
    path to copy, or the tokenizer's bytes (Tokenizer.model_bytes: what a
    training run passes, since the file it was loaded from may be a checkpoint
    that rotation deletes). Every rank calls it (to gather shards); rank 0 writes."""
    if adapter_config is not None:
        from .lora import save_adapter
        save_adapter(path, model, adapter_config)
    else:
        state = model_state_dict(model)
    if not _is_main():
        return
    os.makedirs(path, exist_ok=True)
    if adapter_config is None:
        tmp = os.path.join(path, f"model.safetensors.tmp-{os.getpid()}")
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, "model.safetensors"))
    atomic_write_text(os.path.join(path, "config.json"), model_config_json(model.config))
    tokenizer_path = os.path.join(path, "tokenizer.model")
    if isinstance(tokenizer_file, bytes):
        tmp = f"{tokenizer_path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(tokenizer_file)
        os.replace(tmp, tokenizer_path)
    elif os.path.abspath(tokenizer_file) != os.path.abspath(tokenizer_path):
        _copy_atomic(tokenizer_file, tokenizer_path)
    atomic_write_text(os.path.join(path, "training_args.yaml"), training_args_yaml)


@torch.no_grad()
def load_model_weights(model: Transformer, weights_file: str) -> None:
    """Load a full safetensors file into a model, sharded or not (each rank keeps
    its slice). LoRA adapter parameters, if injected, are not in the file."""
    from .lora import is_lora_param

    state = load_file(weights_file)
    # a tied weight is listed once, as embed_tokens.weight
    params = {name: p for name, p in model.named_parameters() if not is_lora_param(name)}
    expected = {name: tuple(p.shape) for name, p in params.items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_file}: weights do not match config.json "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{weights_file}: tensor {name} has shape {tuple(tensor.shape)}, "
                             f"config.json says {expected[name]}")
    for name, tensor in state.items():
        copy_full_into(params[name], tensor.to(params[name].dtype))


def load_model_dir(path: str) -> tuple[Transformer, ModelConfig]:
    cfg = load_model_config(os.path.join(path, "config.json"))
    model = Transformer(cfg)
    load_model_weights(model, os.path.join(path, "model.safetensors"))
    return model, cfg


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first. Incomplete ones never carry the final name."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(output_dir: str, step: int, model: Transformer, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, tokenizer_file: str | bytes, training_args_yaml: str,
                    save_total_limit: int, adapter_config: dict | None = None) -> str:
    """Every rank calls this. Written under a temporary name, renamed by rank 0."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    save_model_dir(tmp, model, tokenizer_file, training_args_yaml, adapter_config)
    with warnings.catch_warnings():  # a single process saving alone is intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=os.path.join(tmp, "optimizer"),
                 no_dist=not dist.is_initialized())
    if _is_main():
        torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
        if os.path.exists(final):  # a resumed run saving the same step again
            old = f"{final}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        if save_total_limit > 0:
            for _, path in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(path)
    _barrier()
    return final


def load_checkpoint(path: str, model: Transformer, optimizer: torch.optim.Optimizer) -> dict:
    """Restore weights (or, for a LoRA run, the adapter) and the optimizer in place,
    resharding to this run's ranks; return the trainer state."""
    if os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
        from .lora import load_adapter
        load_adapter(model, path)
    else:
        load_model_weights(model, os.path.join(path, "model.safetensors"))
    state = get_optimizer_state_dict(model, optimizer)  # the target layout; filled in by the load
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=os.path.join(path, "optimizer"), no_dist=not dist.is_initialized())
    set_optimizer_state_dict(model, optimizer, state)
    return torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
