"""`pytest -m bench` is the kernel and training benchmarks, a run of minutes; the long
ones (the 3-seed quality and rounds runs, GB-scale data preparation, tokenizer training) run under
`-m bench_long` only, and the default run has neither. Checked with pytest's own
collection (pytest.ini's addopts and markers included), in a fresh process."""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT

LONG = {"test_bench_quality.py", "test_bench_rounds.py", "test_bench_prepare.py", "test_bench_tokenizer.py"}
KERNELS = {"test_bench_rmsnorm.py", "test_bench_rope.py", "test_bench_cross_entropy.py"}

# Three collections in one process: the bench modules are imported once.
_COLLECT = """
import json
import pytest

class Files:
    files = ()
    def pytest_collection_finish(self, session):
        self.files = sorted({item.path.name for item in session.items})

found = {}
for label, marker in (("default", []), ("bench", ["-m", "bench"]), ("bench_long", ["-m", "bench_long"])):
    files = Files()
    pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider", *marker, "tests/bench"], plugins=[files])
    found[label] = files.files
print("FOUND " + json.dumps(found))
"""


def test_long_benchmarks_have_their_own_marker():
    result = subprocess.run([sys.executable, "-c", _COLLECT], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    lines = [line for line in result.stdout.splitlines() if line.startswith("FOUND ")]
    assert lines, result.stdout[-3000:] + result.stderr[-3000:]
    found = {label: set(files) for label, files in json.loads(lines[-1][len("FOUND "):]).items()}
    every = {name for name in os.listdir(os.path.join(REPO_ROOT, "tests", "bench"))
             if name.startswith("test_") and name.endswith(".py")}
    assert not found["default"]  # the default run has no benchmark
    assert not found["bench"] & LONG, found["bench"] & LONG
    assert found["bench_long"] == LONG
    assert KERNELS <= found["bench"]
    assert found["bench"] | found["bench_long"] == every  # every benchmark runs under one of the two
