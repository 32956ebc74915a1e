"""Peak host memory per rank while 2 gloo ranks save a checkpoint of a sharded
model (weights and AdamW moments), gathered whole onto rank 0 or streamed tensor
by tensor into the files: `python -m pytest -m bench tests/bench/test_bench_save.py -s`.

Each way runs in fresh processes (tests/bench_save.py), so memory one way freed
cannot hide inside the other's numbers. Prints a table; asserts no memory.
"""

import json

import pytest
from conftest import print_table
from runs import launch

pytestmark = pytest.mark.bench


def test_bench_save_memory(tmp_path, capsys):
    (tmp_path / "tokenizer.model").write_bytes(b"not a real tokenizer (the bench only writes it)")
    rows = []
    for mode in ("gathered", "streamed"):
        result = launch(2, [mode, str(tmp_path)], script="tests/bench_save.py", timeout=180)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        for rank in (0, 1):
            m = json.loads((tmp_path / f"{mode}-rank{rank}.json").read_text())
            model_mib = m["model_mib"]
            rows.append([mode, rank, f"{m['before_mib']:,.0f}", f"{m['peak_mib']:,.0f}",
                         f"{m['peak_mib'] - m['before_mib']:,.0f}", f"{m['seconds']:.2f}"])
    with capsys.disabled():
        print_table(f"host memory per rank while saving a checkpoint of a {model_mib:,.0f} MiB (fp32) model "
                    f"and its {2 * model_mib:,.0f} MiB of AdamW moments from 2 gloo ranks",
                    ["save", "rank", "RSS before (MiB)", "peak in save (MiB)", "peak - before (MiB)", "save (s)"],
                    rows)
        print("(gathered: rank 0 holds the whole model and optimizer state, then writes. streamed: each rank "
              "holds one gathered tensor at a time, rank 0 writes it at once; the largest is the 125 MiB "
              "embedding and its moments, which gloo's all-gather briefly needs twice)")
