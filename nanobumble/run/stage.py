"""The skeleton every training stage shares, so each script shows only what is
particular to its stage: its data, its model, and its forward and backward pass.

    stage = Stage(cfg, info)                      # precision, seed, the config printed
    resume_dir = stage.open_output_dir()          # which checkpoint to resume (run/resume.py)
    model = stage.build_model(model_cfg, weights)
    stage.plan(examples_per_epoch)                # global batch and number of steps
    stage.start(model, tokenizer, data_sha256)    # optimizer, resume (same data?), logger, eval task files
    for step in stage.steps():
        for rows in stage.micro_batches(step): ...  # this rank's rows of each micro-step
        ... forward and backward ...
        stage.update(step, tokens, metrics)       # clip, finite check, learning rate, optimizer step, log line
        if stage.is_eval_step(step): stage.report_evaluation(step, evaluate(...))
        stage.save_if_due(step)
    stage.finish()                                # the final model (or adapter) directory, plots

Stage holds the run's state and does its bookkeeping; it is not a Trainer: the
loop, the batches and the loss stay in each script, in plain sight.

Below it: the checks that keep NaN out of a checkpoint, the held-out split of
SFT / DPO data, how ranks share out validation batches, and the progress line.
"""

from __future__ import annotations

import hashlib
import math
import time

import torch

from nanobumble.base.cpu import apply_num_threads, cpu_line
from nanobumble.base.distributed import distributed_run, main_process_first, print0
from nanobumble.base.errors import UserError
from nanobumble.base.output_guard import abandon_run_dir, claim_run_dir
from nanobumble.base.precision import autocast_dtype, resolve_precision
from nanobumble.data.records import split_held_out
from nanobumble.data.token_cache import tokenized_pairs, tokenized_sft
from nanobumble.evals.scoring import evaluate_tasks
from nanobumble.evals.tasks import load_tasks
from nanobumble.model.layers import resolve_backend
from nanobumble.model.mfu import device_peak_flops
from nanobumble.run.build import build_model
from nanobumble.run.config import config_to_yaml, parse_config
from nanobumble.run.memory import choose_checkpointing, device_memory_bytes
from nanobumble.run.metrics import MetricsLogger
from nanobumble.run.optim import build_optimizer, lr_at
from nanobumble.run.plots import plot_run
from nanobumble.run.resume import check_resume_data, resolve_resume
from nanobumble.store.adapter import adapter_config_for
from nanobumble.store.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nanobumble.store.model_dir import save_model_dir, weights_usable


def run_stage(train, config_class, argv: list[str]) -> None:
    """A training script's main(): its config (dataclass defaults < YAML < command
    line), then train(cfg, info) in the process group torchrun set up (or alone)."""
    cfg = parse_config(argv, config_class)
    with distributed_run(cfg.collective_timeout_minutes, cfg.single_process_fsdp) as info:
        try:
            train(cfg, info)
        except BaseException:
            if info.is_main:
                abandon_run_dir(cfg.output_dir)  # refused before writing: leave no empty output_dir behind
            raise


