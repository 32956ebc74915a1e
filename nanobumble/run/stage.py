"""The skeleton every training stage shares, so each script shows only what is
particular to its stage: its data, its model, and its forward and backward pass.

    stage = Stage(cfg, info)                      # precision, seed, the config, where to resume
    model = stage.build_model(model_cfg, weights)
    stage.plan(examples_per_epoch)                # global batch and number of steps
    stage.start(model, tokenizer)                 # optimizer, resume, logger, eval task files
    for step in stage.steps():                    # sets the learning rate
        for rows in stage.rank_rows(step): ...    # this rank's rows of each micro-step
        ... forward and backward ...
        stage.update(step, tokens, metrics)       # clip, finite check, optimizer step, log line
        if stage.is_eval_step(step): stage.report_evaluation(step, evaluate(...))
        stage.save_if_due(step)
    stage.finish()                                # the final model (or adapter) directory, plots

Stage holds the run's state and does its bookkeeping; it is not a Trainer: the
loop, the batches and the loss stay in each script, in plain sight.

Below it: resuming (which checkpoint, and whether the settings allow it), the
checks that keep NaN out of a checkpoint, the held-out split of SFT / DPO
data, and the progress line.
"""

from __future__ import annotations

import math
import os
import shutil
import time

import torch
import yaml

