"""Scalars to TensorBoard and to output_dir/metrics.jsonl (one JSON object per logged step)."""

from __future__ import annotations

import json
import os

from nanobumble.base.files import atomic_write_text
from nanobumble.base.output_guard import record


class MetricsLogger:
    def __init__(self, output_dir: str, use_tensorboard: bool, resume_step: int = 0):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if resume_step > 0:
            self._drop_after(resume_step)
        elif os.path.exists(self.path):
            os.remove(self.path)  # a fresh run starts a fresh log
        self.writer = None
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            before = set(os.listdir(output_dir))
            # purge_step hides events a killed run wrote after the checkpoint we resume from
            self.writer = SummaryWriter(log_dir=output_dir, purge_step=resume_step + 1 if resume_step else None)
            record(output_dir, *(name for name in os.listdir(output_dir)
                                 if name not in before and name.startswith("events.out.tfevents")))

    def _drop_after(self, step: int) -> None:
        """A run killed after its last checkpoint logged steps that will be redone,
        and may have died in the middle of a line: such a line is dropped too."""
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                    logged = record["step"]
                except (json.JSONDecodeError, TypeError, KeyError):
                    if line.strip():
                        print(f"warning: {self.path} line {number} is damaged; dropped")
                    continue
                if isinstance(logged, int) and logged <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        atomic_write_text(self.path, "".join(kept))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
