"""Rounds of DPO on the model's own answers (tests/bench_rounds.py), three seeds on
each of two checkable tasks, against the SFT model and against a control that
spends the same steps on NLL-only training of the same chosen answers:
`python -m pytest -m bench_long tests/bench/test_bench_rounds.py -s` (about 2 hours on 2
CPU cores: marked bench_long, as the quality benchmark is).

Asserts what the README's table shows: after the rounds, held-out exact match
is above the SFT model's by at least 0.05 on average and below it on no seed,
above the control's on average, and no round trips the likelihood-displacement
warning.
"""

import statistics

import pytest
from bench_quality import pretrain
from bench_rounds import ROUND_SETTINGS, one_seed, table
from conftest import print_table

pytestmark = pytest.mark.bench_long  # hours, not minutes

SEEDS = (0, 1, 2)


@pytest.mark.parametrize("task", ["words", "sums"])
def test_bench_rounds(tmp_path_factory, capsys, task):
    work_dir = str(tmp_path_factory.mktemp(task))
    base = pretrain(work_dir, f"{work_dir}/cache")[0]
    settings = ROUND_SETTINGS[task]
    runs = [one_seed(work_dir, base, task, seed, settings, "fp32") for seed in SEEDS]
    with capsys.disabled():
        print_table(f"{task}: held-out exact match", *table(task, runs, settings, "test"))
    last, control = f"round{settings['rounds']}", f"control{settings['rounds']}"
    gains = [r["test"][last] - r["test"]["sft"] for r in runs]
    assert statistics.mean(gains) >= 0.05
    assert min(gains) >= 0
    assert statistics.mean(r["test"][last] for r in runs) > statistics.mean(r["test"][control] for r in runs)
    assert not any(r["warned"] for r in runs)