from nanobumble.base.distributed import all_reduce_sum, distributed_run, main_process_first, print0
from nanobumble.base.errors import UserError
from nanobumble.base.precision import autocast, autocast_dtype, resolve_precision
from nanobumble.data.records import files_signature, split_held_out
from nanobumble.data.token_cache import tokenized_pairs, tokenized_sft
from nanobumble.evals.tasks import evaluate_tasks, load_tasks
from nanobumble.model.mfu import device_peak_flops
from nanobumble.run.build import build_model
from nanobumble.run.config import config_to_dict, config_to_yaml, parse_config
from nanobumble.run.metrics import MetricsLogger
from nanobumble.run.optim import build_optimizer, lr_at
from nanobumble.run.plots import plot_run
from nanobumble.store.adapter import adapter_config_for
from nanobumble.store.checkpoint import (
    checkpoint_problem,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from nanobumble.store.model_dir import check_output_dir, save_model_dir


def run_stage(train, config_class, argv: list[str]) -> None:
    """A training script's main(): its config (dataclass defaults < YAML < command
    line), then train(cfg, info) in the process group torchrun set up (or alone)."""
    cfg = parse_config(argv, config_class)
    with distributed_run(cfg.collective_timeout_minutes) as info:
        train(cfg, info)


class Stage:
    """One training run of any stage: the calls of the module docstring, in that order."""

    def __init__(self, cfg, info):
        self.cfg, self.info, self.device = cfg, info, info.device
        self.dtype = resolve_precision(cfg.train_model_precision, info.device)
        self.compute_dtype = autocast_dtype(info, self.dtype)  # sharded: FSDP's policy casts the weights instead
        self.lora = getattr(cfg, "finetuning_type", "full") == "lora"
        torch.manual_seed(cfg.seed)
        print0(f"config:\n{config_to_yaml(cfg)}")
        self.resume_dir = main_process_first(lambda: resolve_resume(cfg, info.world_size))

    def build_model(self, model_cfg, weights_from: str | None, lora: dict | None = None, frozen: bool = False):
        """The model to train (with LoRA adapters if `lora`), or with frozen=True a
        copy that is not trained (DPO's reference): no gradients, no dropout."""
        cfg = self.cfg
        if frozen:
            model = build_model(model_cfg, self.info, cfg.seed, weights_from, self.dtype, kernels=cfg.kernels)
            model.requires_grad_(False)
            model.eval()
            return model
        return build_model(model_cfg, self.info, cfg.seed, weights_from, self.dtype, cfg.enable_gradient_checkpointing,
                           cfg.compile, lora, cfg.kernels)

    def plan(self, examples_per_epoch: int) -> None:
        """The global batch (rows or pairs per optimizer step, all ranks together) and
        the number of steps: max_steps, or num_epochs over examples_per_epoch."""
        cfg = self.cfg
        self.micro_batch = cfg.train_micro_batch_size_per_gpu
        self.batch_rows = self.micro_batch * cfg.gradient_accumulation_steps * self.info.world_size
        self.steps_per_epoch = examples_per_epoch / self.batch_rows
        self.num_steps = total_steps(cfg.max_steps, cfg.num_epochs, self.steps_per_epoch)
        self.warmup_steps = int(cfg.warmup_ratio * self.num_steps)

    def start(self, model, tokenizer, flops_per_token: float | None = None) -> None:
        """Optimizer, the checkpoint to resume from, logger and progress line (with MFU
        when flops_per_token is given on a known GPU), and the eval_tasks files, read
        and checked now, before the first step."""
        cfg, info = self.cfg, self.info
        self.model, self.tokenizer = model, tokenizer
        self.adapter_config = adapter_config_for(model, cfg.model_name_or_path) if self.lora else None
        self.data_signature = files_signature(cfg.dataset_path)  # recorded in checkpoints: resume checks it
        self.eval_tasks = load_tasks(cfg.eval_tasks, cfg.eval_num_fewshot) if getattr(cfg, "eval_tasks", "") else None
        self.optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))
        self.start_step = load_checkpoint(self.resume_dir, model, self.optimizer) if self.resume_dir else 0
        self.training_args = config_to_yaml(cfg)
        self.logger = MetricsLogger(cfg.output_dir, cfg.use_tensorboard, resume_step=self.start_step) \
            if info.is_main else None
        peak_flops = device_peak_flops(self.device) if flops_per_token else None
        self.progress = Progress(self.num_steps, flops_per_token, peak_flops * info.world_size if peak_flops else None)

    def steps(self):
        """The step numbers still to run; each starts the step's clock and sets its learning rate."""
        cfg = self.cfg
        self.model.train()
        for step in range(self.start_step + 1, self.num_steps + 1):
            self.step_started = time.time()
            self.lr = lr_at(step, self.num_steps, cfg.learning_rate, self.warmup_steps, cfg.lr_scheduler_type,
                            cfg.min_lr_ratio)
            set_learning_rate(self.optimizer, self.lr)
            yield step

    def rank_rows(self, step: int) -> list[range]:
        """This rank's row (or pair) numbers for each micro-step of `step`.

        Row numbers run over the whole run: step s takes rows (s-1)*batch_rows
        onward, so a batch depends on (seed, step) only, not on the number of
        ranks, and a resumed run draws the batches the uninterrupted run would
        have drawn. Each rank takes its own slice of each micro-step."""
        world, n = self.info.world_size, self.micro_batch
        first = (step - 1) * self.batch_rows + self.info.rank * n
        return [range(first + micro * world * n, first + micro * world * n + n)
                for micro in range(self.cfg.gradient_accumulation_steps)]

    def update(self, step: int, tokens: int, metrics: dict, show: tuple[str, ...] | None = None) -> None:
        """After the backward passes: clip, stop on a non-finite loss or gradient, step
        the optimizer; count the step's tokens (all ranks) and metrics (means over the
        global batch, "train/loss" among them) and print the log line when due."""
        grad_norm = clip_gradients(self.model, self.cfg.max_grad_norm)
        check_finite(step, metrics["train/loss"], grad_norm, self.cfg.output_dir)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.add(time.time() - self.step_started, tokens, **metrics)
        if step % self.cfg.logging_steps == 0 or step == self.num_steps:
            scalars, line = self.progress.report(step, self.lr, grad_norm, show=show)
            print0(line, flush=True)
            if self.logger is not None:
                self.logger.log(step, scalars)

    def is_eval_step(self, step: int) -> bool:
        """Validate every eval_steps steps, and always after the last one."""
        return step == self.num_steps or (self.cfg.eval_steps > 0 and step % self.cfg.eval_steps == 0)

    def task_scores(self) -> dict:
        """The eval_tasks metrics of the model now ({} without eval_tasks)."""
        if not self.eval_tasks:
            return {}
        return evaluate_tasks(self.model, self.tokenizer, self.eval_tasks, self.device, self.compute_dtype,
                              self.micro_batch, system_prompt=self.cfg.system_prompt)

    def report_evaluation(self, step: int, scalars: dict) -> None:
        """One printed line of validation / evaluation numbers, also logged (rank 0 has the logger)."""
        print0(f"step {step}/{self.num_steps} | " + " | ".join(f"{key} {value:.4f}" for key, value in scalars.items()),
               flush=True)
        if self.logger is not None:
            self.logger.log(step, scalars)

    def save_if_due(self, step: int) -> None:
        """A checkpoint every save_steps steps (after checking the weights are finite)."""
        cfg = self.cfg
        if cfg.save_steps > 0 and step % cfg.save_steps == 0:
            check_model_finite(self.model, step, cfg.output_dir, self.device, self.compute_dtype)
            path = save_checkpoint(cfg.output_dir, step, self.model, self.optimizer, self.tokenizer,
                                   self.training_args, cfg.save_total_limit, self.adapter_config,
                                   data_signature=self.data_signature)
            print0(f"saved {path}")

    def finish(self) -> None:
        """The final model directory (the adapter alone for LoRA), then the plots."""
        cfg = self.cfg
        check_model_finite(self.model, self.num_steps, cfg.output_dir, self.device, self.compute_dtype)
        save_model_dir(cfg.output_dir, self.model, self.tokenizer, self.training_args, self.adapter_config)
        if self.logger is not None:
            self.logger.close()
            if cfg.plot:
                plot_run(cfg.output_dir)  # output_dir/plots/*.png
        what = "adapter" if self.lora else "model"
        print0(f"done in {self.progress.elapsed()}; {what} directory: {cfg.output_dir}")


