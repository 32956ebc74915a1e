"""train_sft.py end to end on small synthetic data."""

import os

import pytest
import torch
from conftest import REPO_ROOT
from copy_task import greedy_accuracy, make_base, make_words, write_sft_data
from helpers import read_metrics

import train_sft
from nanobumble.base.errors import UserError
from nanobumble.data.records import split_held_out
from nanobumble.data.sft_data import load_conversations, sample_targets, tokenize_sft
from nanobumble.run.metrics import MetricsLogger
from nanobumble.store.adapter import load_adapter
from nanobumble.store.checkpoint import list_checkpoints
from nanobumble.store.model_dir import load_model_dir

FAST = ["--system_prompt", "", "--val_ratio", "0", "--cutoff_len", "48", "--train_micro_batch_size_per_gpu", "16",
        "--use_tensorboard", "false", "--plot", "false", "--save_steps", "0", "--warmup_ratio", "0.1"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("copy")
    train_words = make_words(0, 3000)
    seen = set(train_words)
    held_out = [w for w in make_words(1, 400) if w not in seen][:40]
    tokenizer = make_base(str(root), train_words)
    write_sft_data(str(root / "train.jsonl"), train_words)
    return {"root": root, "tokenizer": tokenizer, "held_out": held_out}


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_sft_teaches_the_task_on_held_out_prompts(task, tmp_path, finetuning_type):
    root, tokenizer = task["root"], task["tokenizer"]
    base, _ = load_model_dir(str(root / "base"))
    assert greedy_accuracy(base, tokenizer, task["held_out"]) == 0.0

    out = str(tmp_path / "sft")
    args = FAST + ["--model_name_or_path", str(root / "base"), "--dataset_path", str(root / "train.jsonl"),
                   "--output_dir", out, "--max_steps", "300", "--learning_rate", "3e-3", "--logging_steps", "100",
                   "--finetuning_type", finetuning_type]
    if finetuning_type == "lora":
        args += ["--lora_target_modules", "all", "--lora_rank", "16", "--lora_alpha", "32", "--lora_dropout", "0"]
    train_sft.main(args)

    if finetuning_type == "lora":
        assert sorted(os.listdir(out)) == [".lock", ".nanobumble-files", "adapter_config.json",
                                           "adapter_model.safetensors", "complete.json", "config.json",
                                           "metrics.jsonl", "tokenizer.model", "training_args.yaml"]
        model, _ = load_model_dir(str(root / "base"))
        load_adapter(model, out)
    else:
        assert "model.safetensors" in os.listdir(out)
        model, _ = load_model_dir(out)
    assert greedy_accuracy(model, tokenizer, task["held_out"]) >= 0.7


def test_sft_kill_and_resume_gives_the_uninterrupted_losses(task, tmp_path, monkeypatch):
    root = task["root"]
    common = FAST + ["--model_name_or_path", str(root / "base"), "--dataset_path", str(root / "train.jsonl"),
                     "--max_steps", "6", "--save_steps", "3", "--logging_steps", "1", "--finetuning_type", "lora",
                     "--packing", "true", "--lora_dropout", "0.1", "--save_total_limit", "0"]
    train_sft.main(common + ["--output_dir", str(tmp_path / "straight")])
    expected = read_metrics(str(tmp_path / "straight"))

    killed = str(tmp_path / "killed")
    original_log = MetricsLogger.log

    def log_then_die(self, step, scalars):
        original_log(self, step, scalars)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsLogger, "log", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_sft.main(common + ["--output_dir", killed])
    monkeypatch.setattr(MetricsLogger, "log", original_log)
    assert [s for s, _ in list_checkpoints(killed)] == [3]
    assert os.path.isfile(os.path.join(killed, "checkpoint-3", "adapter_model.safetensors"))

    train_sft.main(common + ["--output_dir", killed, "--resume", "auto"])
    resumed = read_metrics(killed)
    assert [m["step"] for m in resumed] == [m["step"] for m in expected] == list(range(1, 7))
    for a, b in zip(expected, resumed):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-6)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-5)


