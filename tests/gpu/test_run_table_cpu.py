"""The GPU suite's run table (tests/run_table.py), run on the CPU at tiny shapes (-m slow, a few minutes):
the same rows and columns as `pytest -m gpu -s` prints, so the table's code is tested without a GPU."""

import pytest
import torch
from conftest import print_table
from run_table import COLUMNS, Shapes, run_table

from nanobumble.model.transformer import PRESETS, ModelConfig

pytestmark = pytest.mark.slow


def test_run_table_cpu_twin(capsys):
    shapes = Shapes(model=ModelConfig(vocab_size=512, **PRESETS["tiny"]), seq_len=128, micro_cap=2, warmup=1,
                    timed=2, doc_tokens=24, kernel_tokens=512, kernels="torch")
    rows, failures, notes = run_table(shapes, torch.device("cpu"))
    with capsys.disabled():
        print_table("run table, CPU twin (tiny model; the GPU suite prints the same at bumblebee-1.5b's shapes)",
                    COLUMNS, rows)
        print("\n".join(notes))
    assert not failures, "\n".join(failures)
    labels = [row[0] for row in rows]
    assert sum(label.startswith("pretrain shipped") for label in labels) == 2  # compile off and on
    assert sum(label.startswith("pretrain recommended") for label in labels) == 2
    assert any(label.startswith("sft padded") for label in labels) and any("sft packed" in x for x in labels)
    assert "dpo-lora step" in labels
    assert {"kernel rmsnorm", "kernel rope", "kernel cross entropy rows"} <= set(labels)
    assert all(len(row) == len(COLUMNS) for row in rows)
    for row in rows:
        if not row[0].startswith("kernel"):
            assert float(row[4].replace(",", "")) > 0, row  # real tokens/s
            assert row[5].startswith("n/a"), row  # no bf16 peak for a CPU
    real = {row[0].split()[1]: float(row[1].split(", ")[1].rstrip("% real"))
            for row in rows if row[0].startswith("sft")}
    assert real["packed"] > real["padded"], real  # packing leaves less padding than rows padded to the longest
    paths = " ".join(row[8] for row in rows)
    assert "attn " in paths and "LM head" in paths
    assert "FLOP convention" in notes[0]
