"""The GPU run's precision path, on CPU: bf16 under torchrun uses FSDP2's
MixedPrecisionPolicy (bf16 params for compute, fp32 gradient reduction, fp32
master shards) on gloo exactly as on NCCL, with the Triton kernels under the
interpreter. A sharded bf16 run must run, say so, and match one process."""

import json
import socket

import pytest
import torch
from conftest import DEVICE
from copy_task import LETTERS, make_words, write_dpo_data, write_sft_data
from helpers import read_metrics
from runs import launch

from nanobumble.base.cpu import native_bf16
from nanobumble.base.distributed import one_process_shards
from nanobumble.data.tokenizer import Tokenizer, train_tokenizer
from nanobumble.model.transformer import ModelConfig, Transformer, pad_vocab_size
from nanobumble.store.model_dir import save_model_dir

POLICY_LINE = "FSDP mixed precision: params bf16, reduce fp32"

# Under the Triton interpreter every token's RoPE program costs ~0.1 s, so the
# model and rows are as small as still means something.
SMALL = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
             max_position_embeddings=128)


def test_the_precision_policy_of_each_case():
    # precision.py's CUDA and sharded branches, reached on CPU with device objects and stand-in ranks.
    from nanobumble.base.distributed import DistInfo
    from nanobumble.base.precision import autocast_dtype, precision_summary, resolve_precision

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_precision("auto", cuda) == torch.bfloat16  # the GPU run computes in bf16
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if native_bf16() else torch.float32)  # the CPU's flags
    assert resolve_precision("bf16", cpu) == torch.bfloat16 and resolve_precision("fp32", cuda) == torch.float32
    one, sharded = DistInfo(device=cpu), DistInfo(device=cpu, world_size=2)
    assert autocast_dtype(one, torch.bfloat16) == torch.bfloat16  # one process: autocast does the casting
    assert autocast_dtype(sharded, torch.bfloat16) == torch.float32  # FSDP's policy does it instead
    assert precision_summary(sharded, torch.bfloat16) == POLICY_LINE
    assert precision_summary(one, torch.bfloat16) == "autocast bf16 (fp32 weights and optimizer)"
    assert precision_summary(one, torch.float32) == "precision fp32"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU twin of the NCCL policy test in test_gpu.py")
