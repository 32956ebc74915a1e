"""The pretraining script end to end, on the bundled data, at a few steps."""

import os

import pytest
import torch
from conftest import REPO_ROOT
from helpers import read_metrics
from runs import FAST, cli, run

from nanobumble.base.errors import DataError, UserError
from nanobumble.model.transformer import Transformer
from nanobumble.run.metrics import MetricsLogger
from nanobumble.store.checkpoint import list_checkpoints
from nanobumble.store.model_dir import load_model_dir


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))  # the tokenizer is trained once for the module


def run_until_killed(monkeypatch, argv, step: int) -> None:
    """Run, and stop it dead (KeyboardInterrupt) right after `step` is logged."""
    original_log = MetricsLogger.log

    def log_then_die(self, logged_step, scalars):
        original_log(self, logged_step, scalars)
        if logged_step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsLogger, "log", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(argv)
    monkeypatch.setattr(MetricsLogger, "log", original_log)


def test_kill_and_resume_gives_the_uninterrupted_losses(tmp_path, cache_dir, monkeypatch):
    common = FAST + ["--max_steps", "8", "--save_steps", "3", "--eval_steps", "4", "--cache_dir", cache_dir,
                     "--logging_steps", "1", "--save_total_limit", "0"]
    run(common + ["--output_dir", str(tmp_path / "straight")])
    expected = read_metrics(str(tmp_path / "straight"))

    killed = str(tmp_path / "killed")
    run_until_killed(monkeypatch, common + ["--output_dir", killed], step=5)  # after checkpoint-3 and two more steps
    assert [s for s, _ in list_checkpoints(killed)] == [3]
    assert read_metrics(killed)[-1]["step"] == 5

    run(common + ["--output_dir", killed, "--resume", "auto"])
    resumed = read_metrics(killed)
    assert [m["step"] for m in resumed] == [m["step"] for m in expected]
    for a, b in zip(expected, resumed):
        for key in a:
            if key != "train/tokens_per_sec":
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    a, _ = load_model_dir(str(tmp_path / "straight"))
    b, _ = load_model_dir(killed)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_resume_survives_rotation_deleting_the_checkpoint_it_started_from(tmp_path, cache_dir, monkeypatch):
    # The resumed run loaded its tokenizer from checkpoint-3; save_total_limit 2
    # deletes checkpoint-3 at the save of step 5, and the saves after it (and the
    # final model) must still have a tokenizer to write.
    common = FAST + ["--max_steps", "7", "--save_steps", "1", "--save_total_limit", "2", "--eval_steps", "0",
                     "--cache_dir", cache_dir, "--output_dir", str(tmp_path)]
    run_until_killed(monkeypatch, common + ["--logging_steps", "1"], step=3)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [1, 2]  # killed before checkpoint-3 was saved

    run(common + ["--logging_steps", "1", "--resume", "auto"])
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [6, 7]
    for directory in [tmp_path, tmp_path / "checkpoint-6", tmp_path / "checkpoint-7"]:
        assert (directory / "tokenizer.model").read_bytes() == (tmp_path / "checkpoint-7" / "tokenizer.model").read_bytes()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp")]
    load_model_dir(str(tmp_path))  # the final model is complete


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, cache_dir, monkeypatch):
    out = tmp_path / "nan"
    calls = {"n": 0}
    original_forward = Transformer.forward

    def forward_nan_at_step_5(self, *args, **kwargs):
        out = original_forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 5:
                return out * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", forward_nan_at_step_5)
    with pytest.raises(UserError, match=r"at step 5.*checkpoint-4"):
        run(FAST + ["--max_steps", "10", "--save_steps", "2", "--cache_dir", cache_dir, "--output_dir", str(out)])
    assert [s for s, _ in list_checkpoints(str(out))] == [2, 4]
    model, _ = load_model_dir(str(out / "checkpoint-4"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_existing_checkpoints_are_not_overwritten_without_resume(tmp_path, cache_dir):
    args = FAST + ["--max_steps", "2", "--save_steps", "2", "--cache_dir", cache_dir, "--output_dir", str(tmp_path)]
    run(args)
    weights = (tmp_path / "checkpoint-2" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds checkpoints"):
        run(args)
    assert (tmp_path / "checkpoint-2" / "model.safetensors").read_bytes() == weights


def test_bad_input_stops_before_training_with_a_clear_message(tmp_path, cache_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = cli(["--dataset_path", str(empty), "--cache_dir", str(tmp_path / "c"), "--output_dir", str(tmp_path / "o")])
    assert result.returncode == 2 and "empty.jsonl" in result.stderr and "Traceback" not in result.stderr

    result = cli(["--dataset_path", str(tmp_path / "nope.jsonl"), "--output_dir", str(tmp_path / "o")])
    assert result.returncode == 2 and "nope.jsonl" in result.stderr

    result = cli(["--cutoff_len", "4096", "--cache_dir", cache_dir, "--output_dir", str(tmp_path / "o")])
    assert result.returncode == 2 and "max_position_embeddings" in result.stderr

    result = cli(["--learnig_rate", "1"])
    assert result.returncode == 2 and "learning_rate" in result.stderr
    assert not (tmp_path / "o").exists()


def test_tokenizer_mismatches_are_refused(tmp_path, cache_dir):
    model_dir = tmp_path / "m"
    run(FAST + ["--max_steps", "1", "--save_steps", "0", "--cache_dir", cache_dir, "--output_dir", str(model_dir)])

    # Shards tokenized with another tokenizer than the model's own.
    other_shards = tmp_path / "shards"
    from nanobumble import prepare
    prepare.main(["--dataset_path", os.path.join(REPO_ROOT, "datasets/pretrain/en.jsonl"),
                  "--output_dir", str(other_shards), "--vocab_size", "1000", "--num_workers", "1"])
    with pytest.raises(DataError, match="tokenizer/shard mismatch"):
        run(FAST + ["--max_steps", "1", "--model_name_or_path", str(model_dir), "--dataset_path", str(other_shards),
                    "--output_dir", str(tmp_path / "x")])

    # A model whose vocabulary is smaller than its tokenizer's.
    config = model_dir / "config.json"
    config.write_text(config.read_text().replace('"vocab_size": 4096', '"vocab_size": 1024'))
    with pytest.raises(UserError, match="tokenizer has 4096 tokens but the model's vocabulary is 1024"):
        run(FAST + ["--max_steps", "1", "--model_name_or_path", str(model_dir), "--cache_dir", cache_dir,
                    "--output_dir", str(tmp_path / "y")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
