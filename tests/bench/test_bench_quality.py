"""Quality benchmark: pretrain -> SFT -> DPO at the scripts' defaults on the
word-transform task of tests/word_task.py, three seeds, printing held-out exact
match after each stage, the pretraining's val bpb and DPO's held-out reward
accuracy and drift: `python -m pytest -m bench_long tests/bench/test_bench_quality.py -s`
(25-40 minutes on 2 CPU cores; tests/bench_quality.py runs the same as a script). Marked
bench_long, not bench: `pytest -m bench` stays the kernel and training benchmarks, in minutes.

Asserts what the defaults promise: SFT raises held-out exact match clearly,
DPO lowers it by at most 0.02 (mean of the seeds) while its held-out reward
accuracy is above chance, and the default DPO run does not trip the
likelihood-displacement warning.
"""

import os
import statistics

import pytest
from bench_quality import exact_match, last_value, pretrain, sft_and_dpo, table_rows
from conftest import print_table

pytestmark = pytest.mark.bench_long  # not bench: ~40 minutes

SEEDS = (0, 1, 2)
SIZES = (3000, 3000, 200)  # SFT instructions, preference pairs, held-out prompts


def test_bench_quality(tmp_path, capsys):
    work_dir, cache_dir = str(tmp_path), str(tmp_path / "cache")
    base, pretrain_seconds = pretrain(work_dir, cache_dir)
    runs = [sft_and_dpo(work_dir, base, cache_dir, seed, SIZES) for seed in SEEDS]
    base_em = exact_match(base, os.path.join(work_dir, f"seed{SEEDS[0]}", "data", "held_out.jsonl"))
    header, rows = table_rows(base_em, last_value(base, "val/bpb"), pretrain_seconds, runs)
    with capsys.disabled():
        print_table(f"word-transform task {SIZES}, greedy case-sensitive exact match on held-out prompts, "
                    f"{os.cpu_count()} CPU cores", header, rows)
    sft_em = statistics.mean(r["sft_em"] for r in runs)
    dpo_em = statistics.mean(r["dpo_em"] for r in runs)
    assert sft_em > base_em + 0.1
    assert dpo_em >= sft_em - 0.02
    assert statistics.mean(r["reward_acc"] for r in runs) > 0.5
    assert not any(r["warned"] for r in runs)
