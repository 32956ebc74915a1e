"""Tokenize raw pretraining text into a shard directory.

    python -m nanobumble.prepare --dataset_path data/ --output_dir shards/ [--tokenizer_path T]

Without --tokenizer_path a new tokenizer is trained on the dataset. Either
way the output directory ends up holding the shards, meta.json and the
tokenizer.model they were made with; train with --dataset_path pointing at it.
"""

import math
import os
import tempfile
from dataclasses import dataclass

from nanobumble.base.errors import DataError, run_cli
from nanobumble.data.records import iter_text_records, list_data_files
from nanobumble.data.shards import prepare_shards
from nanobumble.data.tokenizer import load_or_train_tokenizer
from nanobumble.run.config import PretrainConfig, _check_range, parse_config


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
        _check_range(self, "vocab_size", lambda v: v >= 1, "at least 1")
        _check_range(self, "tokenizer_sample_mb", lambda v: 0 < v < math.inf, "> 0 and finite")
        _check_range(self, "val_ratio", lambda v: 0 <= v < 1, "in [0, 1)")
        _check_range(self, "num_workers", lambda v: v >= 0, ">= 0 (0: all CPUs)")
        _check_range(self, "shard_tokens", lambda v: 1 <= v < 2**31, "in [1, 2^31)")


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, PrepareConfig)
    files = list_data_files(cfg.dataset_path)
    out = cfg.output_dir
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise DataError(f"output directory {out} already exists and is not empty")
    print(f"prepare: {len(files)} file(s) from {cfg.dataset_path}")
    # A new tokenizer is trained into a temporary directory (bad records are
    # reported later, once, while tokenizing); prepare_shards copies it into
    # the output directory together with the shards.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_or_train_tokenizer(
            cfg.tokenizer_path, lambda: iter_text_records(files, strict=cfg.strict, quiet=True),
            cfg.vocab_size, cache_dir=tmp, cache_key="prepare",
            corpus_bytes=sum(os.path.getsize(f) for f in files), sample_mb=cfg.tokenizer_sample_mb)
        meta = prepare_shards(files, tokenizer, out, val_ratio=cfg.val_ratio, shard_tokens=cfg.shard_tokens,
                              num_workers=cfg.num_workers or None, strict=cfg.strict)
    print(f"prepare: wrote {out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val "
          f"tokens, vocab_size={meta['vocab_size']}, {meta['text_bytes'] / 1e6:,.1f} MB of text")


if __name__ == "__main__":
    run_cli(main)
