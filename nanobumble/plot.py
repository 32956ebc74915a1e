"""Draw a training run's curves from its metrics.jsonl (what is drawn: nanobumble/run/plots.py).

    python -m nanobumble.plot checkpoints/sft/tiny_instruct
"""

from __future__ import annotations

import argparse

from nanobumble.base.errors import run_cli
from nanobumble.run.plots import write_plots


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanobumble.plot", description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", help="a training run's output_dir (the one holding metrics.jsonl)")
    args = parser.parse_args(argv)
    write_plots(args.output_dir)


if __name__ == "__main__":
    run_cli(main)
