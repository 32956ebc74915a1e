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
import time

import torch
import torch.nn.functional as F

from nanobumble.checkpoint import load_checkpoint, save_checkpoint, save_model_dir
from nanobumble.common import autocast, resolve_precision, run_cli
from nanobumble.config import PretrainConfig, config_to_yaml, parse_config
from nanobumble.data import (TokenShards, ensure_shards, files_fingerprint, files_signature, iter_text_records,
                             list_data_files)
from nanobumble.distributed import (all_reduce_mean, all_reduce_sum, autocast_dtype, build_model, distributed_run,
                                    local_bytes, main_process_first, optimizer_state_bytes, precision_summary, print0)
from nanobumble.metrics import MetricsLogger
from nanobumble.mfu import peak_bf16_flops, training_flops_per_token
from nanobumble.model import model_config_for
from nanobumble.optim import build_optimizer, lr_at
from nanobumble.plot import plot_run
from nanobumble.tokenizer import Tokenizer, has_tokenizer, load_or_train_tokenizer, load_tokenizer
from nanobumble.training import (Progress, check_finite, check_model_finite, check_model_fits, clip_gradients,
                                is_eval_step, rank_batches, report_evaluation, resolve_resume,
                                set_learning_rate, total_steps)


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
    tokenizers). Ranks share the batches out (rank_batches)."""
    model.eval()
    batches = list(val_data.val_batches(cfg.cutoff_len, cfg.train_micro_batch_size_per_gpu, cfg.eval_batches))
    totals = torch.zeros(4, dtype=torch.float64, device=info.device)  # nats, tokens, text nats, text bytes
    for i, weight in rank_batches(len(batches), info):
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


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, PretrainConfig)
    with distributed_run(cfg.collective_timeout_minutes) as info:
        train(cfg, info)


def train(cfg: PretrainConfig, info) -> None:
    device = info.device
    dtype = resolve_precision(cfg.train_model_precision, device)
    torch.manual_seed(cfg.seed)
    print0(f"config:\n{config_to_yaml(cfg)}")

    # --- where do we start? ---
    resume_dir = main_process_first(lambda: resolve_resume(cfg, info.world_size))

    # --- tokenizer and model shape (checked against each other before any data work) ---
    tokenizer = main_process_first(lambda: find_tokenizer(cfg, resume_dir))
    model_cfg = model_config_for(resume_dir or cfg.model_name_or_path, tokenizer.vocab_size)
    check_model_fits(model_cfg, tokenizer, cfg.cutoff_len)

    # --- token shards (prepared once, by rank 0) ---
    shard_dir = main_process_first(lambda: ensure_shards(cfg.dataset_path, tokenizer, cfg.cache_dir,
                                                         val_ratio=cfg.val_ratio, strict=cfg.strict,
                                                         num_workers=cfg.preprocessing_num_workers or None))
    train_data = TokenShards(shard_dir, "train")
    data_signature = files_signature(cfg.dataset_path)  # recorded in checkpoints: resume checks it
    val_data = TokenShards(shard_dir, "val")
    if val_data.num_tokens < cfg.cutoff_len + 1:
        print0(f"note: validation split has {val_data.num_tokens} tokens, fewer than cutoff_len+1; validation is off")
        val_data = None

    # --- model: built on the meta device, sharded over the ranks, then filled ---
    weights = None
    if os.path.isdir(cfg.model_name_or_path) and not resume_dir:
        weights = cfg.model_name_or_path
    model = build_model(model_cfg, info, cfg.seed, weights, dtype, cfg.enable_gradient_checkpointing, cfg.compile)
    model.kernels = cfg.kernels
    compute_dtype = autocast_dtype(info, dtype)  # sharded: FSDP's policy casts the weights instead
    print0(f"model: {cfg.model_name_or_path}, {model.num_parameters() / 1e6:.2f}M parameters, "
           f"vocab {model_cfg.vocab_size}, {info.world_size} x {device.type}, "
           f"{precision_summary(info, dtype)}")

    # --- optimizer and schedule ---
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))
    micro_batch = cfg.train_micro_batch_size_per_gpu
    batch_rows = micro_batch * cfg.gradient_accumulation_steps * info.world_size
    tokens_per_step = batch_rows * cfg.cutoff_len
    windows = train_data.num_windows(cfg.cutoff_len)  # one epoch: every window once, shuffled
    steps_per_epoch = windows / batch_rows
    num_steps = total_steps(cfg.max_steps, cfg.num_epochs, steps_per_epoch)
    warmup_steps = int(cfg.warmup_ratio * num_steps)
    print0(f"data: {train_data.num_tokens:,} training tokens; global batch {batch_rows} rows "
           f"({micro_batch} per micro-step x {cfg.gradient_accumulation_steps} accumulation x {info.world_size} ranks) "
           f"x {cfg.cutoff_len} = {tokens_per_step:,} tokens per step; "
           f"{num_steps} steps = {num_steps / steps_per_epoch:.2f} epochs of {windows:,} windows")
    if windows % batch_rows:
        print0(f"data: an epoch is not a whole number of steps ({steps_per_epoch:.2f}): the step that "
               f"crosses into the next epoch takes its last rows from it, newly shuffled")

    start_step = load_checkpoint(resume_dir, model, optimizer) if resume_dir else 0

    # --- logging (rank 0 writes) ---
    training_args = config_to_yaml(cfg)
    logger = MetricsLogger(cfg.output_dir, cfg.use_tensorboard, resume_step=start_step) if info.is_main else None
    token_bytes = torch.from_numpy(tokenizer.token_byte_lengths()).to(device)
    token_bytes = F.pad(token_bytes, (0, model_cfg.vocab_size - len(token_bytes)))
    peak_flops = peak_bf16_flops(torch.cuda.get_device_name()) if device.type == "cuda" else None
    progress = Progress(num_steps, training_flops_per_token(model_cfg, cfg.cutoff_len),
                        peak_flops * info.world_size if peak_flops else None)

    def log(step: int, scalars: dict) -> None:
        if logger is not None:
            logger.log(step, scalars)

    def save(step: int) -> None:
        check_model_finite(model, step, cfg.output_dir, device, compute_dtype)
        path = save_checkpoint(cfg.output_dir, step, model, optimizer, tokenizer, training_args,
                               cfg.save_total_limit, data_signature=data_signature)
        print0(f"saved {path}")

    # --- the loop ---
    model.train()
    for step in range(start_step + 1, num_steps + 1):
        t0 = time.time()
        lr = lr_at(step, num_steps, cfg.learning_rate, warmup_steps, cfg.lr_scheduler_type, cfg.min_lr_ratio)
        set_learning_rate(optimizer, lr)

        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.gradient_accumulation_steps):
            # Draw numbers over the whole run: step s takes draws (s-1)*batch_rows
            # onward, so a batch depends on (seed, step) only, not on the number of
            # ranks, and a resumed run draws the batches the uninterrupted run would
            # have drawn. Each rank takes its own slice.
            first = (step - 1) * batch_rows + (micro * info.world_size + info.rank) * micro_batch
            x, y = train_data.batch(cfg.seed, range(first, first + micro_batch), cfg.cutoff_len)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if info.sharded:  # reduce gradients across ranks only after the last micro-step
                model.set_requires_gradient_sync(micro == cfg.gradient_accumulation_steps - 1)
            with autocast(device, compute_dtype):
                loss = model(x, y)
            # FSDP averages gradients over ranks; dividing by the micro-steps makes
            # the gradient the mean over the whole global batch.
            (loss / cfg.gradient_accumulation_steps).backward()
            loss_sum += loss.detach()

        grad_norm = clip_gradients(model, cfg.max_grad_norm)
        step_loss = all_reduce_mean(loss_sum).item() / cfg.gradient_accumulation_steps
        check_finite(step, step_loss, grad_norm, cfg.output_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.add(time.time() - t0, tokens_per_step, **{"train/loss": step_loss})
        if progress.steps_done == 1 and info.sharded:
            print(f"rank {info.rank}: holds {local_bytes(model.parameters()) / 2**20:.2f} MiB of parameters and "
                  f"{optimizer_state_bytes(optimizer) / 2**20:.2f} MiB of optimizer state "
                  f"(of {model.num_parameters() * 4 / 2**20:.2f} MiB fp32 parameters in all)", flush=True)

        if step % cfg.logging_steps == 0 or step == num_steps:
            scalars, line = progress.report(step, lr, grad_norm)
            print0(line, flush=True)
            log(step, scalars)

        if val_data is not None and is_eval_step(step, num_steps, cfg.eval_steps):
            report_evaluation(step, num_steps, evaluate(model, val_data, cfg, token_bytes, info, compute_dtype), logger)

        if cfg.save_steps > 0 and step % cfg.save_steps == 0:
            save(step)

    check_model_finite(model, num_steps, cfg.output_dir, device, compute_dtype)
    save_model_dir(cfg.output_dir, model, tokenizer, training_args)
    if logger is not None:
        logger.close()
        if cfg.plot:
            plot_run(cfg.output_dir)  # output_dir/plots/*.png
    print0(f"done in {progress.elapsed()}; model directory: {cfg.output_dir}")


if __name__ == "__main__":
    run_cli(main)
