"""Tokenize one JSONL corpus into shards and report time and peak memory (used by
tests/bench/test_bench_prepare.py, one fresh process per measurement):

    python tests/bench_prepare.py CORPUS.jsonl TOKENIZER.model WORKERS OUT.json

Peak memory is reported for this process (it reads the JSON and writes the
shards) and for the largest tokenizer worker process, separately.
"""

import json
import os
import resource
import sys
import tempfile

from host_memory import measure

from nanobumble.data.shards import prepare_shards
from nanobumble.data.tokenizer import load_tokenizer


def main(corpus: str, tokenizer_file: str, workers: int, out: str) -> None:
    tokenizer = load_tokenizer(tokenizer_file)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out)) as tmp:
        meta, before, peak, seconds = measure(lambda: prepare_shards(
            [corpus], tokenizer, os.path.join(tmp, "shards"), num_workers=workers))
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # kB -> MiB, finished workers
    with open(out, "w") as f:
        json.dump({"seconds": seconds, "peak_mib": peak, "before_mib": before, "worker_peak_mib": worker_peak,
                   "text_bytes": meta["text_bytes"], "file_bytes": os.path.getsize(corpus),
                   "tokens": meta["train_tokens"] + meta["val_tokens"]}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
