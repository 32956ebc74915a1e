"""Draw a training run's curves from its metrics.jsonl (what is drawn: nanobumble/run/plots.py).

    python -m nanobumble.plot checkpoints/sft/tiny_instruct
"""

from __future__ import annotations

from dataclasses import dataclass

from nanobumble.base.errors import run_cli
from nanobumble.run.config import parse_config
from nanobumble.run.plots import write_plots


@dataclass
class PlotConfig:
    POSITIONAL = "output_dir"  # `plot DIR` is `plot --output_dir DIR`
    output_dir: str  # a training run's output_dir (the one holding metrics.jsonl)


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, PlotConfig)
    write_plots(cfg.output_dir)


if __name__ == "__main__":
    run_cli(main)
