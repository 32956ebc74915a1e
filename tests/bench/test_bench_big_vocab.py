"""Peak host memory of a validation batch and of a DPO step at vocab 151,936, with
the full [tokens x vocab] logits (before) and with the chunked LM head + loss
(after): `python -m pytest -m bench tests/bench/test_bench_big_vocab.py -s`.

Each measurement runs in a fresh process (tests/bench_big_vocab.py), so memory
one run freed cannot hide inside another's numbers. Prints a table; asserts
that before and after give the same numbers, and that after never needs as
much as one full logits tensor at the largest size (a 4x margin there).
"""

import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, print_table

pytestmark = pytest.mark.bench

VOCAB = 151_936
SIZES = [(2, 256), (4, 512), (8, 512)]  # rows x seq; DPO rows = 2 x pairs. "before" peaks near 5 GB at 8 x 512


def measure(tmp_path, case, way, rows, seq) -> dict:
    out = tmp_path / f"{case}-{way}-{rows}x{seq}.pt"
    cmd = [sys.executable, "tests/bench_big_vocab.py", case, way, str(rows), str(seq), str(out)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    m = torch.load(out)
    out.unlink()  # the embedding gradient is 37 MiB a file, and pytest keeps old tmp dirs
    m["extra_mib"] = m["peak_mib"] - m["before_mib"]
    return m


def test_bench_big_vocab_memory(tmp_path, capsys):
    rows_out = []
    for case in ("val", "dpo"):
        for rows, seq in SIZES:
            before, after = (measure(tmp_path, case, way, rows, seq) for way in ("before", "after"))
            if case == "val":
                torch.testing.assert_close(after["losses"], before["losses"], rtol=1e-4, atol=0)
            else:
                torch.testing.assert_close(after["loss"], before["loss"], rtol=1e-5, atol=0)
                grad = before["embed_grad"]  # tied: embedding + LM head; many rows are tiny
                torch.testing.assert_close(after["embed_grad"], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item())
            logits_mib = rows * seq * VOCAB * 4 / 2**20
            rows_out.append([case, f"{rows} x {seq}", f"{logits_mib:,.0f}", f"{before['extra_mib']:,.0f}",
                             f"{after['extra_mib']:,.0f}", f"{before['seconds']:.1f}", f"{after['seconds']:.1f}"])
        # The point of the change, by a wide margin: before holds the full logits at least once
        # (twice in fact); after never does, whatever the batch. Memory is per process, so
        # other load on the machine cannot make this flaky.
        assert after["extra_mib"] < logits_mib < before["extra_mib"], (case, before["extra_mib"], after["extra_mib"])
    with capsys.disabled():
        print_table(f"peak host memory above the baseline, vocab {VOCAB:,}, fp32, CPU, hidden 64, 1 layer",
                    ["case", "rows x seq", "fp32 logits (MiB)", "before (MiB)", "after (MiB)", "before (s)",
                     "after (s)"], rows_out)
        print("(val: one validation batch under no_grad. dpo: forward + backward of the sigmoid DPO loss, "
              "rows = 2 x pairs. before: logits = model(x), then F.cross_entropy / references.token_logps_reference. "
              "after: model(x, y, reduction='none') / dpo.batch_logps, chunks of 384 tokens (256 MiB budget))")