def resolve_resume(cfg, world_size: int) -> str | None:
    """The checkpoint to continue from, or None for a fresh run. Rank 0 runs this
    first (main_process_first): it alone moves or removes anything.

    A fresh run never replaces a finished model or checkpoints unless
    overwrite_output_dir. --resume auto takes the newest intact checkpoint: a
    damaged one (a crash mid-copy, a full disk, a hand edit) is moved aside to
    damaged-checkpoint-N with a warning. A resumed run must be the same run:
    see check_resume_settings."""
    output_dir = cfg.output_dir
    main = int(os.environ.get("RANK", "0")) == 0
    if not cfg.resume:
        old = list_checkpoints(output_dir)
        if old and not cfg.overwrite_output_dir:
            raise UserError(f"output_dir {output_dir} already holds checkpoints; continue it with --resume auto, "
                            f"pick another --output_dir, or pass --overwrite_output_dir true to start over")
        check_output_dir(output_dir, cfg.overwrite_output_dir)
        if old and main:
            print0(f"overwrite_output_dir: removing {len(old)} old checkpoint(s) in {output_dir}")
            for _, path in old:
                shutil.rmtree(path)
        return None
    check_output_dir(output_dir, overwrite=True)  # a resumed run replaces its own final model
    if main and os.path.isdir(output_dir):  # what a save killed half-way left behind
        for name in os.listdir(output_dir):
            if name.startswith((".tmp-checkpoint-", ".old-checkpoint-")):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if cfg.resume == "auto":
        found = None
        for _, path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                found = path
                break
            aside = os.path.join(output_dir, "damaged-" + os.path.basename(path))
            if main:
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(path, aside)
                print0(f"warning: {path} is damaged ({problem}); moved it to {aside}")
        if found is None:  # then it is a fresh run, and must not replace a finished model either
            check_output_dir(output_dir, cfg.overwrite_output_dir)
        print0(f"resuming from {found}" if found else f"resume=auto: no checkpoint in {output_dir}, starting fresh")
    else:
        found = cfg.resume
        if not os.path.isdir(found):
            raise UserError(f"resume: {found} is not a directory")
        problem = checkpoint_problem(found)
        if problem:
            raise UserError(f"resume: {found} is not an intact checkpoint ({problem})")
        print0(f"resuming from {found}")
    if found:
        check_resume_settings(cfg, world_size, found)
    return found


# Keys that may change between a run and its resumption without changing what
# is trained: cadence, where things go, and how fast the same math runs.
RESUME_SAFE_KEYS = ("logging_steps", "eval_steps", "eval_batches", "save_steps", "save_total_limit",
                    "use_tensorboard", "plot", "resume", "output_dir", "overwrite_output_dir", "allow_schedule_change",
                    "collective_timeout_minutes", "cache_dir", "preprocessing_num_workers",
                    "max_chosen_logp_drop", "eval_tasks", "eval_num_fewshot", "compile", "kernels", "enable_gradient_checkpointing")
# The learning-rate schedule: changed only when asked (allow_schedule_change).
RESUME_SCHEDULE_KEYS = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "min_lr_ratio", "max_steps",
                        "num_epochs")
