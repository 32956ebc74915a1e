"""Peak host memory per rank while 2 gloo ranks save a sharded model, before and
after gathering tensor by tensor onto rank 0: `python -m pytest -m bench tests/test_bench_save.py -s`.

Each way runs in fresh processes (tests/bench_save.py), so memory one way freed
cannot hide inside the other's numbers. Prints a table; asserts no memory.
"""

import json

import pytest

from conftest import print_table
from test_distributed import launch

pytestmark = pytest.mark.bench


def test_bench_save_memory(tmp_path, capsys):
    (tmp_path / "tokenizer.model").write_bytes(b"not a real tokenizer")
    rows = []
    for mode in ("old", "new"):
        result = launch(2, [mode, str(tmp_path)], script="tests/bench_save.py", timeout=180)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        for rank in (0, 1):
            m = json.loads((tmp_path / f"{mode}-rank{rank}.json").read_text())
            model_mib = m["model_mib"]
            rows.append([mode, rank, f"{m['before_mib']:,.0f}", f"{m['peak_mib']:,.0f}",
                         f"{m['peak_mib'] - m['before_mib']:,.0f}", f"{m['seconds']:.2f}"])
    with capsys.disabled():
        print_table(f"host memory per rank while saving a {model_mib:,.0f} MiB (fp32) model from 2 gloo ranks",
                    ["gather", "rank", "RSS before (MiB)", "peak in save (MiB)", "peak - before (MiB)", "save (s)"],
                    rows)
        print("(old: every rank gathers and keeps the whole model. new: tensor by tensor, kept on rank 0 only; "
              "rank 1 holds one gathered tensor at a time, the largest being the 125 MiB embedding, which "
              "gloo's all-gather briefly needs twice)")
