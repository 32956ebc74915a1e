"""Preparing pretraining data: throughput and peak memory of tokenizing a JSONL
corpus into shards, with 1 process and with all cores, at two corpus sizes:
`python -m pytest -m bench_long tests/bench/test_bench_prepare.py -s`
(bench_long, not bench: it writes and tokenizes 2.2 GB of text, many minutes on 2 cores).

The corpus is generated Chinese-like text as {"text": ...} lines (see
test_bench_tokenizer.py); the tokenizer (vocab 32K) is trained once on a 10 MB
sample. Each measurement runs in a fresh process (tests/bench_prepare.py).
Memory must not grow with the corpus: the JSON is read line by line, a bounded
number of chunks is in flight to the workers, and shards are written as they
fill. Set NANOBUMBLE_BENCH_PREPARE_MB (default "200,2000") for other sizes.
Prints a table; asserts no timing.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, print_table
from test_bench_tokenizer import write_corpus

from nanobumble.data.records import iter_text_records
from nanobumble.data.tokenizer import load_or_train_tokenizer

pytestmark = pytest.mark.bench_long  # not bench: GB-scale


def test_bench_preparation(tmp_path, capsys):
    sizes = [float(mb) for mb in os.environ.get("NANOBUMBLE_BENCH_PREPARE_MB", "200,2000").split(",")]
    first = str(tmp_path / "first.jsonl")
    write_corpus(first, sizes[0], seed=0, jsonl=True)
    tokenizer = load_or_train_tokenizer("", lambda: iter_text_records([first], quiet=True), 32_000, str(tmp_path),
                                        "bench", corpus_bytes=os.path.getsize(first), sample_mb=10)
    all_cores = os.cpu_count() or 1
    rows = []
    for n, megabytes in enumerate(sizes):
        corpus = first if n == 0 else str(tmp_path / "corpus.jsonl")
        if n > 0:
            write_corpus(corpus, megabytes, seed=n, jsonl=True)
        for workers in sorted({1, all_cores}):
            out = str(tmp_path / f"{n}-{workers}.json")
            result = subprocess.run([sys.executable, "tests/bench_prepare.py", corpus, tokenizer.model_file,
                                     str(workers), out], cwd=REPO_ROOT, capture_output=True, text=True, timeout=3600)
            assert result.returncode == 0, result.stderr[-3000:]
            m = json.loads(open(out).read())
            assert m["tokens"] > 0 and m["text_bytes"] > 0.9 * megabytes * 2**20 * 0.9
            rows.append([f"{m['file_bytes'] / 2**20:,.0f}", workers, f"{m['seconds']:.0f}",
                         f"{m['file_bytes'] / 2**20 / m['seconds']:.1f}", f"{m['tokens'] / 1e6:,.0f}",
                         f"{m['peak_mib']:,.0f}", f"{m['worker_peak_mib']:,.0f}" if workers > 1 else "-"])
        if n > 0:
            os.remove(corpus)
    with capsys.disabled():
        print_table(f"preparing shards from generated Chinese-like JSONL, vocab 32K ({all_cores} cores)",
                    ["corpus MB", "processes", "seconds", "MB/s", "tokens M", "peak RSS main MiB",
                     "peak RSS worker MiB"], rows)
