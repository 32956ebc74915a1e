"""Stage 2: supervised fine-tuning on conversations, all weights or LoRA adapters.

    python train_sft.py                      # fine-tune the no-argument train_pretrain.py output, CPU
    python train_sft.py --yaml_config configs/sft/sft_full.yaml \
        --model_name_or_path ./checkpoints/pretrain/bumblebee_1.5b_base \
        --dataset_path <your dataset path> --output_dir ./checkpoints/sft/bumblebee_1.5b_Instruct_full

The loss is only on what the assistant says: every conversation is rendered
with the ChatML template and each token carries a mask that is true on
assistant content and its closing <|im_end|>. Top to bottom: config -> base
model directory -> conversations -> tokens and masks (a held-out share for
validation) -> model (+ LoRA) -> optimizer -> resume -> loop (with validation
loss at eval_steps) -> final model (or adapter) directory.
"""

from __future__ import annotations

import time

import torch

from nanobumble.checkpoint import load_checkpoint, save_checkpoint, save_model_dir
from nanobumble.common import UserError, autocast, resolve_precision, run_cli
from nanobumble.config import SFTConfig, config_to_yaml, parse_config
from nanobumble.data import files_signature
from nanobumble.distributed import (all_reduce_sum, autocast_dtype, build_model, distributed_run, main_process_first,
                                    precision_summary, print0)
from nanobumble.evaluate import evaluate_tasks, load_tasks
from nanobumble.lora import adapter_config_for
from nanobumble.metrics import MetricsLogger
from nanobumble.optim import build_optimizer, lr_at
from nanobumble.plot import plot_run
from nanobumble.sft_data import SFTDataset
from nanobumble.training import (Progress, check_finite, check_model_finite, clip_gradients, lora_settings,
                                is_eval_step, open_starting_model, rank_batches,
                                report_evaluation, resolve_resume, set_learning_rate, tokenized_data, total_steps)


@torch.no_grad()
def evaluate(model, val_data: SFTDataset, cfg: SFTConfig, info, dtype) -> dict:
    """Validation loss: mean nats per assistant token over up to eval_batches batches
    of held-out rows (the same rows every time). Ranks share the batches out."""
    model.eval()
    n = cfg.train_micro_batch_size_per_gpu
    rows = min(val_data.num_rows, n * cfg.eval_batches)
    batches = [range(first, min(first + n, rows)) for first in range(0, rows, n)]
    totals = torch.zeros(2, dtype=torch.float64, device=info.device)  # nats, trained tokens
    for i, weight in rank_batches(len(batches), info):
        x, y, position_ids = (t.to(info.device) if t is not None else None
                              for t in val_data.batch(cfg.seed, batches[i]))
        with autocast(info.device, dtype):
            summed = model(x, y, position_ids=position_ids, reduction="sum")
        totals += weight * torch.stack([summed.double(), (y != -100).sum().double()])
    nats, tokens = all_reduce_sum(totals).tolist()
    model.train()
    return {"val/loss": nats / max(tokens, 1)}


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, SFTConfig)
    with distributed_run(cfg.collective_timeout_minutes) as info:
        train(cfg, info)


