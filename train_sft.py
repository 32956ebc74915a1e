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

import numpy as np
import torch

from nanobumble.base.distributed import all_reduce_sum, print0
from nanobumble.base.errors import run_cli
from nanobumble.base.precision import autocast, precision_summary
from nanobumble.data.sft_data import SFTDataset
from nanobumble.model.layers import IGNORE_INDEX
from nanobumble.model.mfu import document_flops
from nanobumble.run.build import lora_settings, open_starting_model
from nanobumble.run.config import SFTConfig
from nanobumble.run.stage import Stage, run_stage, share_batches, tokenized_data


def main(argv: list[str]) -> None:
    run_stage(train, SFTConfig, argv)  # the config from argv, then train() on every rank


@torch.no_grad()
def evaluate(model, val_data: SFTDataset, cfg: SFTConfig, info, dtype) -> dict:
    """Validation loss: mean nats per assistant token over the first eval_rows
    held-out rows (the same rows every time). Ranks share the batches out."""
    model.eval()
    n = cfg.train_micro_batch_size_per_gpu
    rows = min(val_data.num_rows, cfg.eval_rows)
    batches = [range(first, min(first + n, rows)) for first in range(0, rows, n)]
    totals = torch.zeros(2, dtype=torch.float64, device=info.device)  # nats, trained tokens
    for i, weight in share_batches(len(batches), info):
        x, y, position_ids = (t.to(info.device) if t is not None else None
                              for t in val_data.batch(cfg.seed, batches[i]))
        with autocast(info.device, dtype):
            summed = model(x, y, position_ids=position_ids, reduction="sum")
        totals += weight * torch.stack([summed.double(), (y != IGNORE_INDEX).sum().double()])
    nats, tokens = all_reduce_sum(totals).tolist()
    model.train()
    return {"val/loss": nats / max(tokens, 1)}


def documents(dataset: SFTDataset, seed: int, rows) -> list[int]:
    """The real (non-padding) input tokens of each conversation in these rows: a
    padded row holds one conversation (its row before padding); a packed row holds
    several, each starting at position 0, and its padding tail is the last
    stretch when no target in it is trained (tokenize_sft drops a sample with no
    trained target, so every conversation has one)."""
    lengths = []
    for index in rows:
        x, y, positions = dataset.row(seed, index)
        if positions is None:
            lengths.append(len(x))
            continue
        bounds = list(np.flatnonzero(positions == 0)) + [len(x)]
        pieces = [(start, end) for start, end in zip(bounds[:-1], bounds[1:])]
        if pieces and (y[pieces[-1][0]:] == IGNORE_INDEX).all():
            pieces.pop()  # the padding tail
        lengths += [end - start for start, end in pieces]
    return lengths


def train(cfg: SFTConfig, info) -> None:
    stage = Stage(cfg, info)  # precision, seed, the config printed
    stage.open_output_dir()  # the checkpoint to resume, if any; may move a damaged one aside

    # --- the base model's shape and tokenizer ---
    tokenizer, model_cfg = open_starting_model(cfg)

    # --- conversations -> tokens + assistant masks (tokenized once, cached) -> rows ---
    dataset, val_data, data_sha256 = tokenized_data(
        cfg, tokenizer, info, "sft", lambda samples: SFTDataset(samples, cfg.cutoff_len, packing=cfg.packing,
                                                      vocab_size=model_cfg.vocab_size))

    # --- model: the base weights, plus adapters for LoRA ---
    model = stage.build_model(model_cfg, cfg.model_name_or_path, lora_settings(cfg))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"model: {cfg.model_name_or_path}, {model.num_parameters() / 1e6:.2f}M parameters, "
           f"{trainable / 1e6:.3f}M trainable ({cfg.finetuning_type}), {info.world_size} x {info.device.type}, "
           f"{precision_summary(info, stage.dtype)}")

    # --- schedule, then optimizer, resume and logger ---
    stage.plan(dataset.num_rows)
    print0(f"data: {dataset.num_rows} rows ({'packed' if cfg.packing else 'padded'}), "
           f"{dataset.num_target_tokens:,} trainable tokens; global batch {stage.batch_arithmetic} rows; "
           f"{stage.num_steps} steps")
    stage.start(model, tokenizer, data_sha256)

    # --- the loop ---
    device = info.device
    for step in stage.steps():
        # This rank's micro-batches: rows of an endless stream of shuffled epochs.
        micro_rows = stage.micro_batches(step)
        batches = [dataset.batch(cfg.seed, rows) for rows in micro_rows]
        # The loss contract: a step's loss is the sum over the global batch's trainable
        # tokens divided by their count, so every token weighs the same however the
        # tokens fall between ranks and micro-steps (rows differ in length).
        # Throughput counts real tokens (padding is not work done), MFU their FLOPs:
        # each conversation's, by its own length (mfu.py: document_flops).
        lengths = [t for rows in micro_rows for t in documents(dataset, cfg.seed, rows)]
        flops = document_flops(model_cfg, lengths, frozen_base=stage.lora, adapter_params=trainable * stage.lora)
        counts = torch.tensor([sum(int((y != IGNORE_INDEX).sum()) for _, y, _ in batches), sum(lengths),
                               sum(x.numel() for x, _, _ in batches), flops], dtype=torch.float64, device=device)
        global_tokens, real_tokens, padded_tokens, flops = all_reduce_sum(counts).tolist()

        loss_sum = torch.zeros((), device=device)
        for micro, (x, y, position_ids) in enumerate(batches):
            x, y = x.to(device), y.to(device)
            position_ids = position_ids.to(device) if position_ids is not None else None
            if info.sharded:
                model.set_requires_gradient_sync(micro == len(batches) - 1)
            with autocast(device, stage.autocast_dtype):
                summed = model(x, y, position_ids=position_ids, reduction="sum")
            # Each micro-step adds its sum / global_tokens. FSDP averages gradients over
            # the ranks (divides by world_size): multiplying by it turns that into the sum.
            (summed * info.world_size / global_tokens).backward()
            loss_sum += summed.detach()
        step_loss = all_reduce_sum(loss_sum).item() / global_tokens
        stage.update(step, int(real_tokens), {"train/loss": step_loss}, padded_tokens=int(padded_tokens), flops=flops)

        if (val_data is not None or stage.eval_tasks) and stage.is_eval_step(step):
            scalars = evaluate(model, val_data, cfg, info, stage.autocast_dtype) if val_data is not None else {}
            stage.report_evaluation(step, scalars | stage.task_scores())
        stage.save_if_due(step)

    stage.finish()


if __name__ == "__main__":
    run_cli(main)
