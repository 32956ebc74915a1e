"""train_dpo.py end to end on the synthetic copy task (chosen = the copy,
rejected = the word reversed)."""

import json
import math

import pytest
import torch
from copy_task import greedy_accuracy, make_base, make_words, write_dpo_data, write_sft_data
from helpers import read_metrics

import train_dpo
import train_sft
from nanobumble.data.dpo_data import PreferenceDataset, load_preference_pairs, tokenize_pairs
from nanobumble.model.dpo import batch_logps
from nanobumble.model.lora import disable_adapters, inject_lora
from nanobumble.run.metrics import MetricsLogger
from nanobumble.store.adapter import load_adapter
from nanobumble.store.checkpoint import list_checkpoints
from nanobumble.store.model_dir import load_model_dir

FAST = ["--system_prompt", "", "--val_ratio", "0", "--cutoff_len", "48", "--use_tensorboard", "false",
        "--plot", "false", "--save_steps", "0", "--warmup_ratio", "0.1"]
# For runs compared with fp32 computations by hand (precision auto is bf16 on a CPU with native bf16)
FP32 = ["--train_model_precision", "fp32"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A base model briefly fine-tuned on the copy task: it copies some held-out
    words right and gets others wrong, leaving room for preferences to help."""
    root = tmp_path_factory.mktemp("dpo")
    train_words = make_words(0, 3000)
    seen = set(train_words)
    held_out = [w for w in make_words(1, 400) if w not in seen and w != w[::-1]][:40]
    tokenizer = make_base(str(root), train_words)
    write_sft_data(str(root / "sft.jsonl"), train_words)
    write_dpo_data(str(root / "dpo.jsonl"), make_words(2, 2000))
    write_dpo_data(str(root / "held_out.jsonl"), held_out)
    train_sft.main(FAST + ["--model_name_or_path", str(root / "base"), "--dataset_path", str(root / "sft.jsonl"),
                           "--output_dir", str(root / "sft"), "--max_steps", "200", "--learning_rate", "3e-3",
                           "--train_micro_batch_size_per_gpu", "16", "--logging_steps", "40"])
    return {"root": root, "tokenizer": tokenizer, "held_out": held_out}


def dpo_args(task, output_dir, *extra):
    root = task["root"]
    return FAST + ["--model_name_or_path", str(root / "sft"), "--dataset_path", str(root / "dpo.jsonl"),
                   "--output_dir", str(output_dir), "--train_micro_batch_size_per_gpu", "8"] + list(extra)


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_first_step_loss_is_ln2_with_zero_rewards(task, tmp_path, finetuning_type):
    # Before the first update the policy is the reference: d = 0 for every pair.
    train_dpo.main(dpo_args(task, tmp_path, "--max_steps", "1", "--logging_steps", "1", "--sft_weight", "0",
                            "--finetuning_type", finetuning_type))
    first = read_metrics(str(tmp_path))[0]
    assert first["train/loss"] == first["train/preference_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["train/nll_loss"] > 0  # logged (TRL's nll_loss) though sft_weight 0 leaves it out of the loss
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0, abs=1e-6)
    assert first["rewards/accuracies"] == 0.0  # a tie is not a win


def held_out_batch(task):
    pairs = load_preference_pairs(str(task["root"] / "held_out.jsonl"), quiet=True)
    tokenized, _ = tokenize_pairs(pairs, task["tokenizer"], 48, system_prompt="", quiet=True)
    dataset = PreferenceDataset(tokenized)
    return dataset.batch_of_pairs(range(dataset.num_pairs))


def test_lora_reference_is_the_base_model(task):
    # Adapters switched off give the log-probs of a separate frozen copy.
    batch = held_out_batch(task)
    policy, _ = load_model_dir(str(task["root"] / "sft"))
    inject_lora(policy, rank=4, alpha=8, dropout=0.0, target_modules="all")
    for name, param in policy.named_parameters():
        if name.endswith("lora_B"):
            param.data.normal_(0, 0.1)  # an adapter that changes the outputs
    frozen, _ = load_model_dir(str(task["root"] / "sft"))
    with torch.no_grad():
        adapted = batch_logps(policy, batch["input_ids"], batch["labels"])[0]
        with disable_adapters(policy):
            switched_off = batch_logps(policy, batch["input_ids"], batch["labels"])[0]
        reference = batch_logps(frozen, batch["input_ids"], batch["labels"])[0]
    torch.testing.assert_close(switched_off, reference, rtol=0, atol=0)
    assert not torch.allclose(adapted, reference)


# Each variant trains 150 steps; plain DPO (sft_weight 0) runs under -m slow, to keep the default run short
@pytest.mark.parametrize("sft_weight", [pytest.param(0.0, marks=pytest.mark.slow), 1.0])
def test_dpo_prefers_the_chosen_answers_on_held_out_pairs(task, tmp_path, sft_weight):
    root, tokenizer, held_out = task["root"], task["tokenizer"], task["held_out"]
    out = tmp_path / "dpo"
    train_dpo.main(dpo_args(task, out, "--max_steps", "150", "--learning_rate", "5e-4", "--logging_steps", "50",
                            "--lora_target_modules", "all", "--lora_rank", "16", "--lora_alpha", "32",
                            "--lora_dropout", "0", "--sft_weight", str(sft_weight), "--pref_beta", "0.1", *FP32))
    reference, _ = load_model_dir(str(root / "sft"))
    policy, _ = load_model_dir(str(root / "sft"))
    load_adapter(policy, str(out))

    batch = held_out_batch(task)
    n = len(batch["pair_ids"])
    with torch.no_grad():
        ref = batch_logps(reference, batch["input_ids"], batch["labels"])[0]
        pi = batch_logps(policy, batch["input_ids"], batch["labels"])[0]
    chosen_change, rejected_change = pi[:n] - ref[:n], pi[n:] - ref[n:]
    reward_accuracy = (chosen_change > rejected_change).float().mean().item()
    assert reward_accuracy >= 0.75  # chance is 0.5
    assert rejected_change.mean() < chosen_change.mean() - 1.0

    if sft_weight > 0:
        # Plain DPO may lower both answers' log-probs (only their gap matters to
        # it); with the SFT term the chosen answers become likelier and greedy
        # answers turn into them.
        assert chosen_change.mean() > 0
        before = greedy_accuracy(reference, tokenizer, held_out)
        after = greedy_accuracy(policy, tokenizer, held_out)
        # At least a tenth of the held-out words more, counted in words: as fractions,
        # 0.325 + 0.1 > 0.425 in floating point, which failed a gain of exactly 4 of 40.
        gained = round((after - before) * len(held_out))
        assert gained >= len(held_out) // 10, (before, after)


def test_precomputed_reference_gives_the_same_run(task, tmp_path):
    # Full fine-tuning: a frozen copy scores each batch, or scores every pair once up front.
    args = ["--max_steps", "3", "--logging_steps", "1", "--finetuning_type", "full", "--learning_rate", "1e-3"]
    train_dpo.main(dpo_args(task, tmp_path / "live", *args))
    train_dpo.main(dpo_args(task, tmp_path / "pre", *args, "--precompute_ref_log_probs", "true"))
    live, pre = read_metrics(str(tmp_path / "live")), read_metrics(str(tmp_path / "pre"))
    assert len(live) == len(pre) == 3
    for a, b in zip(live, pre):
        for key in ("train/loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "train/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert live[-1]["rewards/margins"] != 0  # the policy did move away from the reference


def test_dpo_kill_and_resume_gives_the_uninterrupted_metrics(task, tmp_path, monkeypatch):
    args = ["--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--save_total_limit", "0",
            "--learning_rate", "1e-3"]
    train_dpo.main(dpo_args(task, tmp_path / "straight", *args))
    expected = read_metrics(str(tmp_path / "straight"))

    killed = tmp_path / "killed"
    original_log = MetricsLogger.log

    def log_then_die(self, step, scalars):
        original_log(self, step, scalars)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsLogger, "log", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_dpo.main(dpo_args(task, killed, *args))
    monkeypatch.setattr(MetricsLogger, "log", original_log)
    assert [s for s, _ in list_checkpoints(str(killed))] == [2]
    train_dpo.main(dpo_args(task, killed, *args, "--resume", "auto"))
    resumed = read_metrics(str(killed))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(expected, resumed):
        for key in ("train/loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "train/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_validation_metrics_are_the_final_policys_on_the_held_out_pairs(task, tmp_path):
    root = task["root"]
    out = tmp_path / "dpo"
    train_dpo.main(dpo_args(task, out, "--max_steps", "20", "--learning_rate", "2e-3", "--logging_steps", "10",
                            "--eval_steps", "10", "--eval_rows", "400", "--lora_dropout", "0", "--pref_beta", "0.1",
                            "--sft_weight", "0.5", "--eval_dataset_path", str(root / "held_out.jsonl"), *FP32))
    val = [m for m in read_metrics(str(out)) if "val/drift/chosen" in m]
    assert [m["step"] for m in val] == [10, 20]

    # By hand: the reference (the SFT model) and the trained policy on all held-out pairs.
    reference, _ = load_model_dir(str(root / "sft"))
    policy, _ = load_model_dir(str(root / "sft"))
    load_adapter(policy, str(out))
    batch = held_out_batch(task)
    n = len(batch["pair_ids"])
    lengths = (batch["labels"] != -100).sum(-1).double()
    with torch.no_grad():
        ref = batch_logps(reference, batch["input_ids"], batch["labels"])[0].double()
        pi = batch_logps(policy, batch["input_ids"], batch["labels"])[0].double()
    drift = (pi - ref) / lengths
    rewards = 0.1 * (pi - ref)  # pref_beta 0.1
    final = val[-1]
    # the losses, logged alike in training and validation: TRL's names, the total as loss
    chosen = batch["labels"][:n] != -100
    with torch.no_grad():
        token_logps = batch_logps(policy, batch["input_ids"], batch["labels"])[1][:n].double()
    nll = -(token_logps * chosen).sum().item() / chosen.sum().item()  # per chosen token
    preference = -torch.nn.functional.logsigmoid(rewards[:n] - rewards[n:]).mean().item()
    assert final["val/nll_loss"] == pytest.approx(nll, rel=1e-4)
    assert final["val/preference_loss"] == pytest.approx(preference, rel=1e-4)
    assert final["val/loss"] == pytest.approx(preference + 0.5 * nll, rel=1e-4)  # sft_weight 0.5
    train = [m for m in read_metrics(str(out)) if "train/loss" in m]
    assert {key for key in train[-1] if "loss" in key} == {"train/loss", "train/preference_loss", "train/nll_loss"}
    assert {key for key in final if "loss" in key} == {"val/loss", "val/preference_loss", "val/nll_loss"}
    for m in train:
        assert m["train/loss"] == pytest.approx(m["train/preference_loss"] + 0.5 * m["train/nll_loss"], rel=1e-5)
    assert final["val/drift/chosen"] == pytest.approx(drift[:n].mean().item(), rel=1e-4, abs=1e-6)
    assert final["val/drift/rejected"] == pytest.approx(drift[n:].mean().item(), rel=1e-4, abs=1e-6)
    assert final["val/rewards/margins"] == pytest.approx((rewards[:n] - rewards[n:]).mean().item(), rel=1e-4)
    assert final["val/rewards/accuracies"] == pytest.approx((rewards[:n] > rewards[n:]).double().mean().item())
    assert final["val/logps/chosen"] == pytest.approx(pi[:n].mean().item(), rel=1e-4)
    assert final["val/rewards/accuracies"] > 0.5 and final["val/drift/rejected"] < final["val/drift/chosen"]


def test_the_displacement_warning_names_the_numbers_and_remedies():
    from nanobumble.model.dpo import displacement_warning
    from nanobumble.run.config import DPOConfig

    cfg = DPOConfig(max_chosen_logp_drop=0.5, learning_rate=5e-4, pref_beta=0.1, sft_weight=0.0, num_epochs=2)
    assert displacement_warning(-0.4, cfg) is None and displacement_warning(0.3, cfg) is None
    warning = displacement_warning(-0.83, cfg)
    for text in ("0.83 nats below the reference", "max_chosen_logp_drop 0.5", "learning_rate (now 0.0005)",
                 "pref_beta (now 0.1)", "sft_weight > 0 (now 0)", "num_epochs (now 2)"):
        assert text in warning
    cfg.max_chosen_logp_drop = 0
    assert displacement_warning(-100.0, cfg) is None  # off


def test_eval_tasks_run_without_validation_data(task, tmp_path):
    text = str(task["root"].parent / "text.jsonl")
    with open(text, "w") as f:
        f.write('{"text": "copy abc"}\n{"text": "copy de"}\n')
    out = tmp_path / "dpo"
    train_dpo.main(dpo_args(task, out, "--max_steps", "2", "--logging_steps", "1", "--eval_steps", "2",
                            "--eval_tasks", text))  # val_ratio 0 (FAST): the benchmark file alone
    evaluated = [m for m in read_metrics(str(out)) if "eval/text/bpb" in m]
    assert [m["step"] for m in evaluated] == [2] and evaluated[0]["eval/text/bpb"] > 0
    assert not any("val/drift/chosen" in m for m in read_metrics(str(out)))


def test_the_displacement_warning_fires_when_over_optimised_and_not_at_the_defaults(task, tmp_path, capsys):
    held_out = ["--eval_dataset_path", str(task["root"] / "held_out.jsonl"), "--logging_steps", "50"]
    # The old defaults, pushed harder: both answers are pushed down, the chosen ones too.
    train_dpo.main(dpo_args(task, tmp_path / "over", *held_out, "--max_steps", "60", "--learning_rate", "5e-3",
                            "--pref_beta", "0.1", "--sft_weight", "0"))
    printed = capsys.readouterr().out
    final = [m for m in read_metrics(str(tmp_path / "over")) if "val/drift/chosen" in m][-1]
    assert final["val/drift/chosen"] < -0.1
    assert f"{-final['val/drift/chosen']:.2f} nats below the reference's (max_chosen_logp_drop 0.1)" in printed
    # The defaults (learning rate, beta, sft_weight, one epoch): no warning, and the chosen answers stay put.
    train_dpo.main(dpo_args(task, tmp_path / "default", *held_out))
    assert "likelihood displacement" not in capsys.readouterr().out
    final = [m for m in read_metrics(str(tmp_path / "default")) if "val/drift/chosen" in m][-1]
    assert final["val/drift/chosen"] > -0.1 and final["val/rewards/accuracies"] > 0.5


def test_two_rounds_on_the_models_own_answers(task, tmp_path):
    """The README's rounds, end to end: sample_pairs -> DPO (LoRA, eval_tasks) -> merge -> sample again.
    Each round starts from the previous round's merged model, which is also its reference."""
    from nanobumble import merge_lora, sample_pairs

    root = task["root"]
    prompts, held_out = tmp_path / "prompts.jsonl", tmp_path / "copy_held_out.jsonl"
    with open(prompts, "w") as f:
        for word in make_words(3, 24):
            f.write(json.dumps({"prompt": f"copy:\n{word}", "answer": word}) + "\n")
    with open(held_out, "w") as f:
        for word in task["held_out"][:10]:
            f.write(json.dumps({"prompt": f"copy:\n{word}", "answer": word}) + "\n")
    model = str(root / "sft")
    for r in (1, 2):
        pairs = str(tmp_path / f"pairs{r}.jsonl")
        sample_pairs.main(["--model_path", model, "--dataset_path", str(prompts), "--output_path", pairs,
                           "--num_samples", "4", "--max_new_tokens", "10", "--system_prompt", "",
                           "--device", "cpu", "--precision", "fp32", "--seed", str(r)])
        with open(pairs) as f:
            records = [json.loads(line) for line in f]
        assert records, "the model should get some copies wrong at temperature 1"
        for record in records:
            word = record["conversations"][0]["value"].split("\n")[1]
            assert record["chosen"]["value"] == word and record["rejected"]["value"] != word
        out = tmp_path / f"dpo{r}"
        train_dpo.main(FAST + FP32 + ["--model_name_or_path", model, "--dataset_path", pairs, "--output_dir",
                                      str(out), "--max_steps", "3", "--logging_steps", "1", "--eval_steps", "3",
                                      "--eval_tasks", str(held_out), "--learning_rate", "1e-3",
                                      "--train_micro_batch_size_per_gpu", "4"])
        metrics = read_metrics(str(out))
        assert metrics[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6)  # the reference is the starting model
        scores = [m["eval/copy_held_out/exact_match"] for m in metrics if "eval/copy_held_out/exact_match" in m]
        assert len(scores) == 1 and 0 <= scores[0] <= 1
        merge_lora.main(["--base_model_path", model, "--lora_model_path", str(out),
                         "--save_path", str(tmp_path / f"round{r}")])
        model = str(tmp_path / f"round{r}")
    assert load_model_dir(model)[0].config.vocab_size == load_model_dir(str(root / "sft"))[0].config.vocab_size