def test_sft_refuses_an_adapter_or_missing_model(task, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="merge_lora"):
        train_sft.main(FAST + ["--model_name_or_path", str(adapter), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(UserError, match="no config.json"):
        train_sft.main(FAST + ["--model_name_or_path", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_a_lora_run_over_a_full_model_leaves_no_full_model_behind(task, tmp_path):
    """--overwrite_output_dir removes what the full run wrote: no mixed directory whose old
    model.safetensors a loader would take instead of the adapter."""
    root, out = task["root"], str(tmp_path / "sft")
    args = FAST + ["--model_name_or_path", str(root / "base"), "--dataset_path", str(root / "train.jsonl"),
                   "--output_dir", out, "--max_steps", "2", "--logging_steps", "1"]
    train_sft.main(args)
    assert "model.safetensors" in os.listdir(out)
    train_sft.main(args + ["--finetuning_type", "lora", "--overwrite_output_dir", "true", "--lora_dropout", "0"])
    names = os.listdir(out)
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    model, _ = load_model_dir(str(root / "base"))
    load_adapter(model, out)
    assert read_metrics(out)[0]["step"] == 1 and len([m for m in read_metrics(out) if "train/loss" in m]) == 2


def test_loss_weighs_every_trained_token_equally(task, tmp_path):
    # Two micro-steps of 8 rows with different numbers of answer tokens must give
    # the same first-step loss and gradient norm as one micro-step of 16 rows.
    root = task["root"]
    common = ["--model_name_or_path", str(root / "base"), "--dataset_path", str(root / "train.jsonl"),
              "--system_prompt", "", "--val_ratio", "0", "--cutoff_len", "32", "--use_tensorboard", "false", "--plot", "false", "--save_steps", "0",
              "--max_steps", "1", "--logging_steps", "1"]
    train_sft.main(common + ["--train_micro_batch_size_per_gpu", "16", "--output_dir", str(tmp_path / "one")])
    train_sft.main(common + ["--train_micro_batch_size_per_gpu", "8", "--gradient_accumulation_steps", "2",
                             "--output_dir", str(tmp_path / "two")])
    one, two = read_metrics(str(tmp_path / "one"))[0], read_metrics(str(tmp_path / "two"))[0]
    assert two["train/loss"] == pytest.approx(one["train/loss"], rel=1e-6)
    assert two["train/grad_norm"] == pytest.approx(one["train/grad_norm"], rel=1e-5)
    a, _ = load_model_dir(str(tmp_path / "one"))
    b, _ = load_model_dir(str(tmp_path / "two"))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # fp32 summation order; a weighting bug moves ~lr


def test_validation_loss_is_the_final_models_loss_on_the_held_out_conversations(task, tmp_path, capsys):
    root, tokenizer = task["root"], task["tokenizer"]
    out = str(tmp_path / "sft")
    train_sft.main(FAST + ["--model_name_or_path", str(root / "base"), "--dataset_path", str(root / "train.jsonl"),
                           "--output_dir", out, "--max_steps", "40", "--learning_rate", "3e-3", "--logging_steps", "20",
                           "--val_ratio", "0.05", "--eval_steps", "20", "--eval_rows", "800",
                           "--train_model_precision", "fp32"])  # checked against fp32 by hand (auto: bf16 on AMX)
    printed = capsys.readouterr().out
    val = [m for m in read_metrics(out) if "val/loss" in m]
    assert [m["step"] for m in val] == [20, 40] and val[1]["val/loss"] < val[0]["val/loss"]

    # Which conversations are held out: split_held_out's rule on the tokenized samples.
    conversations = load_conversations(str(root / "train.jsonl"), quiet=True)
    samples, _ = tokenize_sft(conversations, tokenizer, 48, system_prompt="", quiet=True)
    train, held_out = split_held_out(samples, 0.05)
    assert 100 < len(held_out) < 200 and len(train) + len(held_out) == 3000
    assert f"validation: {len(held_out)} held-out conversations" in printed and f"data: {len(train)} rows" in printed
    model, _ = load_model_dir(out)
    nats = tokens = 0
    with torch.no_grad():
        for ids, mask in held_out:
            x, y = (torch.from_numpy(a)[None] for a in sample_targets(ids, mask))
            nats += model(x, y, reduction="sum").item()
            tokens += int((y != -100).sum())
    assert val[-1]["val/loss"] == pytest.approx(nats / tokens, rel=1e-5)


def test_an_eval_dataset_replaces_the_split(task, tmp_path, capsys):
    root = task["root"]
    write_sft_data(str(tmp_path / "eval.jsonl"), task["held_out"])
    out = str(tmp_path / "sft")
    train_sft.main(FAST + ["--model_name_or_path", str(root / "base"), "--dataset_path", str(root / "train.jsonl"),
                           "--output_dir", out, "--max_steps", "2", "--logging_steps", "1", "--val_ratio", "0.05",
                           "--eval_dataset_path", str(tmp_path / "eval.jsonl")])
    printed = capsys.readouterr().out
    assert f"validation: {len(task['held_out'])} held-out conversations from {tmp_path / 'eval.jsonl'}" in printed
    assert "data: 3000 rows" in printed  # all of dataset_path trains
    assert [m["step"] for m in read_metrics(out) if "val/loss" in m] == [2]


def test_eval_tasks_run_at_eval_steps(task, tmp_path, capsys):
    root = task["root"]
    tasks = ",".join(os.path.join(REPO_ROOT, "datasets", "eval", name) for name in ("qa_exact.jsonl", "text_bpb.jsonl"))
    out = str(tmp_path / "sft")
    train_sft.main(FAST + ["--model_name_or_path", str(root / "base"), "--dataset_path", str(root / "train.jsonl"),
                           "--output_dir", out, "--max_steps", "2", "--logging_steps", "1", "--eval_steps", "1",
                           "--eval_tasks", tasks])
    evaluated = [m for m in read_metrics(out) if "eval/qa_exact/exact_match" in m]
    assert [m["step"] for m in evaluated] == [1, 2]
    assert all(m["eval/text_bpb/bpb"] > 0 and 0 <= m["eval/qa_exact/exact_match"] <= 1 for m in evaluated)
    assert "eval/text_bpb/bpb" in capsys.readouterr().out
    with pytest.raises(UserError, match="no_such_task.jsonl"):  # checked before training starts
        train_sft.main(FAST + ["--model_name_or_path", str(root / "base"), "--dataset_path", str(root / "train.jsonl"),
                               "--output_dir", str(tmp_path / "bad"), "--eval_tasks", str(tmp_path / "no_such_task.jsonl")])
    assert not os.path.exists(tmp_path / "bad" / "metrics.jsonl")
