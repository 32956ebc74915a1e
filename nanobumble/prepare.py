"""Tokenize raw pretraining text into a shard directory.

    python -m nanobumble.prepare --dataset_path data/ --output_dir shards/ [--tokenizer_path T]

Without --tokenizer_path a new tokenizer is trained on the dataset. Either
way the output directory ends up holding the shards, meta.json and the
tokenizer.model they were made with; train with --dataset_path pointing at it.
"""

import argparse
import os
import sys
import tempfile

from nanobumble.base.errors import DataError
from nanobumble.data.records import iter_text_records, list_data_files
from nanobumble.data.shards import prepare_shards
from nanobumble.data.tokenizer import load_or_train_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nanobumble.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", required=True,
                        help="a .json/.jsonl file, a directory of them, or a comma-separated list")
    parser.add_argument("--output_dir", required=True, help="new shard directory (must not exist or be empty)")
    parser.add_argument("--tokenizer_path", default="",
                        help="tokenizer.model, or a directory holding one; trained on the data if not given")
    parser.add_argument("--vocab_size", type=int, default=8000, help="vocabulary size when training a tokenizer")
    parser.add_argument("--tokenizer_sample_mb", type=float, default=80.0,
                        help="a new tokenizer learns from a seeded sample of this many MB of the text")
    parser.add_argument("--val_ratio", type=float, default=0.01, help="fraction of documents kept for validation")
    parser.add_argument("--num_workers", type=int, default=None, help="tokenizer processes (default: all CPUs)")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard file")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        files = list_data_files(args.dataset_path)
        if os.path.exists(args.output_dir) and os.listdir(args.output_dir):
            raise DataError(f"output directory {args.output_dir} already exists and is not empty")
        print(f"prepare: {len(files)} file(s) from {args.dataset_path}")
        # A new tokenizer is trained into a temporary directory (bad records are
        # reported later, once, while tokenizing); prepare_shards copies it into
        # the output directory together with the shards.
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = load_or_train_tokenizer(
                args.tokenizer_path, lambda: iter_text_records(files, strict=args.strict, quiet=True),
                args.vocab_size, cache_dir=tmp, cache_key="prepare",
                corpus_bytes=sum(os.path.getsize(f) for f in files), sample_mb=args.tokenizer_sample_mb)
            meta = prepare_shards(files, tokenizer, args.output_dir, val_ratio=args.val_ratio,
                                  shard_tokens=args.shard_tokens, num_workers=args.num_workers,
                                  strict=args.strict)
    except (DataError, OSError, ValueError) as e:  # bad data or tokenizer: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"prepare: wrote {args.output_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val "
          f"tokens, vocab_size={meta['vocab_size']}, {meta['text_bytes'] / 1e6:,.1f} MB of text")
    return 0


if __name__ == "__main__":
    sys.exit(main())
