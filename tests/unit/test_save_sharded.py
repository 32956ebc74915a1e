"""Saving a sharded model: 2 gloo ranks write the same model.safetensors and
adapter_model.safetensors as 1 process, and only rank 0 builds the full state
(tests/save_sharded.py is the script each run executes)."""

import json
import os

import pytest
import torch
from runs import launch
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{1: dir saved by 1 process, 2: dir saved by 2 ranks}, from the same seeds."""
    dirs = {}
    for nproc in (1, 2):
        out_dir = tmp_path_factory.mktemp(f"saved{nproc}")
        (out_dir / "tokenizer.model").write_bytes(b"not a real tokenizer")
        result = launch(nproc, [str(out_dir)], script="tests/save_sharded.py", timeout=240)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        dirs[nproc] = out_dir
    return dirs


@pytest.mark.parametrize("sub,name", [("full", "model.safetensors"), ("adapter", "adapter_model.safetensors"),
                                      ("adapter", "adapter_config.json")])
def test_two_ranks_save_what_one_process_saves(saved, sub, name):
    one, two = saved[1] / sub / name, saved[2] / sub / name
    if name.endswith(".safetensors"):
        a, b = load_file(one), load_file(two)
        assert list(a) == list(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert one.read_bytes() == two.read_bytes()
    assert not [f for f in os.listdir(saved[2] / sub) if ".tmp-" in f]  # nothing half-written left behind


def test_the_saved_files_say_something(saved):
    full = load_file(saved[2] / "full" / "model.safetensors")
    assert "lm_head.weight" not in full and "embed_tokens.weight" in full  # tied: stored once
    adapter = load_file(saved[2] / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 2 * 7  # lora_A and lora_B, in 2 layers, on all 7 projections
    assert all(t.abs().sum() > 0 for name, t in adapter.items() if name.endswith(".lora_B"))


def test_only_rank_zero_builds_the_full_state(saved):
    kept = [json.loads((saved[2] / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert kept[0] == {"model": len(load_file(saved[2] / "full" / "model.safetensors")),
                       "adapter": len(load_file(saved[2] / "adapter" / "adapter_model.safetensors"))}
    assert kept[1] == {"model": 0, "adapter": 0}
    assert json.loads((saved[1] / "rank0.json").read_text()) == kept[0]  # one process is rank 0
