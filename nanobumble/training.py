"""Small pieces every training script's loop uses, so each script shows only
what is particular to its stage."""

from __future__ import annotations

import math
import os
import time

import torch

from .checkpoint import latest_checkpoint, list_checkpoints
from .common import UserError, format_duration
from .distributed import print0


def resolve_resume(resume: str, output_dir: str) -> str | None:
    """The checkpoint to continue from, or None for a fresh run. A fresh run
    never starts in a directory that already holds checkpoints."""
    if not resume:
        if list_checkpoints(output_dir):
            raise UserError(f"output_dir {output_dir} already holds checkpoints; continue it with --resume auto, "
                            f"or pick another --output_dir (nothing there is overwritten)")
        return None
    if resume == "auto":
        found = latest_checkpoint(output_dir)
        print0(f"resuming from {found}" if found else f"resume=auto: no checkpoint in {output_dir}, starting fresh")
        return found
    if not os.path.isfile(os.path.join(resume, "trainer_state.pt")):
        raise UserError(f"resume: {resume} is not a checkpoint directory (no trainer_state.pt)")
    print0(f"resuming from {resume}")
    return resume


def total_steps(max_steps: int, num_epochs: float, steps_per_epoch: float) -> int:
    return max_steps if max_steps > 0 else max(1, math.ceil(num_epochs * steps_per_epoch))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(model: torch.nn.Module, max_grad_norm: float) -> float:
    """Clip to max_grad_norm (<= 0: measure only); return the global norm over all
    ranks' shards, as the unsharded model would have it."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


def check_finite(step: int, loss: float, grad_norm: float, output_dir: str) -> None:
    """Stop before a NaN/inf update can reach the weights or a checkpoint."""
    if not math.isfinite(loss) or not math.isfinite(grad_norm):
        last = latest_checkpoint(output_dir)
        raise UserError(f"loss {loss} / grad norm {grad_norm} at step {step}: stopping before the "
                        f"update; the last good checkpoint is {last or 'none (nothing saved yet)'}")


class Progress:
    """Accumulates losses and timings between two log lines; formats the line
    (step/total, loss, lr, grad norm, tokens/s, MFU on a known GPU, ETA).
    flops_per_token and peak_flops (all ranks together) give MFU when both are set."""

    def __init__(self, total_steps: int, flops_per_token: float | None = None, peak_flops: float | None = None):
        self.total_steps = total_steps
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.run_start = time.time()
        self.steps_done = 0
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.seconds, self.tokens = 0, 0.0, 0

    def add(self, seconds: float, tokens: int, **values: float) -> None:
        """One optimizer step: its duration, tokens processed (all ranks) and values to average."""
        self.steps_done += 1
        self.steps += 1
        self.seconds += seconds
        self.tokens += tokens
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def report(self, step: int, lr: float, grad_norm: float, show: tuple[str, ...] | None = None) -> tuple[dict, str]:
        """Scalars to log (means since the last report) and the printed line, which
        shows the keys in `show` (default: all); starts a new window."""
        scalars = {key: total / self.steps for key, total in self.sums.items()}
        shown = " | ".join(f"{key.removeprefix('train/')} {scalars[key]:.4f}" for key in (show or scalars))
        tokens_per_sec = self.tokens / max(self.seconds, 1e-9)
        scalars.update({"train/lr": lr, "train/grad_norm": grad_norm, "train/tokens_per_sec": tokens_per_sec})
        line = f"step {step}/{self.total_steps} | {shown} | lr {lr:.2e} | grad norm {grad_norm:.3f} | {tokens_per_sec:,.0f} tok/s"
        if self.flops_per_token and self.peak_flops:
            scalars["train/mfu"] = self.flops_per_token * tokens_per_sec / self.peak_flops
            line += f" | mfu {100 * scalars['train/mfu']:.1f}%"
        eta = (time.time() - self.run_start) / self.steps_done * (self.total_steps - step)
        line += f" | eta {format_duration(eta)}"
        self._reset()
        return scalars, line

    def elapsed(self) -> str:
        return format_duration(time.time() - self.run_start)


def check_base_model_dir(path: str) -> None:
    """SFT and DPO start from a full model directory (what pretraining or SFT wrote)."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")) and \
            not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise UserError(f"{path} holds a LoRA adapter, not a full model: fold it into its base first with "
                        f"python -m nanobumble.merge_lora --base_model_path <base> --lora_model_path {path} "
                        f"--save_path <merged>")
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        if not os.path.isfile(os.path.join(path, name)):
            raise UserError(f"model_name_or_path {path}: no {name} (expected a model directory written by "
                            f"train_pretrain.py or train_sft.py)")


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
    from .model import load_model_config
    from .tokenizer import Tokenizer

    check_base_model_dir(cfg.model_name_or_path)
    tokenizer = Tokenizer(os.path.join(cfg.model_name_or_path, "tokenizer.model"))
    model_cfg = load_model_config(os.path.join(cfg.model_name_or_path, "config.json"))
    check_model_fits(model_cfg, tokenizer, cfg.cutoff_len)
    return tokenizer, model_cfg
