"""The resume policy: what a run does with its output_dir before it starts.

A fresh run never replaces a finished model or checkpoints unless
overwrite_output_dir (then it removes what the earlier run wrote, and nothing else). --resume auto takes
the newest intact checkpoint and moves a damaged one aside; --resume DIR takes
that checkpoint or stops. A resumed run must be the same run: the same global
batch, data files and settings, except those listed below as safe to change.
"""

from __future__ import annotations

import os

from nanobumble.base.distributed import print0
from nanobumble.base.errors import UserError
from nanobumble.base.output_guard import RECORD, foreign, record, remove_recorded
from nanobumble.run.config import config_to_dict
from nanobumble.store.checkpoint import checkpoint_problem, list_checkpoints, read_trainer_state
from nanobumble.store.model_dir import COMPLETE, MODEL_FILES, check_output_dir
from nanobumble.store.run_files import read_training_args

# What a run writes at the root of its output_dir (besides checkpoint-N and
# TensorBoard's event files): recorded when the run claims the directory, so
# --overwrite_output_dir may later remove them, and a stranger of the same name
# (a file nanobumble did not write) stops the run instead of being replaced.
RUN_FILES = (*MODEL_FILES, "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
             "hf_config.json", "training_args.yaml", COMPLETE, "metrics.jsonl", "plots")


def resolve_resume(cfg, world_size: int) -> str | None:
    """The checkpoint to continue from, or None for a fresh run. Rank 0 runs this
    first (main_process_first), holding output_dir's lock (base/output_guard.py):
    it alone moves or removes anything, and only what nanobumble wrote there.

    A fresh run never replaces a finished model or checkpoints unless
    overwrite_output_dir. --resume auto takes the newest intact checkpoint: a
    damaged one (a crash mid-copy, a full disk, a hand edit) is moved aside to
    damaged-checkpoint-N with a warning. A resumed run must be the same run:
    see check_resume_settings."""
    output_dir = cfg.output_dir
    main = int(os.environ.get("RANK", "0")) == 0
    if cfg.resume and cfg.overwrite_output_dir:
        raise UserError(f"--resume {cfg.resume} continues the run in {output_dir} while --overwrite_output_dir "
                        f"true starts it over: pass one of them")
    if not cfg.resume:
        start_fresh(output_dir, cfg.overwrite_output_dir, main)
        return None
    if main:  # the user says this run is theirs: adopt what it wrote (a run from before the record had none)
        record(output_dir, *RUN_FILES, *(os.path.basename(path) for _, path in list_checkpoints(output_dir)))
    if cfg.resume == "auto":
        found = None
        for _, path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                found = path
                break
            if main:
                aside = free_name(os.path.join(output_dir, "damaged-" + os.path.basename(path)))
                record(output_dir, os.path.basename(aside))
                os.rename(path, aside)
                print0(f"warning: {path} is damaged ({problem[:200]}); moved it to {aside}")
        if found is None:  # then it is a fresh run, and must not replace a finished model either
            start_fresh(output_dir, False, main)
        print0(f"resuming from {found}" if found else f"resume=auto: no checkpoint in {output_dir}, starting fresh")
    else:
        found = cfg.resume
        if not os.path.isdir(found):
            raise UserError(f"resume: {found} is not a directory")
        problem = checkpoint_problem(found)
        if problem:
            raise UserError(f"resume: {found} is not an intact checkpoint ({problem[:200]})")
        print0(f"resuming from {found}")
    if found:
        check_resume_settings(cfg, world_size, found)
    return found


def start_fresh(output_dir: str, overwrite: bool, main: bool) -> None:
    """A fresh run into output_dir: refuse to replace a finished model or
    checkpoints unless overwrite (then remove everything an earlier run wrote), and
    anything nanobumble did not write that the run would replace."""
    old = list_checkpoints(output_dir)
    if old and not overwrite:
        raise UserError(f"output_dir {output_dir} already holds checkpoints; continue it with --resume auto, "
                        f"pick another --output_dir, or pass --overwrite_output_dir true to start over")
    check_output_dir(output_dir, overwrite)
    strangers = foreign(output_dir, (*RUN_FILES, *(os.path.basename(path) for _, path in old)))
    if strangers:
        raise UserError(f"output_dir {output_dir} holds {', '.join(strangers[:5])}, which nanobumble did not write "
                        f"there (not in {RECORD}; or an older nanobumble wrote it): this run would replace it; "
                        f"move it away or pick another --output_dir")
    if main:
        if overwrite:
            removed = remove_recorded(output_dir)
            if removed:
                print0(f"overwrite_output_dir: removed {len(removed)} entries an earlier run wrote in {output_dir}")
        record(output_dir, *RUN_FILES)


def free_name(path: str) -> str:
    """path, or path-2, path-3, ...: the first that does not exist."""
    candidate, n = path, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate

# Keys that may change between a run and its resumption without changing what
# is trained: cadence, where things go, and how fast the same math runs.
RESUME_SAFE_KEYS = ("logging_steps", "eval_steps", "eval_rows", "save_steps", "save_total_limit",
                    "use_tensorboard", "plot", "resume", "output_dir", "overwrite_output_dir", "allow_schedule_change",
                    "collective_timeout_minutes", "cache_dir", "preprocessing_num_workers",
                    "max_chosen_logp_drop", "eval_tasks", "eval_num_fewshot", "compile", "kernels",
                    "enable_gradient_checkpointing", "memory_check", "single_process_fsdp")

# The learning-rate schedule: changed only when asked (allow_schedule_change).
RESUME_SCHEDULE_KEYS = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "min_lr_ratio", "max_steps",
                        "num_epochs")


def check_resume_data(checkpoint: str, data_sha256: str, dataset_path) -> None:
    """Refuse to resume on other data: the checkpoint's data_sha256 (the content hash
    of the data it was trained on) must be this run's. A checkpoint or shard
    directory from before data_sha256 existed resumes with a warning."""
    recorded = read_trainer_state(checkpoint).get("data_sha256")
    if recorded and data_sha256 and recorded != data_sha256:
        raise UserError(f"resume: the data of dataset_path {dataset_path} is not the data {checkpoint} was trained "
                        f"on (content hash {data_sha256[:12]}, the checkpoint's {str(recorded)[:12]}); "
                        f"use that data, or start a new output_dir")
    if not (recorded and data_sha256):
        where = f"the shard directory {dataset_path}" if recorded else checkpoint
        print0(f"warning: resume: {where} does not record the data's content hash (written by an older "
               f"nanobumble), so the data was not verified to be the data {checkpoint} was trained on")


# How the global batch is split: free, as long as the global batch stays the same.
RESUME_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def check_resume_settings(cfg, world_size: int, checkpoint: str) -> None:
    """Refuse a resumption that would not continue the same run (naming the key and
    both values); print the changes that are allowed."""
    args_file = os.path.join(checkpoint, "training_args.yaml")
    before = read_training_args(checkpoint, required=True)
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
