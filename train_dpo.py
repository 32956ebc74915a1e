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

from contextlib import nullcontext

import torch
import torch.nn as nn

from nanobumble.base.distributed import all_reduce_sum, print0
from nanobumble.base.errors import run_cli
from nanobumble.base.precision import autocast, precision_summary
from nanobumble.data.dpo_data import PreferenceDataset
from nanobumble.model.dpo import batch_logps, displacement_warning, dpo_batch_metrics, preference_loss, sft_nll
from nanobumble.model.layers import IGNORE_INDEX
from nanobumble.model.lora import disable_adapters
from nanobumble.model.mfu import document_flops
from nanobumble.run.build import lora_settings, open_starting_model
from nanobumble.run.config import DPOConfig
from nanobumble.run.stage import Stage, run_stage, share_batches, tokenized_data


def main(argv: list[str]) -> None:
    run_stage(train, DPOConfig, argv)  # the config from argv, then train() on every rank


@torch.no_grad()
def keep_frozen_in_compute_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """LoRA in one process under bf16 autocast: store the frozen weights and biases
    of the linear layers (projections, LM head) in bf16 once, instead of letting
    autocast round the fp32 copies to bf16 again on each of the three forwards of
    a micro-step (reference, policy, and the policy's recomputation under
    activation checkpointing). The values are the ones autocast used (the same
    rounding), so the losses are unchanged and the fp32 copies' memory is freed.
    The adapters stay fp32 for the optimizer; norms and the embedding stay fp32
    (autocast does not cast them: the residual stream stays fp32); a weight tied
    to the embedding is left alone. fp32 runs are untouched, and so are sharded
    runs, where FSDP's policy does the casting. Returns the number of tensors cast."""
    if dtype == torch.float32:
        return 0
    embedding = getattr(model, "embed_tokens", None)
    tied = embedding.weight if embedding is not None else None
    cast = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        for param in (module.weight, module.bias):
            if param is None or param.requires_grad or param is tied or param.dtype == dtype:
                continue
            param.data = param.data.to(dtype)
            cast += 1
    return cast


@torch.no_grad()
def precompute_reference(reference, dataset: PreferenceDataset, cfg: DPOConfig, info) -> torch.Tensor:
    """Reference log-probs of every pair, [num_pairs, 2] (chosen, rejected).
    Ranks share the batches out (share_batches)."""
    n = cfg.train_micro_batch_size_per_gpu
    groups = [list(range(i, min(i + n, dataset.num_pairs))) for i in range(0, dataset.num_pairs, n)]
    table = torch.zeros(dataset.num_pairs, 2, dtype=torch.float64, device=info.device)
    for i, weight in share_batches(len(groups), info):
        batch = dataset.batch_of_pairs(groups[i])
        ref = reference(batch["input_ids"].to(info.device), batch["labels"].to(info.device))
        if weight:
            k = len(batch["pair_ids"])
            table[batch["pair_ids"].to(info.device)] = torch.stack([ref[:k], ref[k:]], dim=1).double()
    return all_reduce_sum(table).float()


