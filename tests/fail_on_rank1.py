"""train_pretrain.py with a data error on rank 1 only (used by tests/stages/test_distributed.py):
rank 0 goes on into the first collective, which must not hang the job."""

import os

import train_pretrain
from nanobumble.base.errors import DataError, run_cli

if os.environ.get("RANK") == "1":
    class BrokenShards:
        def __init__(self, shard_dir, split="train"):
            raise DataError(f"{shard_dir}/train_000000.bin: truncated shard (seen by rank 1 only)")

    train_pretrain.TokenShards = BrokenShards

if __name__ == "__main__":
    run_cli(train_pretrain.main)
