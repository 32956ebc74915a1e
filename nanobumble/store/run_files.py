"""What a run writes beside its model, and the one reader of each: the resolved
config (training_args.yaml) and the logged scalars (metrics.jsonl, one JSON object
per logged step). Plain files: reading them needs no torch.
"""

from __future__ import annotations

import os

from nanobumble.base.errors import UserError
from nanobumble.base.reading import loads, read_yaml


def read_training_args(directory: str, required: bool = False) -> dict:
    """directory/training_args.yaml as a dict: {} when there is none (or it is empty),
    unless required (a checkpoint's must be there and hold its keys)."""
    path = os.path.join(directory, "training_args.yaml")
    if not os.path.lexists(path):
        if required:
            raise UserError(f"{path}: not found")
        return {}
    args = read_yaml(path)  # a directory or a dangling link by that name is an error, not "no file"
    if args is None and not required:
        return {}
    if not isinstance(args, dict):
        raise UserError(f"{path}: expected a mapping of keys, got {type(args).__name__}")
    return args


def read_metrics(path: str) -> tuple[list[dict], int]:
    """The records of a metrics.jsonl and the number of damaged lines skipped
    (not JSON, not an object, or without an integer "step")."""
    records, skipped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = loads(line)
            except ValueError:  # not JSON, or nested too deep
                skipped += 1
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int) and not isinstance(step, bool):
                records.append(record)
            else:
                skipped += 1
    return records, skipped