@torch.no_grad()
def evaluate(model, val_data: PreferenceDataset, val_reference: torch.Tensor, cfg: DPOConfig, info, dtype,
             ld_alpha: float | None) -> dict:
    """On the first eval_rows held-out pairs (the same ones every time): the losses
    training logs, defined alike (loss = preference_loss + sft_weight * nll_loss, the
    preference loss a mean over pairs and nll_loss over the chosen answers' tokens),
    reward accuracy and margins, the policy's log-probs, and the drift of each
    answer's mean log-prob per token from the reference's."""
    model.eval()
    n = cfg.train_micro_batch_size_per_gpu
    count = min(val_data.num_pairs, cfg.eval_rows)
    groups = [list(range(i, min(i + n, count))) for i in range(0, count, n)]
    sums: dict[str, torch.Tensor] = {}
    nll = torch.zeros(2, device=info.device)  # the chosen answers' NLL in nats, and their tokens
    for i, weight in share_batches(len(groups), info):
        batch = val_data.batch_of_pairs(groups[i])
        input_ids, labels = batch["input_ids"].to(info.device), batch["labels"].to(info.device)
        with autocast(info.device, dtype):
            policy, logps, mask, mean_logits = batch_logps(model, input_ids, labels, ld_alpha)
        ref = val_reference[batch["pair_ids"].to(info.device)]
        k, lengths = len(groups[i]), mask.sum(-1)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy[:k], policy[k:], ref[:, 0], ref[:, 1], cfg.pref_beta, cfg.pref_loss, cfg.label_smoothing,
            chosen_lengths=lengths[:k], rejected_lengths=lengths[k:])
        metrics = dpo_batch_metrics(losses, chosen_rewards, rejected_rewards, policy, mean_logits,
                                    reference_logps=torch.cat([ref[:, 0], ref[:, 1]]), lengths=lengths)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + weight * value
        tokens = mask[:k].sum()
        nll += weight * torch.stack([sft_nll(logps.float(), mask, k, num_tokens=1.0), tokens.float()])
    keys = sorted(sums)
    totals = all_reduce_sum(torch.stack([sums[k].float() for k in keys])) / count
    nats, tokens = all_reduce_sum(nll).tolist()
    model.train()
    scalars = {f"val/{key}": value for key, value in zip(keys, totals.tolist())}
    scalars["val/nll_loss"] = nats / max(tokens, 1.0)
    scalars["val/loss"] = scalars["val/preference_loss"] + cfg.sft_weight * scalars["val/nll_loss"]
    return scalars


