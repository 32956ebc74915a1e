"""The model a training run starts from, built for this rank.

open_starting_model reads the shape and tokenizer of the model directory SFT
or DPO starts from (pretraining picks its own in train_pretrain.py);
build_model then makes the model itself: on the meta device, sharded over the
ranks, filled with weights, with LoRA adapters and the kernel choice.
"""

from __future__ import annotations

import os

import torch

from nanobumble.base.distributed import DistInfo, shard_model
from nanobumble.base.errors import UserError
from nanobumble.data.tokenizer import load_tokenizer
from nanobumble.model.lora import init_lora_weights, inject_lora
from nanobumble.model.transformer import Transformer
from nanobumble.store.model_dir import check_model_dir, check_stored_weights, load_model_config, load_model_weights


def lora_settings(cfg) -> dict | None:
    """Keyword arguments for lora.inject_lora, or None for full fine-tuning."""
    if cfg.finetuning_type != "lora":
        return None
    return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
            "target_modules": cfg.lora_target_modules, "use_rslora": cfg.use_rslora, "seed": cfg.seed}


def check_model_fits(model_cfg, tokenizer, cutoff_len: int) -> None:
    """The tokenizer must fit the model's vocabulary, and a training row its positions."""
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                        f"{model_cfg.vocab_size}: tokenizer and model do not belong together")
    if cutoff_len > model_cfg.max_position_embeddings:
        raise UserError(f"cutoff_len {cutoff_len} exceeds the model's max_position_embeddings "
                        f"{model_cfg.max_position_embeddings}")


def open_starting_model(cfg):
    """The tokenizer and shape of the model directory SFT or DPO starts from."""
    check_model_dir(cfg.model_name_or_path, "model_name_or_path")
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    model_cfg = load_model_config(os.path.join(cfg.model_name_or_path, "config.json"))
    check_model_fits(model_cfg, tokenizer, cfg.cutoff_len)
    return tokenizer, model_cfg


def build_model(model_cfg, info: DistInfo, seed: int, weights_from: str | None,
                param_dtype: torch.dtype | None, gradient_checkpointing: bool = False, compile: bool = False,
                lora: dict | None = None, kernels: str = "auto"):
    """Create the model on the meta device (no memory), shard it when there are
    several ranks, then allocate only this rank's shards on its device and fill
    them: from the weights of the model directory weights_from, or with the
    seeded initialisation. So a 1.5B model never exists whole on one rank
    before it is sharded. `lora` (keyword arguments of lora.inject_lora) adds
    adapters before sharding and freezes the rest. `kernels` (auto | triton |
    torch, see model/layers.py: resolve_backend) is the model's kernel choice from then on."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    if lora is not None:
        inject_lora(model, **lora)
    model.gradient_checkpointing = gradient_checkpointing
    model.kernels = kernels
    if compile:
        for block in model.layers:
            block.compile()  # per block: compiles once, reused by all layers
    if weights_from:
        check_stored_weights(model, weights_from)  # config.json against the files, before allocating
    if info.sharded:
        shard_model(model, info, param_dtype)
    model.to_empty(device=info.device)
    if model_cfg.tie_word_embeddings:  # to_empty can re-create parameters; tie again
        model.lm_head.weight = model.embed_tokens.weight
    if weights_from:
        load_model_weights(model, weights_from)
    else:
        model.init_weights(seed)
    if lora is not None:
        init_lora_weights(model, seed)  # B = 0: the model starts exactly as the base
    return model