def train(cfg: SFTConfig, info) -> None:
    device = info.device
    dtype = resolve_precision(cfg.train_model_precision, device)
    torch.manual_seed(cfg.seed)
    print0(f"config:\n{config_to_yaml(cfg)}")
    resume_dir = main_process_first(lambda: resolve_resume(cfg, info.world_size))

    # --- the base model's shape and tokenizer ---
    tokenizer, model_cfg = open_starting_model(cfg)

    # --- conversations -> tokens + assistant masks (tokenized once, cached) -> rows ---
    samples, val_samples = tokenized_data(cfg, tokenizer, info, "sft")
    if not samples:
        raise UserError(f"{cfg.dataset_path}: no conversation has a trainable token left")
    dataset = SFTDataset(samples, cfg.cutoff_len, packing=cfg.packing)
    val_data = SFTDataset(val_samples, cfg.cutoff_len, packing=cfg.packing) if val_samples else None
    eval_tasks = load_tasks(cfg.eval_tasks, cfg.eval_num_fewshot) if cfg.eval_tasks else None  # read and checked now
    data_signature = files_signature(cfg.dataset_path)  # recorded in checkpoints: resume checks it

    # --- model: the base weights, plus adapters for LoRA ---
    lora = lora_settings(cfg)
    model = build_model(model_cfg, info, cfg.seed, cfg.model_name_or_path,
                        dtype, cfg.enable_gradient_checkpointing, cfg.compile, lora)
    model.kernels = cfg.kernels
    compute_dtype = autocast_dtype(info, dtype)  # sharded: FSDP's policy casts the weights instead
    adapter_config = adapter_config_for(model, cfg.model_name_or_path) if lora else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"model: {cfg.model_name_or_path}, {model.num_parameters() / 1e6:.2f}M parameters, "
           f"{trainable / 1e6:.3f}M trainable ({cfg.finetuning_type}), {info.world_size} x {device.type}, "
           f"{precision_summary(info, dtype)}")

    # --- optimizer and schedule ---
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))
    micro_batch = cfg.train_micro_batch_size_per_gpu
    rows_per_step = micro_batch * cfg.gradient_accumulation_steps * info.world_size
    num_steps = total_steps(cfg.max_steps, cfg.num_epochs, dataset.num_rows / rows_per_step)
    warmup_steps = int(cfg.warmup_ratio * num_steps)
    print0(f"data: {dataset.num_rows} rows ({'packed' if cfg.packing else 'padded'}), "
           f"{dataset.num_target_tokens:,} trainable tokens; {rows_per_step} rows per step; {num_steps} steps")

    start_step = load_checkpoint(resume_dir, model, optimizer) if resume_dir else 0

    training_args = config_to_yaml(cfg)
    logger = MetricsLogger(cfg.output_dir, cfg.use_tensorboard, resume_step=start_step) if info.is_main else None
    progress = Progress(num_steps)

    # --- the loop ---
    model.train()
    for step in range(start_step + 1, num_steps + 1):
        t0 = time.time()
        lr = lr_at(step, num_steps, cfg.learning_rate, warmup_steps, cfg.lr_scheduler_type, cfg.min_lr_ratio)
        set_learning_rate(optimizer, lr)

        # This rank's micro-batches. Row indices run over an endless stream of
        # shuffled epochs; the step's rows are split between ranks and micro-steps.
        batches = []
        for micro in range(cfg.gradient_accumulation_steps):
            first = (step - 1) * rows_per_step + (micro * info.world_size + info.rank) * micro_batch
            batches.append(dataset.batch(cfg.seed, range(first, first + micro_batch)))
        # Every trainable token of the global batch weighs the same, however the
        # tokens fall between ranks and micro-steps: divide by the global count.
        local_tokens = sum(int((y != -100).sum()) for _, y, _ in batches)
        global_tokens = all_reduce_sum(torch.tensor(float(local_tokens), device=device)).item()

        loss_sum = torch.zeros((), device=device)
        tokens = 0
        for micro, (x, y, position_ids) in enumerate(batches):
            x, y = x.to(device), y.to(device)
            position_ids = position_ids.to(device) if position_ids is not None else None
            if info.sharded:
                model.set_requires_gradient_sync(micro == len(batches) - 1)
            with autocast(device, compute_dtype):
                summed = model(x, y, position_ids=position_ids, reduction="sum")
            # FSDP averages gradients over ranks, so scale by world_size to get a sum.
            (summed * info.world_size / global_tokens).backward()
            loss_sum += summed.detach()
            tokens += x.numel()

        grad_norm = clip_gradients(model, cfg.max_grad_norm)
        step_loss = all_reduce_sum(loss_sum).item() / global_tokens
        check_finite(step, step_loss, grad_norm, cfg.output_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.add(time.time() - t0, tokens * info.world_size, **{"train/loss": step_loss})

        if step % cfg.logging_steps == 0 or step == num_steps:
            scalars, line = progress.report(step, lr, grad_norm)
            print0(line, flush=True)
            if logger is not None:
                logger.log(step, scalars)
        if (val_data is not None or eval_tasks) and is_eval_step(step, num_steps, cfg.eval_steps):
            scalars = evaluate(model, val_data, cfg, info, compute_dtype) if val_data is not None else {}
            if eval_tasks:  # benchmark task files (eval_tasks)
                scalars.update(evaluate_tasks(model, tokenizer, eval_tasks, device, compute_dtype, micro_batch,
                                              system_prompt=cfg.system_prompt))
            report_evaluation(step, num_steps, scalars, logger)
        if cfg.save_steps > 0 and step % cfg.save_steps == 0:
            check_model_finite(model, step, cfg.output_dir, device, compute_dtype)
            path = save_checkpoint(cfg.output_dir, step, model, optimizer, tokenizer, training_args,
                                   cfg.save_total_limit, adapter_config, data_signature=data_signature)
            print0(f"saved {path}")

    check_model_finite(model, num_steps, cfg.output_dir, device, compute_dtype)
    save_model_dir(cfg.output_dir, model, tokenizer, training_args, adapter_config)
    if logger is not None:
        logger.close()
        if cfg.plot:
            plot_run(cfg.output_dir)  # output_dir/plots/*.png
    what = "adapter" if lora else "model"
    print0(f"done in {progress.elapsed()}; {what} directory: {cfg.output_dir}")


if __name__ == "__main__":
    run_cli(main)
