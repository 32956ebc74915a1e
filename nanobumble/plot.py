"""Draw a training run's curves from its metrics.jsonl (what is drawn: nanobumble/run/plots.py).

    python -m nanobumble.plot checkpoints/sft/tiny_instruct [--smoothing 0.6]
"""

from __future__ import annotations

from dataclasses import dataclass

from nanobumble.base.errors import run_cli
from nanobumble.run.config import check_numbers, parse_config
from nanobumble.run.plots import SMOOTHING, write_plots


@dataclass
class PlotConfig:
    POSITIONAL = "output_dir"  # `plot DIR` is `plot --output_dir DIR`
    output_dir: str  # a training run's output_dir (the one holding metrics.jsonl)
    smoothing: float = SMOOTHING  # the loss's smoothed line, as TensorBoard's slider: 0 (raw only) to < 1

    def __post_init__(self):
        check_numbers(self)  # ranges: NUMBERS in run/config.py


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, PlotConfig)
    write_plots(cfg.output_dir, cfg.smoothing)


if __name__ == "__main__":
    run_cli(main)
