"""Several processes on CPU (gloo), launched with torchrun: parity with one
process, real sharding, resume across world sizes, failure of one rank."""

import os
import re
import time

import pytest
from helpers import read_metrics
from runs import launch

# Runs compared number for number: fp32, as precision auto is bf16 on a CPU with native bf16 (AMX, AVX512-BF16)
FP32 = ["--train_model_precision", "fp32"]
FAST = ["--cutoff_len", "64", "--train_micro_batch_size_per_gpu", "4", "--logging_steps", "1",
        "--eval_rows", "8", "--use_tensorboard", "false", "--plot", "false", "--save_total_limit", "0", *FP32]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def run_ok(nproc, argv):
    result = launch(nproc, argv)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def losses(output_dir, key="train/loss"):
    return {m["step"]: m[key] for m in read_metrics(output_dir) if key in m}


def test_two_processes_match_one_and_shard_the_state(tmp_path, cache_dir):
    common = FAST + ["--max_steps", "20", "--save_steps", "0", "--eval_steps", "10", "--cache_dir", cache_dir]
    # The same global batch of 8 rows: 1 process x 2 micro-steps, or 2 processes x 1.
    run_ok(1, common + ["--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "one")])
    out = run_ok(2, common + ["--output_dir", str(tmp_path / "two")])

    one, two = losses(str(tmp_path / "one")), losses(str(tmp_path / "two"))
    assert sorted(one) == sorted(two) == list(range(1, 21))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    assert one[20] < one[1] - 0.5  # and it did learn
    val_one, val_two = losses(str(tmp_path / "one"), "val/loss"), losses(str(tmp_path / "two"), "val/loss")
    assert val_two[20] == pytest.approx(val_one[20], rel=1e-5)

    # Each rank holds about half of the parameters, and its AdamW moments for that half.
    held = re.findall(r"rank (\d): holds ([\d.]+) MiB of parameters and ([\d.]+) MiB of optimizer state "
                      r"\(of ([\d.]+) MiB", out)
    assert sorted(r for r, *_ in held) == ["0", "1"]
    for _, params, optim, total in held:
        params, optim, total = float(params), float(optim), float(total)
        assert 0.45 * total < params < 0.55 * total
        assert 0.9 * total < optim < 1.1 * total  # two moments of half the parameters


def test_resume_across_world_sizes(tmp_path, cache_dir):
    common = FAST + ["--max_steps", "8", "--save_steps", "4", "--eval_steps", "4", "--cache_dir", cache_dir]
    straight = str(tmp_path / "straight")
    run_ok(2, common + ["--output_dir", straight])
    expected = losses(straight)
    checkpoint = os.path.join(straight, "checkpoint-4")
    assert os.path.isfile(os.path.join(checkpoint, "optimizer.safetensors"))  # unsharded: any world size reads it

    # Continue the 2-process checkpoint with 1 process (same global batch, in 2 micro-steps or in one of 8 rows)
    # and with 2. Validation takes the same eval_rows rows whatever the micro-batch.
    for i, (nproc, extra) in enumerate([(1, ["--gradient_accumulation_steps", "2"]), (2, []),
                                        (1, ["--train_micro_batch_size_per_gpu", "8"])]):
        out = str(tmp_path / f"resumed{i}")
        run_ok(nproc, common + extra + ["--output_dir", out, "--resume", checkpoint])
        resumed = losses(out)
        assert sorted(resumed) == [5, 6, 7, 8]
        for step in resumed:
            assert resumed[step] == pytest.approx(expected[step], rel=1e-5), (nproc, step)
        val = losses(out, "val/loss")
        assert val[8] == pytest.approx(losses(straight, "val/loss")[8], rel=1e-5)


def test_one_failing_rank_ends_the_job(tmp_path, cache_dir):
    start = time.time()
    result = launch(2, FAST + ["--max_steps", "5", "--cache_dir", cache_dir, "--output_dir", str(tmp_path)],
                    script="tests/fail_on_rank1.py", timeout=240)
    assert result.returncode != 0
    assert "truncated shard (seen by rank 1 only)" in result.stdout + result.stderr
    assert time.time() - start < 200  # ended by the failure, not by the collective timeout


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_after_the_collective_timeout(tmp_path, cache_dir):
    start = time.time()
    result = launch(2, FAST + ["--max_steps", "50", "--cache_dir", cache_dir, "--output_dir", str(tmp_path),
                               "--collective_timeout_minutes", "0.2"],
                    script="tests/stall_rank.py", timeout=400, env={"STALL": "stop"})
    took = time.time() - start
    assert result.returncode != 0 and "step 50/50" not in result.stdout
    # 12 s of timeout, then torchrun stops the job (it waits up to 30 s for a stopped process to end)
    assert took < 150, (took, result.stderr[-3000:])
    print(f"stopped rank: job ended after {took:.0f} s")


@pytest.mark.slow
def test_data_preparation_may_take_longer_than_the_collective_timeout(tmp_path, cache_dir):
    start = time.time()
    result = launch(2, FAST + ["--max_steps", "2", "--cache_dir", cache_dir, "--output_dir", str(tmp_path),
                               "--collective_timeout_minutes", "0.1"],
                    script="tests/stall_rank.py", env={"STALL": "prepare"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.time() - start > 20 and "step 2/2" in result.stdout


@pytest.fixture(scope="module")
def copy_task_dir(tmp_path_factory):
    from copy_task import make_base, make_words, write_dpo_data, write_sft_data
    root = tmp_path_factory.mktemp("copy")
    make_base(str(root), make_words(0, 500))
    write_sft_data(str(root / "sft.jsonl"), make_words(0, 500))
    write_dpo_data(str(root / "dpo.jsonl"), make_words(1, 300))
    return root


@pytest.mark.parametrize("script,extra", [
    ("train_sft.py", ["--finetuning_type", "lora", "--packing", "true", "--lora_dropout", "0",
                      "--dataset_path", "sft.jsonl"]),
    ("train_dpo.py", ["--finetuning_type", "full", "--dataset_path", "dpo.jsonl"]),
])
def test_sft_and_dpo_on_two_processes_match_one(tmp_path, copy_task_dir, script, extra):
    extra = [str(copy_task_dir / a) if a.endswith(".jsonl") else a for a in extra]
    common = ["--model_name_or_path", str(copy_task_dir / "base"), "--system_prompt", "", "--val_ratio", "0", "--cutoff_len", "48",
              "--max_steps", "4", "--logging_steps", "1", "--save_steps", "0", "--use_tensorboard", "false", "--plot", "false",
              "--learning_rate", "1e-3", "--train_micro_batch_size_per_gpu", "4"] + extra + FP32
    subprocess_args = lambda out: common + ["--output_dir", str(tmp_path / out)]
    result = launch(1, subprocess_args("one") + ["--gradient_accumulation_steps", "2"], script=script)
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0 tokenizes into a fresh cache, once; rank 1 reads it
    result = launch(2, subprocess_args("two") + ["--save_steps", "2", "--cache_dir", str(tmp_path / "cache")],
                    script=script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("tokenizing 1 file(s)") == 1
    assert len([name for name in os.listdir(tmp_path / "cache") if name != ".nanobumble-files"]) == 1
    # the 2-process checkpoint (LoRA adapter or full weights, with their AdamW state) continued by 1 process
    result = launch(1, subprocess_args("resumed") + ["--gradient_accumulation_steps", "2", "--save_steps", "2",
                                                     "--resume", str(tmp_path / "two" / "checkpoint-2")],
                    script=script)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "two"))
    resumed = read_metrics(str(tmp_path / "resumed"))
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3, 4]
    assert [m["step"] for m in resumed] == [3, 4]
    for a, b, c in zip(one, two, [None, None] + resumed):
        for key in a:
            if key not in ("step", "train/tokens_per_sec"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
                if c is not None:
                    assert c[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), ("resumed", a["step"], key)


def test_compile_and_activation_checkpointing_change_nothing(tmp_path, cache_dir):
    # Under FSDP2 on 2 processes: torch.compile per block and recomputing each
    # block in backward give the same losses as the plain run.
    common = FAST + ["--max_steps", "3", "--save_steps", "0", "--eval_steps", "0", "--cache_dir", cache_dir]
    run_ok(2, common + ["--output_dir", str(tmp_path / "plain")])
    run_ok(2, common + ["--output_dir", str(tmp_path / "fancy"), "--compile", "true",
                        "--enable_gradient_checkpointing", "true"])
    plain, fancy = losses(str(tmp_path / "plain")), losses(str(tmp_path / "fancy"))
    assert sorted(plain) == sorted(fancy) == [1, 2, 3]
    for step in plain:
        assert fancy[step] == pytest.approx(plain[step], rel=1e-5), step
