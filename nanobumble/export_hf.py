"""Export a model directory to the Hugging Face format (what is written: nanobumble/store/hf_export.py).

    python -m nanobumble.export_hf --model_path checkpoints/dpo/bumblebee_1.5b_dpo_merged \
        --save_path exports/bumblebee_1.5b_hf [--dtype bf16]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanobumble.base.errors import ConfigError, run_cli
from nanobumble.inference.generation import GenerationConfig
from nanobumble.run.config import check_numbers, parse_config
from nanobumble.store.hf_export import DTYPES, GIB, write_hf_model


@dataclass
class ExportConfig:
    model_path: str = ""  # a model directory, or a LoRA run's (its base is exported, the adapter into adapter/)
    save_path: str = ""  # the Hugging Face directory to write
    dtype: str = "fp32"  # fp32 (exact) | bf16 | fp16
    max_shard_size_gb: float = 5.0  # larger weights are split into shards of at most this many GiB
    overwrite_output_dir: bool = False  # replace a model already in save_path

    def __post_init__(self):
        check_numbers(self)  # ranges: NUMBERS in run/config.py
        if self.dtype not in DTYPES:
            raise ConfigError(f"key 'dtype' must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def export_hf(model_path: str, save_path: str, dtype: torch.dtype = torch.float32, overwrite: bool = False,
              max_shard_size: int = 5 * GIB) -> None:
    """The export, with the sampling defaults that chat.py and serve use."""
    write_hf_model(model_path, save_path, GenerationConfig(), dtype, overwrite, max_shard_size)


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, ExportConfig)
    if not cfg.model_path or not cfg.save_path:
        raise ConfigError("give both --model_path and --save_path")
    export_hf(cfg.model_path, cfg.save_path, DTYPES[cfg.dtype], cfg.overwrite_output_dir,
              max_shard_size=int(cfg.max_shard_size_gb * GIB))


if __name__ == "__main__":
    run_cli(main)
