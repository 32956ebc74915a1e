"""Stage 1: pretrain a language model on raw text.

    python train_pretrain.py                      # tiny model on datasets/pretrain, CPU, ~2 minutes
    python train_pretrain.py --yaml_config configs/pretrain/pretrain_full.yaml \
        --dataset_path <jsonl files or dir> --output_dir ./checkpoints/pretrain/bumblebee_1.5b_base

The whole stage, top to bottom: config -> tokenizer -> token shards -> model ->
optimizer -> resume -> loop (forward, backward, clip, step, log, evaluate,
save) -> final model directory in output_dir.
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F

from nanobumble.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint, load_model_weights,
                                   rng_state, save_checkpoint, save_model_dir, set_rng_state)
from nanobumble.common import UserError, autocast, format_duration, pick_device, resolve_precision, run_cli
from nanobumble.config import TrainConfig, config_to_yaml, parse_config
from nanobumble.data import TokenShards, ensure_shards, files_fingerprint, iter_text_records, list_data_files
from nanobumble.metrics import MetricsLogger
from nanobumble.mfu import peak_bf16_flops, training_flops_per_token
from nanobumble.model import Transformer, model_config_for
from nanobumble.optim import build_optimizer, lr_at
from nanobumble.tokenizer import Tokenizer, load_or_train_tokenizer


def find_tokenizer(cfg: TrainConfig, resume_dir: str | None) -> Tokenizer:
    """The tokenizer travels with the model: a checkpoint's or model directory's
    tokenizer.model wins; otherwise tokenizer_path; otherwise train one on the data."""
    for directory in (resume_dir, cfg.model_name_or_path, cfg.dataset_path):
        if directory and os.path.isfile(os.path.join(directory, "tokenizer.model")):
            if cfg.tokenizer_path and directory != cfg.dataset_path:
                print(f"note: using {directory}/tokenizer.model (the model's own), not tokenizer_path")
            return Tokenizer(os.path.join(directory, "tokenizer.model"))
    files = list_data_files(cfg.dataset_path)
    return load_or_train_tokenizer(cfg.tokenizer_path, lambda: iter_text_records(files, strict=cfg.strict),
                                   cfg.vocab_size, cfg.cache_dir, files_fingerprint(files)[:16])


@torch.no_grad()
def evaluate(model, val_data: TokenShards, cfg: TrainConfig, token_bytes: torch.Tensor, device, dtype) -> dict:
    """Mean validation loss (nats per token) and bits per byte (comparable across tokenizers)."""
    model.eval()
    nats, tokens, text_nats, text_bytes = 0.0, 0, 0.0, 0
    for x, y in val_data.val_batches(cfg.cutoff_len, cfg.train_micro_batch_size_per_gpu, cfg.eval_batches):
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits = model(x)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        nbytes = token_bytes[y.flatten()]
        nats += losses.sum().item()
        tokens += y.numel()
        # Special tokens stand for no text: they count neither bytes nor bits.
        text_nats += losses[nbytes > 0].sum().item()
        text_bytes += nbytes.sum().item()
    model.train()
    return {"val/loss": nats / tokens, "val/bpb": text_nats / math.log(2) / max(text_bytes, 1)}


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, TrainConfig)
    device = pick_device()
    dtype = resolve_precision(cfg.train_model_precision, device)
    torch.manual_seed(cfg.seed)
    print(f"config:\n{config_to_yaml(cfg)}")

    # --- where do we start? ---
    resume_dir = None
    if cfg.resume:
        resume_dir = latest_checkpoint(cfg.output_dir) if cfg.resume == "auto" else cfg.resume
        if cfg.resume != "auto" and not os.path.isdir(cfg.resume):
            raise UserError(f"resume: checkpoint directory not found: {cfg.resume}")
        print(f"resuming from {resume_dir}" if resume_dir else f"resume=auto: no checkpoint in {cfg.output_dir}, starting fresh")
    elif list_checkpoints(cfg.output_dir):
        raise UserError(f"output_dir {cfg.output_dir} already holds checkpoints; continue it with --resume auto, "
                        f"or pick another --output_dir (nothing there is overwritten)")

    # --- tokenizer and model shape (checked against each other before any data work) ---
    tokenizer = find_tokenizer(cfg, resume_dir)
    model_cfg = model_config_for(resume_dir or cfg.model_name_or_path, tokenizer.vocab_size)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                        f"{model_cfg.vocab_size}: tokenizer and model do not belong together")
    if cfg.cutoff_len > model_cfg.max_position_embeddings:
        raise UserError(f"cutoff_len {cfg.cutoff_len} exceeds the model's max_position_embeddings "
                        f"{model_cfg.max_position_embeddings}")

    # --- token shards ---
    shard_dir = ensure_shards(cfg.dataset_path, tokenizer, cfg.cache_dir, val_ratio=cfg.val_ratio, strict=cfg.strict)
    train_data = TokenShards(shard_dir, "train")
    val_data = TokenShards(shard_dir, "val")
    if val_data.num_tokens < cfg.cutoff_len + 1:
        print(f"note: validation split has {val_data.num_tokens} tokens, fewer than cutoff_len+1; validation is off")
        val_data = None

    # --- model ---
    model = Transformer(model_cfg)
    if os.path.isdir(cfg.model_name_or_path) and not resume_dir:
        load_model_weights(model, os.path.join(cfg.model_name_or_path, "model.safetensors"))
    model.gradient_checkpointing = cfg.enable_gradient_checkpointing
    model.to(device)
    print(f"model: {cfg.model_name_or_path}, {model.num_parameters() / 1e6:.2f}M parameters, "
          f"vocab {model_cfg.vocab_size}, device {device.type}, compute {str(dtype).removeprefix('torch.')}")

    # --- optimizer and schedule ---
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))
    batch_rows = cfg.train_micro_batch_size_per_gpu * cfg.gradient_accumulation_steps
    tokens_per_step = batch_rows * cfg.cutoff_len
    steps_per_epoch = max(1, train_data.num_tokens // tokens_per_step)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_epochs * steps_per_epoch))
    warmup_steps = int(cfg.warmup_ratio * total_steps)
    print(f"data: {train_data.num_tokens:,} training tokens; {tokens_per_step:,} tokens per step "
          f"({batch_rows} rows x {cfg.cutoff_len}); {total_steps} steps = {total_steps / steps_per_epoch:.2f} epochs")

    start_step = 0
    if resume_dir:
        state = load_checkpoint(resume_dir, model, optimizer)
        set_rng_state(state["rng"])
        start_step = state["step"]

    # --- logging ---
    os.makedirs(cfg.output_dir, exist_ok=True)
    training_args = config_to_yaml(cfg)
    logger = MetricsLogger(cfg.output_dir, cfg.use_tensorboard, resume_step=start_step)
    token_bytes = torch.from_numpy(tokenizer.token_byte_lengths()).to(device)
    token_bytes = F.pad(token_bytes, (0, model_cfg.vocab_size - len(token_bytes)))
    flops_per_token = training_flops_per_token(model_cfg, cfg.cutoff_len)
    peak_flops = peak_bf16_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None

    def save(step: int) -> None:
        state = {"step": step, "rng": rng_state()}
        path = save_checkpoint(cfg.output_dir, step, model, optimizer, state, tokenizer.model_file,
                               training_args, cfg.save_total_limit)
        print(f"saved {path}")

    # --- the loop ---
    model.train()
    window_loss, window_steps, window_time = 0.0, 0, 0.0
    run_start, steps_done = time.time(), 0
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.time()
        lr = lr_at(step, total_steps, cfg.learning_rate, warmup_steps, cfg.lr_scheduler_type, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr

        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.gradient_accumulation_steps):
            # Global sample indices: the batch depends only on (seed, step), so a
            # resumed run draws exactly the batches the uninterrupted run would have.
            first = micro * cfg.train_micro_batch_size_per_gpu
            indices = range(first, first + cfg.train_micro_batch_size_per_gpu)
            x, y = train_data.sample_batch(cfg.seed, step, indices, cfg.cutoff_len)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, dtype):
                loss = model(x, y)
            (loss / cfg.gradient_accumulation_steps).backward()
            loss_sum += loss.detach()

        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        step_loss = loss_sum.item() / cfg.gradient_accumulation_steps
        if not math.isfinite(step_loss) or not math.isfinite(grad_norm):
            last = latest_checkpoint(cfg.output_dir)
            raise UserError(f"loss {step_loss} / grad norm {grad_norm} at step {step}: stopping before the "
                            f"update; the last good checkpoint is {last or 'none (nothing saved yet)'}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        window_loss += step_loss
        window_steps += 1
        window_time += time.time() - t0
        steps_done += 1

        if step % cfg.logging_steps == 0 or step == total_steps:
            tokens_per_sec = window_steps * tokens_per_step / window_time
            scalars = {"train/loss": window_loss / window_steps, "train/lr": lr, "train/grad_norm": grad_norm,
                       "train/tokens_per_sec": tokens_per_sec}
            line = (f"step {step}/{total_steps} | loss {scalars['train/loss']:.4f} | lr {lr:.2e} "
                    f"| grad norm {grad_norm:.3f} | {tokens_per_sec:,.0f} tok/s")
            if peak_flops:
                scalars["train/mfu"] = flops_per_token * tokens_per_sec / peak_flops
                line += f" | mfu {100 * scalars['train/mfu']:.1f}%"
            eta = (time.time() - run_start) / steps_done * (total_steps - step)
            print(f"{line} | eta {format_duration(eta)}", flush=True)
            logger.log(step, scalars)
            window_loss, window_steps, window_time = 0.0, 0, 0.0

        if val_data is not None and (step == total_steps or (cfg.eval_steps > 0 and step % cfg.eval_steps == 0)):
            scalars = evaluate(model, val_data, cfg, token_bytes, device, dtype)
            print(f"step {step}/{total_steps} | val loss {scalars['val/loss']:.4f} | val bpb {scalars['val/bpb']:.4f}")
            logger.log(step, scalars)

        if cfg.save_steps > 0 and step % cfg.save_steps == 0:
            save(step)

    save_model_dir(cfg.output_dir, model, tokenizer.model_file, training_args)
    logger.close()
    print(f"done in {format_duration(time.time() - run_start)}; model directory: {cfg.output_dir}")


if __name__ == "__main__":
    run_cli(main)
