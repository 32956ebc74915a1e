"""Stage 1: pretrain a language model on raw text.

    python train_pretrain.py                      # tiny model on datasets/pretrain, CPU, ~2 minutes
    torchrun --nproc_per_node=2 train_pretrain.py # the same, two processes, model sharded by FSDP2
    python train_pretrain.py --yaml_config configs/pretrain/pretrain_full.yaml \
        --dataset_path <jsonl files or dir> --output_dir ./checkpoints/pretrain/bumblebee_1.5b_base

The whole stage, top to bottom: config -> tokenizer -> token shards -> model ->
optimizer -> resume -> loop (forward, backward, clip, step, log, evaluate,
save) -> final model directory in output_dir.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from nanobumble.base.distributed import (all_reduce_mean, all_reduce_sum, local_bytes, main_process_first,
                                         optimizer_state_bytes, print0)
from nanobumble.base.errors import run_cli
from nanobumble.base.precision import autocast, precision_summary
from nanobumble.data.records import files_fingerprint, iter_text_records, list_data_files
from nanobumble.data.shards import TokenShards, ensure_shards
from nanobumble.data.tokenizer import Tokenizer, has_tokenizer, load_or_train_tokenizer, load_tokenizer
from nanobumble.model.mfu import training_flops_per_token
from nanobumble.run.build import check_model_fits
from nanobumble.run.config import PretrainConfig
from nanobumble.run.stage import Stage, run_stage, share_batches
from nanobumble.store.model_dir import model_config_for


def main(argv: list[str]) -> None:
    run_stage(train, PretrainConfig, argv)  # the config from argv, then train() on every rank


def find_tokenizer(cfg: PretrainConfig, resume_dir: str | None) -> Tokenizer:
    """The tokenizer travels with the model: a checkpoint's or model directory's
    tokenizer.model wins; otherwise tokenizer_path; otherwise train one on the data."""
    for directory in (resume_dir, cfg.model_name_or_path, cfg.dataset_path):
        if directory and os.path.isdir(directory) and has_tokenizer(directory):
            if cfg.tokenizer_path and directory != cfg.dataset_path:
                print0(f"note: using the tokenizer of {directory} (the model's own), not tokenizer_path")
            return load_tokenizer(directory)
    files = list_data_files(cfg.dataset_path)
    return load_or_train_tokenizer(cfg.tokenizer_path, lambda: iter_text_records(files, strict=cfg.strict),
                                   cfg.vocab_size, cfg.cache_dir, files_fingerprint(files)[:16],
                                   corpus_bytes=sum(os.path.getsize(f) for f in files),
                                   sample_mb=cfg.tokenizer_sample_mb)


@torch.no_grad()
def evaluate(model, val_data: TokenShards, cfg: PretrainConfig, token_bytes: torch.Tensor, info, dtype) -> dict:
    """Mean validation loss (nats per token) and bits per byte (comparable across
    tokenizers). Ranks share the batches out (share_batches)."""
    model.eval()
    batches = list(val_data.val_batches(cfg.cutoff_len, cfg.train_micro_batch_size_per_gpu, cfg.eval_rows))
    totals = torch.zeros(4, dtype=torch.float64, device=info.device)  # nats, tokens, text nats, text bytes
    for i, weight in share_batches(len(batches), info):
        x, y = (t.to(info.device) for t in batches[i])
        with autocast(info.device, dtype):
            losses, _ = model(x, y, reduction="none")  # per token, without the [tokens x vocab] logits
        losses = losses.flatten().double()
        nbytes = token_bytes[y.flatten()]
        # Special tokens stand for no text: they count neither bytes nor bits.
        totals += weight * torch.stack([losses.sum(), torch.tensor(y.numel(), device=info.device),
                                        losses[nbytes > 0].sum(), nbytes.sum()]).double()
    nats, tokens, text_nats, text_bytes = all_reduce_sum(totals).tolist()
    model.train()
    return {"val/loss": nats / tokens, "val/bpb": text_nats / math.log(2) / max(text_bytes, 1)}


def train(cfg: PretrainConfig, info) -> None:
    stage = Stage(cfg, info)  # precision, seed, the config printed
    resume_dir = stage.open_output_dir()  # the checkpoint to resume, if any; may move a damaged one aside

    # --- tokenizer and model shape (checked against each other before any data work) ---
    tokenizer = main_process_first(lambda: find_tokenizer(cfg, resume_dir))
    model_cfg = model_config_for(resume_dir or cfg.model_name_or_path, tokenizer.vocab_size)
    check_model_fits(model_cfg, tokenizer, cfg.cutoff_len)

    # --- token shards (prepared once, by rank 0) ---
    shard_dir = main_process_first(lambda: ensure_shards(cfg.dataset_path, tokenizer, cfg.cache_dir,
                                                         val_ratio=cfg.val_ratio, strict=cfg.strict,
                                                         num_workers=cfg.preprocessing_num_workers or None))
    train_data = TokenShards(shard_dir, "train")
    val_data = TokenShards(shard_dir, "val")
    if val_data.num_tokens < cfg.cutoff_len + 1:
        print0(f"note: validation split has {val_data.num_tokens} tokens, fewer than cutoff_len+1; validation is off")
        val_data = None

    # --- model: built on the meta device, sharded over the ranks, then filled ---
    weights = cfg.model_name_or_path if os.path.isdir(cfg.model_name_or_path) and not resume_dir else None
    model = stage.build_model(model_cfg, weights)
    print0(f"model: {cfg.model_name_or_path}, {model.num_parameters() / 1e6:.2f}M parameters, "
           f"vocab {model_cfg.vocab_size}, {info.world_size} x {info.device.type}, "
           f"{precision_summary(info, stage.dtype)}")

    # --- schedule: one epoch is every window once, shuffled ---
    windows = train_data.num_windows(cfg.cutoff_len)
    stage.plan(windows)
    batch_rows, steps_per_epoch = stage.batch_rows, stage.steps_per_epoch
    tokens_per_step = batch_rows * cfg.cutoff_len
    print0(f"data: {train_data.num_tokens:,} training tokens; global batch {stage.batch_arithmetic} rows "
           f"of {cfg.cutoff_len} = {tokens_per_step:,} tokens per step; "
           f"{stage.num_steps} steps = {stage.num_steps / steps_per_epoch:.2f} epochs of {windows:,} windows")
    if windows % batch_rows:
        print0(f"data: an epoch is not a whole number of steps ({steps_per_epoch:.2f}): the step that "
               f"crosses into the next epoch takes its last rows from it, newly shuffled")

    # --- optimizer, resume, logger (rank 0 writes) ---
    stage.start(model, tokenizer, train_data.meta.get("data_sha256", ""),
                flops_per_token=training_flops_per_token(model_cfg, cfg.cutoff_len))
    device = info.device
    token_bytes = torch.from_numpy(tokenizer.token_byte_lengths()).to(device)
    token_bytes = F.pad(token_bytes, (0, model_cfg.vocab_size - len(token_bytes)))

    # --- the loop ---
    for step in stage.steps():
        loss_sum = torch.zeros((), device=device)
        for micro, rows in enumerate(stage.micro_batches(step)):
            x, y = train_data.batch(cfg.seed, rows, cfg.cutoff_len)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if info.sharded:  # reduce gradients across ranks only after the last micro-step
                model.set_requires_gradient_sync(micro == cfg.gradient_accumulation_steps - 1)
            with autocast(device, stage.autocast_dtype):
                loss = model(x, y)
            # FSDP averages gradients over ranks; dividing by the micro-steps makes
            # the gradient the mean over the whole global batch.
            (loss / cfg.gradient_accumulation_steps).backward()
            loss_sum += loss.detach()
        step_loss = all_reduce_mean(loss_sum).item() / cfg.gradient_accumulation_steps
        stage.update(step, tokens_per_step, {"train/loss": step_loss})
        if stage.progress.steps_done == 1 and info.sharded:
            print(f"rank {info.rank}: holds {local_bytes(model.parameters()) / 2**20:.2f} MiB of parameters and "
                  f"{optimizer_state_bytes(stage.optimizer) / 2**20:.2f} MiB of optimizer state "
                  f"(of {model.num_parameters() * 4 / 2**20:.2f} MiB fp32 parameters in all)", flush=True)

        if val_data is not None and stage.is_eval_step(step):
            stage.report_evaluation(step, evaluate(model, val_data, cfg, token_bytes, info, stage.autocast_dtype))
        stage.save_if_due(step)

    stage.finish()


if __name__ == "__main__":
    run_cli(main)