def test_fsdp_bf16_policy_on_one_gloo_rank_with_triton_kernels():
    """The first forward of every multi-GPU run used to crash here: the policy cast
    the fp32 rotary cos/sin to bf16 on their way into each block."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from nanobumble.base.distributed import DistInfo, shard_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, **SMALL)
    x, y = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    reference = Transformer(cfg)
    reference.kernels = "triton"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(x, y)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = Transformer(cfg)
        model.load_state_dict(reference.state_dict())
        model.kernels = "triton"
        shard_model(model, DistInfo(mesh=init_device_mesh("cpu", (1,))), torch.bfloat16)
        seen = {}
        model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda m, args, out: seen.update(weight=m.weight.dtype, input=args[0].dtype))
        loss = model(x, y)  # no autocast: the policy alone casts
        loss.backward()
    finally:
        dist.destroy_process_group()
    assert seen == {"weight": torch.bfloat16, "input": torch.bfloat16}
    params = list(model.parameters())
    assert all(p.dtype == torch.float32 for p in params)  # fp32 master shards ...
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)  # ... and gradients
    assert loss.item() == pytest.approx(expected.item(), abs=3e-2)


@pytest.fixture(scope="module")
def small_task(tmp_path_factory):
    """A small model directory, a pretraining text file, SFT and DPO data."""
    root = tmp_path_factory.mktemp("mp")
    words = make_words(0, 400)
    tok_file = train_tokenizer([f"copy:\n{w}\n{w}" for w in words] + [" ".join(LETTERS)], 280,
                               str(root / "tok.model"))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=pad_vocab_size(Tokenizer(tok_file).vocab_size), **SMALL))
    save_model_dir(str(root / "base"), model, tok_file, "stage: pretrain\n")
    with open(root / "text.jsonl", "w", encoding="utf-8") as f:
        for i in range(0, len(words), 4):
            f.write(json.dumps({"text": " ".join(words[i:i + 4])}) + "\n")
    write_sft_data(str(root / "sft.jsonl"), words[:200])
    write_dpo_data(str(root / "dpo.jsonl"), make_words(1, 100))
    return root


def bf16_run(nproc: int, script: str, argv: list[str], out: str, fsdp: bool = False) -> list[dict]:
    """fsdp: one process on a one-rank FSDP2 mesh (single_process_fsdp true), as one GPU runs."""
    # The same global batch: 1 process x 2 micro-steps, or 2 processes x 1.
    extra = ["--gradient_accumulation_steps", "2"] if nproc == 1 else []
    extra += ["--single_process_fsdp", "true" if fsdp else "auto"]
    result = launch(nproc, argv + extra + ["--output_dir", out, "--train_model_precision", "bf16"], script=script)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert (POLICY_LINE in result.stdout) == (nproc > 1 or fsdp), result.stdout[-2000:]
    return read_metrics(out)


def assert_agree(a: list[dict], b: list[dict], keys: list[str], tol: float) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in keys:
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=tol), (x["step"], key)


def assert_same_path(one_rank: list[dict], two: list[dict], keys: list[str]) -> None:
    """One process on a one-rank mesh (how one GPU runs) computes as two ranks do: the
    same bf16 parameters and roundings, so the first step, before any update, agrees
    to fp32 rounding (autocast over fp32 weights differs there by ~1e-3). Later steps
    drift apart as any two bf16 runs do (the gradient sums are ordered differently)."""
    assert_agree(one_rank[:1], two[:1], keys, 1e-5)
    assert_agree(one_rank, two, keys, 3e-2)


def test_pretraining_bf16_two_ranks_match_one_with_triton_and_torch_kernels(tmp_path, small_task):
    argv = ["--model_name_or_path", str(small_task / "base"), "--dataset_path", str(small_task / "text.jsonl"),
            "--cache_dir", str(tmp_path / "cache"), "--cutoff_len", "16", "--train_micro_batch_size_per_gpu", "2",
            "--max_steps", "3", "--logging_steps", "1", "--eval_steps", "0", "--eval_rows", "2",
            "--save_steps", "0", "--use_tensorboard", "false", "--plot", "false", "--learning_rate", "1e-2"]
    runs = {(n, k): bf16_run(n, "train_pretrain.py", argv + ["--kernels", k], str(tmp_path / f"{n}{k}"))
            for k in ("triton", "torch") for n in (1, 2)}
    for kernels in ("triton", "torch"):  # bf16 policy vs autocast: bf16 tolerance
        assert_agree(runs[1, kernels], runs[2, kernels], ["train/loss", "val/loss"], 3e-2)
    one_rank = bf16_run(1, "train_pretrain.py", argv + ["--kernels", "torch"], str(tmp_path / "fsdp1"), fsdp=True)
    assert_same_path(one_rank, runs[2, "torch"], ["train/loss"])
    assert_agree(runs[2, "torch"], runs[2, "triton"], ["train/loss", "val/loss"], 1e-2)
    losses = [m["train/loss"] for m in runs[2, "triton"] if "train/loss" in m]
    assert len(losses) == 3 and losses[-1] < losses[0]  # it trains


SFT_DPO_ARGS = ["--system_prompt", "", "--val_ratio", "0", "--cutoff_len", "32", "--max_steps", "3",
                "--logging_steps", "1", "--save_steps", "0", "--use_tensorboard", "false", "--plot", "false",
                "--learning_rate", "1e-2", "--kernels", "triton"]


LORA_SFT_ARGS = ["--finetuning_type", "lora", "--packing", "true", "--lora_dropout", "0",
                 "--train_micro_batch_size_per_gpu", "2"]


def test_lora_sft_with_packing_bf16_two_ranks_match_one(tmp_path, small_task):
    argv = SFT_DPO_ARGS + LORA_SFT_ARGS + ["--model_name_or_path", str(small_task / "base"),
                                           "--dataset_path", str(small_task / "sft.jsonl")]
    one = bf16_run(1, "train_sft.py", argv, str(tmp_path / "one"))
    two = bf16_run(2, "train_sft.py", argv, str(tmp_path / "two"))
    assert_agree(one, two, ["train/loss"], 3e-2)


@pytest.mark.slow
def test_lora_sft_on_a_one_rank_mesh_takes_the_two_rank_path(tmp_path, small_task):
    argv = SFT_DPO_ARGS + LORA_SFT_ARGS + ["--model_name_or_path", str(small_task / "base"),
                                           "--dataset_path", str(small_task / "sft.jsonl")]
    two = bf16_run(2, "train_sft.py", argv, str(tmp_path / "two"))
    one_rank = bf16_run(1, "train_sft.py", argv, str(tmp_path / "fsdp1"), fsdp=True)
    assert_same_path(one_rank, two, ["train/loss"])


@pytest.mark.slow
def test_dpo_bf16_two_ranks_match_one(tmp_path, small_task):
    argv = SFT_DPO_ARGS + ["--model_name_or_path", str(small_task / "base"), "--train_micro_batch_size_per_gpu",
                           "1", "--dataset_path", str(small_task / "dpo.jsonl")]
    one = bf16_run(1, "train_dpo.py", argv, str(tmp_path / "one"))
    two = bf16_run(2, "train_dpo.py", argv, str(tmp_path / "two"))
    keys = ["train/loss", "rewards/chosen", "rewards/rejected", "logps/chosen"]
    assert_agree(one, two, keys, 3e-2)
    one_rank = bf16_run(1, "train_dpo.py", argv, str(tmp_path / "fsdp1"), fsdp=True)  # with its reference model
    assert_same_path(one_rank, two, keys)


def test_one_gpu_takes_the_fsdp_path_and_the_cpu_demo_needs_no_process_group():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert one_process_shards("auto", cuda) and not one_process_shards("auto", cpu)
    assert one_process_shards("true", cpu) and not one_process_shards("false", cuda)


def test_one_rank_fsdp_in_fp32_gives_the_plain_process_losses_over_20_steps(tmp_path, small_task):
    argv = ["--model_name_or_path", str(small_task / "base"), "--dataset_path", str(small_task / "text.jsonl"),
            "--cache_dir", str(tmp_path / "cache"), "--cutoff_len", "16", "--train_micro_batch_size_per_gpu", "2",
            "--max_steps", "20", "--logging_steps", "1", "--eval_steps", "10", "--eval_rows", "2",
            "--save_steps", "0", "--use_tensorboard", "false", "--plot", "false", "--learning_rate", "1e-2",
            "--train_model_precision", "fp32", "--kernels", "torch"]
    outputs, losses = {}, {}
    for mode in ("auto", "true"):  # auto on CPU: no process group, as the no-argument demo runs
        out = str(tmp_path / mode)
        result = launch(1, argv + ["--single_process_fsdp", mode, "--output_dir", out])
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        outputs[mode] = result.stdout
        losses[mode] = {(m["step"], k): m[k] for m in read_metrics(out) for k in ("train/loss", "val/loss") if k in m}
    assert "sharding: none (one process, no process group" in outputs["auto"]
    assert "sharding: FSDP2 over 1 rank(s)" in outputs["true"]
    assert sorted(losses["auto"]) == sorted(losses["true"]) and len(losses["auto"]) == 22
    for key, value in losses["auto"].items():
        assert losses["true"][key] == pytest.approx(value, rel=1e-4), key