class Stage:
    """One training run of any stage: the calls of the module docstring, in that order."""

    def __init__(self, cfg, info):
        self.cfg, self.info, self.device = cfg, info, info.device
        self.dtype = resolve_precision(cfg.train_model_precision, info.device)
        self.autocast_dtype = autocast_dtype(info, self.dtype)  # sharded: FSDP's policy casts the weights instead
        self.lora = getattr(cfg, "finetuning_type", "full") == "lora"
        torch.manual_seed(cfg.seed)
        print0(f"config:\n{config_to_yaml(cfg)}")
        if cfg.num_threads:  # else setup_distributed chose them on CPU (torch's default on CUDA)
            apply_num_threads(cfg.num_threads)
        if self.device.type == "cpu":
            print0(cpu_line())  # cpu: ..., native bf16: no (flags: avx2); threads: 2 (2 cores, 0 busy)

    def open_output_dir(self) -> str | None:
        """Claim output_dir for this run and return the checkpoint to resume from (None:
        a fresh run). Rank 0 takes output_dir's lock for the run's lifetime, after
        checking that output_dir lies apart from every input (base/output_guard.py).
        This is where files may move: a fresh run with overwrite_output_dir removes
        what an earlier run wrote, and --resume auto moves a damaged checkpoint aside
        (run/resume.py). Rank 0 acts first, alone."""
        def claim_and_resolve():
            if self.info.is_main:
                self.lock = claim_run_dir(self.cfg.output_dir, run_inputs(self.cfg))
            return resolve_resume(self.cfg, self.info.world_size)

        self.resume_dir = main_process_first(claim_and_resolve)
        return self.resume_dir

    def build_model(self, model_cfg, weights_from: str | None, lora: dict | None = None, frozen: bool = False):
        """The model to train (with LoRA adapters if `lora`), or with frozen=True a
        copy that is not trained (DPO's reference): no gradients, no dropout."""
        cfg = self.cfg
        if frozen:
            model = build_model(model_cfg, self.info, cfg.seed, weights_from, self.dtype, kernels=cfg.kernels)
            model.requires_grad_(False)
            model.eval()
            return model
        # The memory plan (run/memory.py), printed; refused before anything is allocated when it does not fit
        checkpointing, plan = choose_checkpointing(cfg, model_cfg, self.info.world_size, self.dtype, self.device.type,
                                                   resolve_backend(cfg.kernels, self.device),
                                                   device_memory_bytes(self.device), fsdp=self.info.sharded)
        print0(plan.summary() + (" (chosen by enable_gradient_checkpointing auto)"
                                 if cfg.enable_gradient_checkpointing == "auto" else ""))
        print0(f"sharding: FSDP2 over {self.info.world_size} rank(s)" if self.info.sharded else
               "sharding: none (one process, no process group; single_process_fsdp true runs FSDP2 here too)")
        return build_model(model_cfg, self.info, cfg.seed, weights_from, self.dtype, checkpointing,
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
        self.batch_arithmetic = (f"{self.micro_batch} per micro-step x {cfg.gradient_accumulation_steps} "
                                 f"accumulation x {self.info.world_size} ranks = {self.batch_rows}")

    def start(self, model, tokenizer, data_sha256: str, flops_per_token: float | None = None) -> None:
        """Optimizer, the checkpoint to resume from (refused when its data_sha256, the
        training data's content hash, differs), logger and progress line (with MFU on a
        known GPU, from flops_per_token or update's flops), and the eval_tasks files, read
        and checked now, before the first step."""
        cfg, info = self.cfg, self.info
        self.model, self.tokenizer = model, tokenizer
        self.adapter_config = adapter_config_for(model, cfg.model_name_or_path) if self.lora else None
        self.data_sha256 = data_sha256  # recorded in checkpoints
        if self.resume_dir:
            check_resume_data(self.resume_dir, data_sha256, cfg.dataset_path)
        self.eval_tasks = load_tasks(cfg.eval_tasks, cfg.eval_num_fewshot) if getattr(cfg, "eval_tasks", "") else None
        self.optimizer = build_optimizer(model, cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2))
        self.start_step = load_checkpoint(self.resume_dir, model, self.optimizer) if self.resume_dir else 0
        self.training_args = config_to_yaml(cfg)
        self.logger = MetricsLogger(cfg.output_dir, cfg.use_tensorboard, resume_step=self.start_step) \
            if info.is_main else None
        peak_flops = device_peak_flops(self.device)  # None off CUDA or on an unknown GPU: no MFU
        self.progress = Progress(self.num_steps, flops_per_token, peak_flops * info.world_size if peak_flops else None)

    def steps(self):
        """The step numbers still to run; each starts the step's clock."""
        self.model.train()
        for step in range(self.start_step + 1, self.num_steps + 1):
            self.step_started = time.time()
            yield step

    def micro_batches(self, step: int) -> list[range]:
        """This rank's row (or pair) numbers for each micro-step of `step`.

        Row numbers run over the whole run: step s takes rows (s-1)*batch_rows
        onward, so a batch depends on (seed, step) only, not on the number of
        ranks, and a resumed run draws the batches the uninterrupted run would
        have drawn. Each rank takes its own slice of each micro-step."""
        world, n = self.info.world_size, self.micro_batch
        first = (step - 1) * self.batch_rows + self.info.rank * n
        return [range(first + micro * world * n, first + micro * world * n + n)
                for micro in range(self.cfg.gradient_accumulation_steps)]

    def update(self, step: int, tokens: int, metrics: dict, show: tuple[str, ...] | None = None,
               padded_tokens: int | None = None, flops: float | None = None) -> None:
        """After the backward passes: clip, stop on a non-finite loss or gradient, step
        the optimizer at this step's learning rate; count the step's tokens (all ranks) and metrics (means over the
        global batch, "train/loss" among them) and print the log line when due.
        tokens: the real (non-padding) input tokens; padded_tokens: with padding, for
        rows that have some (SFT, DPO); flops: the step's model FLOPs, all ranks (else
        start's flops_per_token x tokens), for MFU."""
        cfg = self.cfg
        grad_norm = clip_gradients(self.model, cfg.max_grad_norm)
        check_finite(step, metrics["train/loss"], grad_norm, cfg.output_dir)
        self.lr = lr_at(step, self.num_steps, cfg.learning_rate, self.warmup_steps, cfg.lr_scheduler_type,
                        cfg.min_lr_ratio)
        set_learning_rate(self.optimizer, self.lr)  # this step's rate, from the schedule
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.add(time.time() - self.step_started, tokens, padded_tokens, flops, **metrics)
        if step % cfg.logging_steps == 0 or step == self.num_steps:
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
        return evaluate_tasks(self.model, self.tokenizer, self.eval_tasks, self.device, self.autocast_dtype,
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
            check_model_finite(self.model, step, cfg.output_dir, self.device, self.autocast_dtype)
            path = save_checkpoint(cfg.output_dir, step, self.model, self.optimizer, self.tokenizer,
                                   self.training_args, cfg.save_total_limit, self.adapter_config,
                                   data_sha256=self.data_sha256)
            print0(f"saved {path}")

    def finish(self) -> None:
        """The final model directory (the adapter alone for LoRA), then the plots."""
        cfg = self.cfg
        check_model_finite(self.model, self.num_steps, cfg.output_dir, self.device, self.autocast_dtype)
        save_model_dir(cfg.output_dir, self.model, self.tokenizer, self.training_args, self.adapter_config)
        if self.logger is not None:
            self.logger.close()
            if cfg.plot:
                plot_run(cfg.output_dir)  # output_dir/plots/*.png
        what = "adapter" if self.lora else "model"
        print0(f"done in {self.progress.elapsed()}; {what} directory: {cfg.output_dir}")


# The keys that name what a run reads: its output_dir must lie apart from each.
INPUT_KEYS = ("model_name_or_path", "dataset_path", "eval_dataset_path", "tokenizer_path", "cache_dir", "eval_tasks")


def run_inputs(cfg) -> dict[str, str]:
    """What the run reads, by key (a comma-separated dataset_path and eval_tasks' list give several)."""
    inputs = {}
    for key in INPUT_KEYS:
        value = getattr(cfg, key, "")
        paths = value if isinstance(value, list) else [p for p in str(value or "").split(",") if p.strip()]
        for i, path in enumerate(paths):
            inputs[key if len(paths) == 1 else f"{key}[{i}]"] = path.strip()
    return inputs


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


def check_model_finite(model, step: int, output_dir: str, device: torch.device, dtype: torch.dtype) -> None:
    """Before a checkpoint or the final model is written: the weights usable
    (store/model_dir.py: weights_usable). Every rank calls this."""
    if not weights_usable(model, device, dtype):
        last = latest_checkpoint(output_dir)
        raise UserError(f"step {step}: the weights are no longer usable (non-finite values or a non-finite "
                        f"forward pass; learning_rate too high?); nothing is saved; the last good checkpoint is "
                        f"{last or 'none (nothing saved yet)'}")


def tokenized_data(cfg, tokenizer, info, kind: str, make_dataset):
    """SFT samples or DPO pairs, as make_dataset(items) for training and for
    validation (None without held-out items): eval_dataset_path's, or a val_ratio
    share of dataset_path's held out. Tokenized once, by rank 0, into the cache
    that every rank then reads (token_cache.py). Also returns the data's identity
    (data_sha256, of dataset_path's files, and eval_dataset_path's when given)."""
    tokenize = {"sft": tokenized_sft, "dpo": tokenized_pairs}[kind]

    def tokenized(path: str) -> tuple[list, str]:
        items, stats = main_process_first(lambda: tokenize(path, tokenizer, cfg.cutoff_len, cfg.system_prompt,
                                                           cfg.cache_dir, cfg.strict,
                                                           cfg.preprocessing_num_workers or None,
                                                           quiet=not info.is_main))
        return items, stats["data_sha256"]

    items, data_sha256 = tokenized(cfg.dataset_path)
    if cfg.eval_dataset_path:
        held_out, eval_sha256 = tokenized(cfg.eval_dataset_path)
        train, data_sha256 = items, hashlib.sha256(f"{data_sha256}\0{eval_sha256}".encode()).hexdigest()
        where = f"from {cfg.eval_dataset_path}"
    else:
        train, held_out = split_held_out(items, cfg.val_ratio)
        where = f"(val_ratio {cfg.val_ratio} of {cfg.dataset_path})"
    if not train:
        raise UserError(f"{cfg.dataset_path}: " + ("no conversation has a trainable token left" if kind == "sft"
                                                   else "no usable preference pair left"))
    print0(f"validation: {len(held_out)} held-out {'conversations' if kind == 'sft' else 'pairs'} {where}")
    return make_dataset(train), make_dataset(held_out) if held_out else None, data_sha256


def share_batches(num_batches: int, info) -> list[tuple[int, float]]:
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
    peak_flops (all ranks together) and each step's FLOPs (given to add, or
    flops_per_token x its tokens) give MFU. Tokens are real tokens, not padding:
    train/tokens_per_sec and MFU count only those. Where rows have padding (SFT,
    DPO: add's padded_tokens), train/tokens and train/padded_tokens (per step,
    all ranks) are logged too, and the line shows the rate with padding."""

    def __init__(self, total_steps: int, flops_per_token: float | None = None, peak_flops: float | None = None):
        self.total_steps = total_steps
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.run_start = time.time()
        self.steps_done = 0
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.seconds, self.tokens = 0, 0.0, 0
        self.padded_tokens: int | None = None  # None: no step of this window had padding to count
        self.flops: float | None = 0.0  # None: a step of this window had no FLOPs count

    def add(self, seconds: float, tokens: int, padded_tokens: int | None = None, flops: float | None = None,
            **values: float) -> None:
        """One optimizer step: its duration, real tokens processed (all ranks), the
        same counting padding (None: rows without padding), its model FLOPs (None:
        flops_per_token x tokens, or unknown) and values to average."""
        self.steps_done += 1
        self.steps += 1
        self.seconds += seconds
        self.tokens += tokens
        if padded_tokens is not None:
            self.padded_tokens = (self.padded_tokens or 0) + padded_tokens
        if flops is None and self.flops_per_token:
            flops = self.flops_per_token * tokens
        self.flops = self.flops + flops if self.flops is not None and flops is not None else None
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def report(self, step: int, lr: float, grad_norm: float, show: tuple[str, ...] | None = None) -> tuple[dict, str]:
        """Scalars to log (means since the last report) and the printed line, which
        shows the keys in `show` (default: all); starts a new window."""
        scalars = {key: total / self.steps for key, total in self.sums.items()}
        shown = " | ".join(f"{key.removeprefix('train/')} {scalars[key]:.4f}" for key in (show or scalars))
        tokens_per_sec = self.tokens / max(self.seconds, 1e-9)
        scalars.update({"train/lr": lr, "train/grad_norm": grad_norm, "train/tokens_per_sec": tokens_per_sec})
        line = (f"step {step}/{self.total_steps} | {shown} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
                f"{tokens_per_sec:,.0f} tok/s")
        if self.padded_tokens is not None:
            scalars.update({"train/tokens": self.tokens / self.steps,
                            "train/padded_tokens": self.padded_tokens / self.steps})
            line += f" ({self.padded_tokens / max(self.seconds, 1e-9):,.0f} with padding)"
        if self.flops and self.peak_flops:
            scalars["train/mfu"] = self.flops / max(self.seconds, 1e-9) / self.peak_flops
            line += f" | mfu {100 * scalars['train/mfu']:.1f}%"
        eta = (time.time() - self.run_start) / self.steps_done * (self.total_steps - step)
        line += f" | eta {format_duration(eta)}"
        self._reset()
        return scalars, line

    def elapsed(self) -> str:
        return format_duration(time.time() - self.run_start)
