"""Tokenizer training: time and peak memory against the sample it learns from and
the vocabulary size, and what the sample size costs in quality (tokens per
character of held-out text): `python -m pytest -m bench_long tests/bench/test_bench_tokenizer.py -s`
(bench_long, not bench: 9 trainings on samples up to 200 MB of a 300 MB corpus, many minutes).

The corpus is generated Chinese-like text (about 300 MB): words of 2-4
characters cut from the bundled Chinese data, drawn by their frequency. Each
measurement runs in a fresh process (tests/bench_tokenizer.py). Prints a table;
asserts no timing.
"""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, print_table

pytestmark = pytest.mark.bench_long  # not bench: hundreds of MB

SAMPLES_MB = (10, 50, 200)
VOCABS = (32_000, 64_000, 151_936)


def write_corpus(path: str, megabytes: float, seed: int, jsonl: bool = False) -> None:
    """About `megabytes` of generated text, one document per line (as {"text": ...} lines when jsonl)."""
    with open(os.path.join(REPO_ROOT, "datasets", "pretrain", "zh.jsonl"), encoding="utf-8") as f:
        text = "".join(json.loads(line)["text"] for line in f if line.strip())
    words = collections.Counter(text[i:i + n] for n in (2, 3, 4) for i in range(len(text) - n)
                                if "\n" not in text[i:i + n])
    vocabulary, counts = zip(*words.most_common(20_000))
    probabilities = np.array(counts, dtype=np.float64) / sum(counts)
    rng = np.random.default_rng(seed)
    written, target = 0, int(megabytes * 2**20)
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            picks = rng.choice(len(vocabulary), size=(2000, 100), p=probabilities)  # 2000 documents
            lines = ["".join(vocabulary[i] for i in row) + "。" for row in picks]
            if jsonl:
                lines = [json.dumps({"text": line}, ensure_ascii=False) for line in lines]
            chunk = "\n".join(lines) + "\n"
            f.write(chunk)
            written += len(chunk.encode("utf-8"))


def test_bench_tokenizer_training(tmp_path, capsys):
    corpus, heldout = str(tmp_path / "corpus.txt"), str(tmp_path / "heldout.txt")
    write_corpus(corpus, 300, seed=0)
    write_corpus(heldout, 2, seed=1)
    rows = []
    for vocab in VOCABS:
        for sample_mb in SAMPLES_MB:
            out = str(tmp_path / f"{vocab}-{sample_mb}.json")
            result = subprocess.run([sys.executable, "tests/bench_tokenizer.py", corpus, str(sample_mb), str(vocab),
                                     heldout, out], cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
            assert result.returncode == 0, result.stderr[-3000:]
            m = json.loads(open(out).read())
            rows.append([f"{vocab:,}", sample_mb, f"{m['vocab']:,}", f"{m['seconds']:.0f}",
                         f"{m['peak_mib'] / 1024:.2f}", f"{m['tokens_per_char']:.3f}"])
    with capsys.disabled():
        print_table(f"tokenizer training on a seeded sample of a {os.path.getsize(corpus) / 2**20:,.0f} MB "
                    f"generated Chinese-like corpus ({os.cpu_count()} cores)",
                    ["vocab asked", "sample MB", "vocab trained", "seconds", "peak RSS GiB",
                     "tokens/char held out"], rows)
