"""Stage 3: preference optimisation (DPO and its variants), LoRA or full.

    python train_dpo.py                      # align the no-argument train_sft.py output, CPU
    python train_dpo.py --yaml_config configs/dpo/dpo_lora.yaml \
        --model_name_or_path ./checkpoints/sft/bumblebee_1.5b_Instruct_full \
        --dataset_path <your dataset path> --output_dir ./checkpoints/dpo/bumblebee_1.5b_dpo_lora
    python -m nanobumble.merge_lora --base_model_path <sft model> \
        --lora_model_path ./checkpoints/dpo/bumblebee_1.5b_dpo_lora --save_path <merged>

Each pair is a prompt with a chosen and a rejected answer. The policy learns to
raise the chosen answer's log-probability relative to a frozen reference (the
starting model) more than the rejected one's. With LoRA the reference is the
same model with its adapters switched off, so no second copy of the weights
exists; with full fine-tuning it is a frozen copy, sharded like the policy.
Held-out pairs show at eval_steps whether the chosen answers stay likely (DPO
can widen the gap by pushing both answers down: see displacement_warning).
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from nanobumble.checkpoint import load_checkpoint, save_checkpoint, save_model_dir
from nanobumble.common import UserError, autocast, resolve_precision, run_cli
from nanobumble.config import DPOConfig, config_to_yaml, parse_config
from nanobumble.data import files_signature
from nanobumble.distributed import (all_reduce_sum, autocast_dtype, build_model, distributed_run, main_process_first,
                                    precision_summary, print0)
from nanobumble.dpo import batch_logps, displacement_warning, dpo_batch_metrics, preference_loss
from nanobumble.dpo_data import PreferenceDataset
from nanobumble.evaluate import evaluate_tasks, load_tasks
from nanobumble.lora import adapter_config_for, disable_adapters
from nanobumble.metrics import MetricsLogger
from nanobumble.optim import build_optimizer, lr_at
from nanobumble.plot import plot_run
from nanobumble.training import (Progress, check_finite, check_model_finite, clip_gradients, lora_settings,
                                is_eval_step, open_starting_model, rank_batches,
                                report_evaluation, resolve_resume, set_learning_rate, tokenized_data, total_steps)


@torch.no_grad()
def precompute_reference(reference, dataset: PreferenceDataset, cfg: DPOConfig, info) -> torch.Tensor:
    """Reference log-probs of every pair, [num_pairs, 2] (chosen, rejected).
    Ranks share the batches out (rank_batches)."""
    n = cfg.train_micro_batch_size_per_gpu
    groups = [list(range(i, min(i + n, dataset.num_pairs))) for i in range(0, dataset.num_pairs, n)]
    table = torch.zeros(dataset.num_pairs, 2, dtype=torch.float64, device=info.device)
    for i, weight in rank_batches(len(groups), info):
        batch = dataset.batch_of_pairs(groups[i])
        ref = reference(batch["input_ids"].to(info.device), batch["labels"].to(info.device))
        if weight:
            k = len(batch["pair_ids"])
            table[batch["pair_ids"].to(info.device)] = torch.stack([ref[:k], ref[k:]], dim=1).double()
    return all_reduce_sum(table).float()


@torch.no_grad()
def evaluate(model, val_data: PreferenceDataset, val_reference: torch.Tensor, cfg: DPOConfig, info, dtype,
             ld_alpha: float | None) -> dict:
    """On held-out pairs (up to eval_batches batches, the same ones every time): the
    preference loss, reward accuracy and margins, the policy's log-probs, and the
    drift of each answer's mean log-prob per token from the reference's."""
    model.eval()
    n = cfg.train_micro_batch_size_per_gpu
    count = min(val_data.num_pairs, n * cfg.eval_batches)
    groups = [list(range(i, min(i + n, count))) for i in range(0, count, n)]
    sums: dict[str, torch.Tensor] = {}
    for i, weight in rank_batches(len(groups), info):
        batch = val_data.batch_of_pairs(groups[i])
        input_ids, labels = batch["input_ids"].to(info.device), batch["labels"].to(info.device)
        with autocast(info.device, dtype):
            policy, _, mask, mean_logits = batch_logps(model, input_ids, labels, ld_alpha)
        ref = val_reference[batch["pair_ids"].to(info.device)]
        k, lengths = len(groups[i]), mask.sum(-1)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy[:k], policy[k:], ref[:, 0], ref[:, 1], cfg.pref_beta, cfg.pref_loss, cfg.label_smoothing,
            chosen_lengths=lengths[:k], rejected_lengths=lengths[k:])
        metrics = dpo_batch_metrics(losses, chosen_rewards, rejected_rewards, policy, mean_logits,
                                    reference_logps=torch.cat([ref[:, 0], ref[:, 1]]), lengths=lengths)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + weight * value
    keys = sorted(sums)
    totals = all_reduce_sum(torch.stack([sums[k].float() for k in keys])) / count
    model.train()
    return {f"val/{key}": value for key, value in zip(keys, totals.tolist())}


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, DPOConfig)
    with distributed_run(cfg.collective_timeout_minutes) as info:
        train(cfg, info)


def train(cfg: DPOConfig, info) -> None:
    device = info.device
    dtype = resolve_precision(cfg.train_model_precision, device)
    torch.manual_seed(cfg.seed)
    print0(f"config:\n{config_to_yaml(cfg)}")
    resume_dir = main_process_first(lambda: resolve_resume(cfg, info.world_size))

    # --- the starting model's shape and tokenizer ---
    tokenizer, model_cfg = open_starting_model(cfg)

    # --- preference pairs -> prompt + chosen / rejected tokens (tokenized once, cached) ---
    pairs, val_pairs = tokenized_data(cfg, tokenizer, info, "dpo")
    if not pairs:
        raise UserError(f"{cfg.dataset_path}: no usable preference pair left")
    dataset = PreferenceDataset(pairs)
    val_data = PreferenceDataset(val_pairs) if val_pairs else None
    eval_tasks = load_tasks(cfg.eval_tasks, cfg.eval_num_fewshot) if cfg.eval_tasks else None  # read and checked now
    data_signature = files_signature(cfg.dataset_path)  # recorded in checkpoints: resume checks it

    # --- policy, and the reference it is measured against ---
    weights = cfg.model_name_or_path
    lora = lora_settings(cfg)
    model = build_model(model_cfg, info, cfg.seed, weights, dtype, cfg.enable_gradient_checkpointing,
                        cfg.compile, lora)
    model.kernels = cfg.kernels
    compute_dtype = autocast_dtype(info, dtype)  # sharded: FSDP's policy casts the weights instead
    adapter_config = adapter_config_for(model, cfg.model_name_or_path) if lora else None
    ld_alpha = cfg.ld_alpha if cfg.ld_alpha != 1.0 else None
    reference_model = None
    if not lora:
        reference_model = build_model(model_cfg, info, cfg.seed, weights, dtype)
        reference_model.requires_grad_(False)
        reference_model.eval()
        reference_model.kernels = cfg.kernels

    @torch.no_grad()
    def reference(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sequence log-probs under the reference: the adapters off, or the frozen copy."""
        net = reference_model if reference_model is not None else model
        with disable_adapters(model) if reference_model is None else nullcontext(), autocast(device, compute_dtype):
            return batch_logps(net, input_ids, labels, ld_alpha)[0]

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"model: {cfg.model_name_or_path}, {model.num_parameters() / 1e6:.2f}M parameters, "
           f"{trainable / 1e6:.3f}M trainable ({cfg.finetuning_type}); reference: "
           f"{'the same weights, adapters off' if lora else 'a frozen copy'}; loss {cfg.pref_loss}, beta {cfg.pref_beta}; "
           f"{info.world_size} x {device.type}, {precision_summary(info, dtype)}")

    val_reference = precompute_reference(reference, val_data, cfg, info) if val_data is not None else None
    reference_table = None
    if cfg.precompute_ref_log_probs:
        reference_table = precompute_reference(reference, dataset, cfg, info)
        reference_model = None  # no longer needed: free it
        print0(f"reference log-probs precomputed for {dataset.num_pairs} pairs")

    # --- optimizer and schedule ---
    optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))
    micro_batch = cfg.train_micro_batch_size_per_gpu
    pairs_per_step = micro_batch * cfg.gradient_accumulation_steps * info.world_size
    num_steps = total_steps(cfg.max_steps, cfg.num_epochs, dataset.num_pairs / pairs_per_step)
    warmup_steps = int(cfg.warmup_ratio * num_steps)
    print0(f"data: {dataset.num_pairs} pairs; {pairs_per_step} pairs per step; {num_steps} steps")

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

        batches = []
        for micro in range(cfg.gradient_accumulation_steps):
            first = (step - 1) * pairs_per_step + (micro * info.world_size + info.rank) * micro_batch
            batches.append(dataset.batch(cfg.seed, range(first, first + micro_batch)))
        # The SFT term is a mean over the chosen answers' tokens of the whole global batch.
        chosen_tokens = sum(int((b["labels"][:micro_batch] != -100).sum()) for b in batches)
        chosen_tokens = all_reduce_sum(torch.tensor(float(chosen_tokens), device=device)).item()

        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for micro, batch in enumerate(batches):
            input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            if reference_table is not None:
                ref = reference_table[batch["pair_ids"].to(device)]
                ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
            else:
                ref = reference(input_ids, labels)
                ref_chosen, ref_rejected = ref[:micro_batch], ref[micro_batch:]
            if info.sharded:
                model.set_requires_gradient_sync(micro == len(batches) - 1)
            with autocast(device, compute_dtype):
                policy, logps, mask, mean_logits = batch_logps(model, input_ids, labels, ld_alpha)
            losses, chosen_rewards, rejected_rewards = preference_loss(
                policy[:micro_batch], policy[micro_batch:], ref_chosen, ref_rejected,
                cfg.pref_beta, cfg.pref_loss, cfg.label_smoothing,
                chosen_lengths=mask[:micro_batch].sum(-1), rejected_lengths=mask[micro_batch:].sum(-1))
            # Means over the global batch: pairs, and chosen tokens for the SFT term.
            # FSDP averages gradients over ranks, hence the factor world_size.
            objective = losses.sum() / pairs_per_step
            if cfg.sft_weight > 0:
                chosen_nll = -(logps[:micro_batch] * mask[:micro_batch]).sum()
                objective = objective + cfg.sft_weight * chosen_nll / chosen_tokens
            (objective * info.world_size).backward()
            metrics = dpo_batch_metrics(losses, chosen_rewards, rejected_rewards, policy.detach(), mean_logits,
                                        reference_logps=torch.cat([ref_chosen, ref_rejected]), lengths=mask.sum(-1))
            metrics["objective"] = objective.detach() * pairs_per_step
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.detach()
            tokens += input_ids.numel()

        grad_norm = clip_gradients(model, cfg.max_grad_norm)
        keys = sorted(sums)
        totals = all_reduce_sum(torch.stack([sums[k].float() for k in keys])) / pairs_per_step
        step_metrics = dict(zip(keys, totals.tolist()))
        step_metrics["train/loss"] = step_metrics.pop("objective")  # what is optimised, incl. the SFT term
        step_metrics.pop("loss")
        check_finite(step, step_metrics["train/loss"], grad_norm, cfg.output_dir)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.add(time.time() - t0, tokens * info.world_size, **step_metrics)

        if step % cfg.logging_steps == 0 or step == num_steps:
            scalars, line = progress.report(step, lr, grad_norm,
                                            show=("train/loss", "rewards/accuracies", "rewards/margins"))
            print0(line, flush=True)
            if logger is not None:
                logger.log(step, scalars)
        if (val_data is not None or eval_tasks) and is_eval_step(step, num_steps, cfg.eval_steps):
            scalars = {}
            if val_data is not None:
                scalars = evaluate(model, val_data, val_reference, cfg, info, compute_dtype, ld_alpha)
            if eval_tasks:  # benchmark task files (eval_tasks)
                scalars.update(evaluate_tasks(model, tokenizer, eval_tasks, device, compute_dtype, micro_batch,
                                              system_prompt=cfg.system_prompt))
            report_evaluation(step, num_steps, scalars, logger)
            warning = displacement_warning(scalars["val/drift/chosen"], cfg) if val_data is not None else None
            if warning:
                print0(warning, flush=True)
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