def train(cfg: DPOConfig, info) -> None:
    stage = Stage(cfg, info)  # precision, seed, the config printed
    stage.open_output_dir()  # the checkpoint to resume, if any; may move a damaged one aside

    # --- the starting model's shape and tokenizer ---
    tokenizer, model_cfg = open_starting_model(cfg)

    # --- preference pairs -> prompt + chosen / rejected tokens (tokenized once, cached) ---
    dataset, val_data, data_sha256 = tokenized_data(
        cfg, tokenizer, info, "dpo", lambda pairs: PreferenceDataset(pairs, vocab_size=model_cfg.vocab_size))

    # --- policy, and the reference it is measured against ---
    lora = lora_settings(cfg)
    model = stage.build_model(model_cfg, cfg.model_name_or_path, lora)
    reference_model = None if lora else stage.build_model(model_cfg, cfg.model_name_or_path, frozen=True)
    if lora:  # the reference (adapters off) then reads the same bf16 weights autocast would have made
        keep_frozen_in_compute_dtype(model, stage.autocast_dtype)  # autocast_dtype is fp32 when sharded
    ld_alpha = cfg.ld_alpha if cfg.ld_alpha != 1.0 else None
    device, autocast_dtype = info.device, stage.autocast_dtype

    @torch.no_grad()
    def reference(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sequence log-probs under the reference: the adapters off, or the frozen copy."""
        net = reference_model if reference_model is not None else model
        with disable_adapters(model) if reference_model is None else nullcontext(), autocast(device, autocast_dtype):
            return batch_logps(net, input_ids, labels, ld_alpha)[0]

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"model: {cfg.model_name_or_path}, {model.num_parameters() / 1e6:.2f}M parameters, "
           f"{trainable / 1e6:.3f}M trainable ({cfg.finetuning_type}); reference: "
           f"{'the same weights, adapters off' if lora else 'a frozen copy'}; loss {cfg.pref_loss}, "
           f"beta {cfg.pref_beta}; "
           f"{info.world_size} x {device.type}, {precision_summary(info, stage.dtype)}")

    val_reference = precompute_reference(reference, val_data, cfg, info) if val_data is not None else None
    reference_table = None
    if cfg.precompute_ref_log_probs:
        reference_table = precompute_reference(reference, dataset, cfg, info)
        reference_model = None  # no longer needed: free it
        print0(f"reference log-probs precomputed for {dataset.num_pairs} pairs")

    # --- schedule, then optimizer, resume and logger ---
    stage.plan(dataset.num_pairs)
    pairs_per_step, micro_batch = stage.batch_rows, stage.micro_batch
    print0(f"data: {dataset.num_pairs} pairs; global batch {stage.batch_arithmetic} pairs; "
           f"{stage.num_steps} steps")
    stage.start(model, tokenizer, data_sha256)

    # --- the loop ---
    for step in stage.steps():
        batches = [dataset.batch(cfg.seed, rows) for rows in stage.micro_batches(step)]
        # The SFT term is a mean over the chosen answers' tokens of the whole global batch.
        chosen_tokens = sum(int((b["labels"][:micro_batch] != IGNORE_INDEX).sum()) for b in batches)
        # Throughput counts real tokens (prompt + answer of each row, not padding), MFU
        # their FLOPs, each row by its own length (mfu.py: document_flops): the policy's
        # forward and backward, plus the reference's forward unless precomputed.
        lengths = [len(dataset.pairs[p]["prompt_ids"]) + len(dataset.pairs[p][key]) - 1
                   for b in batches for key in ("chosen_ids", "rejected_ids") for p in b["pair_ids"].tolist()]
        flops = document_flops(model_cfg, lengths, frozen_base=bool(lora), adapter_params=trainable * bool(lora))
        if reference_table is None:
            flops += document_flops(model_cfg, lengths, backward=False)
        counts = torch.tensor([chosen_tokens, sum(lengths), sum(b["input_ids"].numel() for b in batches), flops],
                              dtype=torch.float64, device=device)
        chosen_tokens, real_tokens, padded_tokens, flops = all_reduce_sum(counts).tolist()

        sums: dict[str, torch.Tensor] = {}
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
            with autocast(device, autocast_dtype):
                policy, logps, mask, mean_logits = batch_logps(model, input_ids, labels, ld_alpha)
            losses, chosen_rewards, rejected_rewards = preference_loss(
                policy[:micro_batch], policy[micro_batch:], ref_chosen, ref_rejected,
                cfg.pref_beta, cfg.pref_loss, cfg.label_smoothing,
                chosen_lengths=mask[:micro_batch].sum(-1), rejected_lengths=mask[micro_batch:].sum(-1))
            # Means over the global batch: pairs, and chosen tokens for the SFT term.
            # FSDP averages gradients over ranks, hence the factor world_size.
            objective = losses.sum() / pairs_per_step
            nll = sft_nll(logps, mask, micro_batch, chosen_tokens)  # logged whatever the weight (TRL's nll_loss)
            if cfg.sft_weight > 0:
                objective = objective + cfg.sft_weight * nll
            (objective * info.world_size).backward()
            metrics = dpo_batch_metrics(losses, chosen_rewards, rejected_rewards, policy.detach(), mean_logits,
                                        reference_logps=torch.cat([ref_chosen, ref_rejected]), lengths=mask.sum(-1))
            # scaled as the sums of pairs are: divided by pairs_per_step below, they give the step's values
            metrics["objective"] = objective.detach() * pairs_per_step
            metrics["nll_loss"] = nll.detach() * pairs_per_step
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.detach()

        keys = sorted(sums)
        totals = all_reduce_sum(torch.stack([sums[k].float() for k in keys])) / pairs_per_step
        step_metrics = dict(zip(keys, totals.tolist()))
        # TRL's names: loss is what is optimised (preference_loss + sft_weight * nll_loss), each part beside it
        step_metrics["train/loss"] = step_metrics.pop("objective")
        for part in ("preference_loss", "nll_loss"):
            step_metrics[f"train/{part}"] = step_metrics.pop(part)
        stage.update(step, int(real_tokens), step_metrics, show=("train/loss", "rewards/accuracies", "rewards/margins"),
                     padded_tokens=int(padded_tokens), flops=flops)

        if (val_data is not None or stage.eval_tasks) and stage.is_eval_step(step):
            scalars = {}
            if val_data is not None:
                scalars = evaluate(model, val_data, val_reference, cfg, info, autocast_dtype, ld_alpha)
            stage.report_evaluation(step, scalars | stage.task_scores())
            warning = displacement_warning(scalars["val/drift/chosen"], cfg) if val_data is not None else None
            if warning:
                print0(warning, flush=True)
        stage.save_if_due(step)

    stage.finish()


if __name__ == "__main__":
    run_cli(main)