# How the global batch is split: free, as long as the global batch stays the same.
RESUME_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def check_resume_settings(cfg, world_size: int, checkpoint: str) -> None:
    """Refuse a resumption that would not continue the same run (naming the key and
    both values); print the changes that are allowed."""
    args_file = os.path.join(checkpoint, "training_args.yaml")
    with open(args_file, encoding="utf-8") as f:
        before = yaml.safe_load(f)
    now = config_to_dict(cfg)
    state = read_trainer_state(checkpoint)
    old_world = state["world_size"]

    def rows(settings: dict, world: int) -> tuple[int, str]:
        micro, accum = settings["train_micro_batch_size_per_gpu"], settings["gradient_accumulation_steps"]
        return micro * accum * world, f"{micro} x {accum} x {world} ranks"

    if all(key in before for key in RESUME_BATCH_KEYS):
        (old_rows, old_split), (new_rows, new_split) = rows(before, old_world), rows(now, world_size)
        if old_rows != new_rows:
            raise UserError(f"resume: the global batch (train_micro_batch_size_per_gpu x gradient_accumulation_steps "
                            f"x world size) was {old_split} = {old_rows} rows in {checkpoint}, now {new_split} = "
                            f"{new_rows}; keep it to continue the same run")
        if old_split != new_split:
            print0(f"resume: global batch {new_rows} rows split as {new_split} (was {old_split})")
    if state.get("data") and state["data"] != files_signature(cfg.dataset_path):
        raise UserError(f"resume: the data files of dataset_path {cfg.dataset_path} are not those {checkpoint} "
                        f"was trained on (files added, removed or changed in size)")
    for key, value in now.items():
        if key not in before or before[key] == value or key in RESUME_BATCH_KEYS:
            continue
        change = f"key '{key}' was {before[key]!r} in {args_file}, now {value!r}"
        if key in RESUME_SAFE_KEYS or (key in RESUME_SCHEDULE_KEYS and cfg.allow_schedule_change):
            print0(f"resume: {change}")
        elif key in RESUME_SCHEDULE_KEYS:
            raise UserError(f"resume: {change}; this changes the learning-rate schedule: pass "
                            f"--allow_schedule_change true if that is intended")
        else:
            raise UserError(f"resume: {change}; resuming with it changed would not continue the same run "
                            f"(use the original value, or start a new output_dir)")


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


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


@torch.no_grad()
def check_model_finite(model, step: int, output_dir: str, device: torch.device, dtype: torch.dtype) -> None:
    """Before a checkpoint or the final model is written: every weight finite, and
    a forward pass through them too (a diverged update can leave huge but finite
    weights that give NaN logits). Every rank calls this (the forward pass is a
    collective when the model is sharded)."""
    bad = torch.zeros((), device=device)
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        bad += (~torch.isfinite(local)).sum()
    length = min(model.config.vocab_size, model.config.max_position_embeddings + 1, 33)
    probe = torch.arange(length, device=device)[None]
    was_training = model.training
    model.eval()  # no dropout: the probe draws no random numbers
    with autocast(device, dtype):
        loss = model(probe[:, :-1], probe[:, 1:])
    model.train(was_training)
    bad += ~torch.isfinite(loss.float())
    if all_reduce_sum(bad).item() > 0:
        last = latest_checkpoint(output_dir)
        raise UserError(f"step {step}: the weights are no longer usable (non-finite values or a non-finite "
                        f"forward pass; learning_rate too high?); nothing is saved; the last good checkpoint is "
                        f"{last or 'none (nothing saved yet)'}")


def tokenized_data(cfg, tokenizer, info, kind: str, make_dataset):
    """SFT samples or DPO pairs, as make_dataset(items) for training and for
    validation (None without held-out items): eval_dataset_path's, or a val_ratio
    share of dataset_path's held out. Tokenized once, by rank 0, into the cache
    that every rank then reads (token_cache.py)."""
    tokenize = {"sft": tokenized_sft, "dpo": tokenized_pairs}[kind]

    def tokenized(path: str) -> list:
        return main_process_first(lambda: tokenize(path, tokenizer, cfg.cutoff_len, cfg.system_prompt, cfg.cache_dir,
                                                   cfg.strict, cfg.preprocessing_num_workers or None,
                                                   quiet=not info.is_main))[0]

    items = tokenized(cfg.dataset_path)
    if cfg.eval_dataset_path:
        train, held_out = items, tokenized(cfg.eval_dataset_path)
        where = f"from {cfg.eval_dataset_path}"
    else:
        train, held_out = split_held_out(items, cfg.val_ratio)
        where = f"(val_ratio {cfg.val_ratio} of {cfg.dataset_path})"
    if not train:
        raise UserError(f"{cfg.dataset_path}: " + ("no conversation has a trainable token left" if kind == "sft"
                                                   else "no usable preference pair left"))
    print0(f"validation: {len(held_out)} held-out {'conversations' if kind == 'sft' else 'pairs'} {where}")
    return make_dataset(train), make_dataset(held_out) if held_out else None


def rank_batches(num_batches: int, info) -> list[tuple[int, float]]:
    """The batches this rank runs when ranks share out work such as validation, as
    (batch index, weight): ranks take turns. With a sharded model every rank must
    run the same number of forward passes, so a rank short of batches runs batch 0
    again with weight 0 (its result is not counted)."""
    rounds = math.ceil(num_batches / info.world_size)
    indices = [i * info.world_size + info.rank for i in range(rounds)]
    return [(i, 1.0) if i < num_batches else (0, 0.0) for i in indices]


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
