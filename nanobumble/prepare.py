"""Tokenize raw pretraining text into a shard directory.

    python -m nanobumble.prepare --dataset_path data/ --output_dir shards/ [--tokenizer_path T]

Without --tokenizer_path a new tokenizer is trained on the dataset. Either
way the output directory ends up holding the shards, meta.json and the
tokenizer.model they were made with; train with --dataset_path pointing at it.
"""

import os
import tempfile
from dataclasses import dataclass

from nanobumble.base.errors import run_cli
from nanobumble.base.output_guard import publish_directory
from nanobumble.data.records import iter_text_records, list_data_files
from nanobumble.data.shards import prepare_shards
from nanobumble.data.tokenizer import load_or_train_tokenizer
from nanobumble.run.config import PretrainConfig, check_numbers, parse_config


@dataclass
class PrepareConfig:
    dataset_path: str  # a .json/.jsonl file, a directory of them, or a comma-separated list
    output_dir: str  # new shard directory (must not exist or be empty)
    tokenizer_path: str = ""  # tokenizer.model, or a directory holding one; "" = train one on the data
    # A new tokenizer: the same defaults as train_pretrain.py's (PretrainConfig)
    vocab_size: int = PretrainConfig.vocab_size  # vocabulary size when training a tokenizer
    tokenizer_sample_mb: float = PretrainConfig.tokenizer_sample_mb  # it learns from a seeded sample this large
    val_ratio: float = PretrainConfig.val_ratio  # fraction of documents kept for validation
    num_workers: int = 0  # tokenizer processes (0: all CPUs)
    shard_tokens: int = 100_000_000  # tokens per shard file
    strict: bool = False  # stop at the first bad record instead of skipping it

    def __post_init__(self):
        check_numbers(self)  # ranges: NUMBERS in run/config.py


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, PrepareConfig)
    files = list_data_files(cfg.dataset_path)
    out = cfg.output_dir
    inputs = {f"--dataset_path {path}": path for path in [*cfg.dataset_path.split(","), *files]}
    inputs["--tokenizer_path"] = cfg.tokenizer_path
    print(f"prepare: {len(files)} file(s) from {cfg.dataset_path}")
    # The shard directory appears whole or not at all (base/output_guard.py). A new
    # tokenizer is trained into a temporary directory (bad records are reported
    # later, once, while tokenizing); prepare_shards copies it beside the shards.
    with publish_directory(out, inputs, overwrite=False, flag="--output_dir", overwrite_flag=None) as tmp, \
            tempfile.TemporaryDirectory() as tokenizer_tmp:
        tokenizer = load_or_train_tokenizer(
            cfg.tokenizer_path, lambda: iter_text_records(files, strict=cfg.strict, quiet=True),
            cfg.vocab_size, cache_dir=tokenizer_tmp, cache_key="prepare",
            corpus_bytes=sum(os.path.getsize(f) for f in files), sample_mb=cfg.tokenizer_sample_mb)
        meta = prepare_shards(files, tokenizer, tmp, val_ratio=cfg.val_ratio, shard_tokens=cfg.shard_tokens,
                              num_workers=cfg.num_workers or None, strict=cfg.strict)
    print(f"prepare: wrote {out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val "
          f"tokens, vocab_size={meta['vocab_size']}, {meta['text_bytes'] / 1e6:,.1f} MB of text")


if __name__ == "__main__":
    run_cli(main)
