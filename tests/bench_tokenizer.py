"""Train one tokenizer on a text file and report time and peak memory (used by
tests/bench/test_bench_tokenizer.py, one fresh process per measurement):

    python tests/bench_tokenizer.py CORPUS.txt SAMPLE_MB VOCAB HELDOUT.txt OUT.json

CORPUS.txt holds one document per line; the tokenizer learns from a seeded
sample of SAMPLE_MB of it, as train_pretrain.py does (tokenizer_sample_mb).
"""

import json
import os
import sys
import tempfile

from host_memory import measure

from nanobumble.data.tokenizer import load_or_train_tokenizer


def main(corpus: str, sample_mb: float, vocab: int, heldout: str, out: str) -> None:
    def documents():
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")

    with tempfile.TemporaryDirectory() as cache:
        tokenizer, before, peak, seconds = measure(lambda: load_or_train_tokenizer(
            "", documents, vocab, cache, "bench", corpus_bytes=os.path.getsize(corpus), sample_mb=sample_mb))
        with open(heldout, encoding="utf-8") as f:
            text = f.read()
        tokens = sum(len(ids) for ids in tokenizer.encode_batch(text.split("\n")))
    with open(out, "w") as f:
        json.dump({"seconds": seconds, "peak_mib": peak, "before_mib": before, "vocab": tokenizer.vocab_size,
                   "tokens_per_char": tokens / len(text.replace("\n", ""))}, f)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
