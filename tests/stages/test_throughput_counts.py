"""SFT and DPO throughput counts real tokens, not padding, and their MFU counts the
FLOPs of those tokens (each conversation by its own length); DPO-LoRA in bf16 keeps
its frozen weights in bf16 without changing a number."""

import json
import math

import pytest
import torch
from copy_task import LETTERS, make_words, prompt, write_sft_data
from helpers import read_metrics

import train_dpo
import train_sft
from nanobumble.data.dpo_data import PreferenceDataset, load_preference_pairs, tokenize_pairs
from nanobumble.data.sft_data import SFTDataset, load_conversations, tokenize_sft
from nanobumble.data.tokenizer import Tokenizer, train_tokenizer
from nanobumble.model.lora import inject_lora
from nanobumble.model.transformer import ModelConfig, Transformer, pad_vocab_size
from nanobumble.store.model_dir import save_model_dir

CUTOFF, SEED, PEAK = 64, 42, 1e12
KEEP_FROZEN = train_dpo.keep_frozen_in_compute_dtype  # the function itself, before any test replaces it
SMALL = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64,
             max_position_embeddings=128, tie_word_embeddings=False)  # untied: the LM head is a frozen Linear


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("throughput")
    words = make_words(0, 300)
    tok_file = train_tokenizer([f"copy:\n{w}\n{w}" for w in words] + [" ".join(LETTERS)], 280,
                               str(root / "tok.model"))
    tokenizer = Tokenizer(tok_file)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=pad_vocab_size(tokenizer.vocab_size), **SMALL)
    save_model_dir(str(root / "base"), Transformer(cfg), tok_file, "stage: pretrain\n")
    write_sft_data(str(root / "sft.jsonl"), words[:64])
    with open(root / "dpo.jsonl", "w", encoding="utf-8") as f:  # answers of different lengths: padding
        for w in make_words(1, 64):
            f.write(json.dumps({"messages": prompt(w), "chosen": w, "rejected": w[::-1] * 3}) + "\n")
    return {"root": root, "tokenizer": tokenizer, "cfg": cfg}


def common(task, tmp_path, *extra):
    """Arguments of a run on the task (DPO's data unless --dataset_path is given again)."""
    return ["--dataset_path", str(task["root"] / "dpo.jsonl"), "--model_name_or_path", str(task["root"] / "base"),
            "--system_prompt", "", "--val_ratio", "0",
            "--cutoff_len", str(CUTOFF), "--use_tensorboard", "false", "--plot", "false", "--save_steps", "0",
            "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--seed", str(SEED),
            "--logging_steps", "1"] + list(extra)


def flops_by_hand(cfg, lengths, lora_adapter_params=None, reference=False):
    """Forward + backward 6 FLOPs per matmul weight per token (4 for a frozen one, 6 per
    adapter weight), causal attention 6 * layers * hidden * t per token of a t-token
    document; the reference's forward 2 and 2."""
    d, kv, L = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.num_layers
    weights = L * (2 * d * d + 2 * d * kv + 3 * d * cfg.intermediate_size) + cfg.vocab_size * d
    tokens, squares = sum(lengths), sum(t * t for t in lengths)
    per_weight = 6 if lora_adapter_params is None else 4
    flops = per_weight * weights * tokens + 6 * (lora_adapter_params or 0) * tokens + 6 * L * d * squares
    if reference:
        flops += 2 * weights * tokens + 2 * L * d * squares
    return flops


def mfu_flops(metrics: dict) -> float:
    """The step's FLOPs that train/mfu stands for: mfu * peak * seconds, seconds = tokens / tokens_per_sec."""
    return metrics["train/mfu"] * PEAK * metrics["train/tokens"] / metrics["train/tokens_per_sec"]


@pytest.mark.parametrize("packing", [False, True])
def test_sft_counts_real_tokens_and_their_flops(task, tmp_path, monkeypatch, packing):
    monkeypatch.setattr("nanobumble.run.stage.device_peak_flops", lambda device: PEAK)  # a stand-in GPU peak
    micro, steps = 4, 2
    train_sft.main(common(task, tmp_path, "--dataset_path", str(task["root"] / "sft.jsonl"),
                          "--train_micro_batch_size_per_gpu", str(micro), "--max_steps", str(steps),
                          "--packing", str(packing).lower()))
    metrics = [m for m in read_metrics(str(tmp_path / "out")) if "train/loss" in m]

    samples, _ = tokenize_sft(load_conversations(str(task["root"] / "sft.jsonl"), quiet=True), task["tokenizer"],
                              CUTOFF, system_prompt="", quiet=True)
    inputs = [len(ids) - 1 for ids, _ in samples]  # a sample's input tokens: all but its last id
    if packing:  # by hand, as SFTDataset packs: greedily, in order, never splitting a sample
        rows, used = [[]], 0
        for n in inputs:
            if used + n > CUTOFF:
                rows, used = rows + [[]], 0
            rows[-1].append(n)
            used += n
    else:
        rows = [[n] for n in inputs]
    order = SFTDataset(samples, CUTOFF, packing=packing).order
    for step, logged in enumerate(metrics, start=1):
        picked = [rows[order(SEED, i)] for i in range((step - 1) * micro, step * micro)]
        documents = [n for row in picked for n in row]
        width = CUTOFF if packing else max(sum(row) for row in picked)
        assert sum(documents) < micro * width  # the batch has padding to leave out
        assert logged["train/tokens"] == sum(documents)
        assert logged["train/padded_tokens"] == micro * width
        assert mfu_flops(logged) == pytest.approx(flops_by_hand(task["cfg"], documents), rel=1e-9)


def dpo_lengths(task, micro: int, step: int) -> tuple[list[int], int]:
    """The real tokens of each row of a step's pairs (prompt + answer - 1), and the padded count."""
    pairs, _ = tokenize_pairs(load_preference_pairs(str(task["root"] / "dpo.jsonl"), quiet=True),
                              task["tokenizer"], CUTOFF, system_prompt="", quiet=True)
    order = PreferenceDataset(pairs).order
    picked = [pairs[order(SEED, i)] for i in range((step - 1) * micro, step * micro)]
    lengths = [len(p["prompt_ids"]) + len(p[k]) - 1 for k in ("chosen_ids", "rejected_ids") for p in picked]
    return lengths, 2 * micro * max(lengths)


def test_dpo_counts_real_tokens_and_the_reference_forward(task, tmp_path, monkeypatch):
    monkeypatch.setattr("nanobumble.run.stage.device_peak_flops", lambda device: PEAK)
    train_dpo.main(common(task, tmp_path, "--train_micro_batch_size_per_gpu", "3", "--max_steps", "1",
                          "--finetuning_type", "lora", "--lora_rank", "4", "--lora_target_modules", "all"))
    logged = read_metrics(str(tmp_path / "out"))[0]
    lengths, padded = dpo_lengths(task, 3, 1)
    assert sum(lengths) < padded
    assert logged["train/tokens"] == sum(lengths) and logged["train/padded_tokens"] == padded
    cfg, r = task["cfg"], 4
    d, kv, L = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.num_layers
    # rank-4 adapters on q, k, v, o, gate, up, down of each layer: r * (in + out) each
    adapters = L * r * ((d + d) + (d + kv) + (d + kv) + (d + d) + 3 * (d + SMALL["intermediate_size"]))
    assert mfu_flops(logged) == pytest.approx(flops_by_hand(task["cfg"], lengths, adapters, reference=True),
                                              rel=1e-9)


def dpo_run(task, tmp_path, monkeypatch, precision: str, old_path: bool) -> tuple[list[dict], dict]:
    """A 3-step DPO-LoRA run; old_path: without keep_frozen_in_compute_dtype (autocast casts every forward).
    Returns the metrics and the dtypes of the trained model's parameters."""
    seen = {}

    def keep(model, dtype):
        seen["model"] = model
        return 0 if old_path else KEEP_FROZEN(model, dtype)

    monkeypatch.setattr(train_dpo, "keep_frozen_in_compute_dtype", keep)
    out = tmp_path / ("old" if old_path else "new")
    train_dpo.main(common(task, tmp_path, "--train_micro_batch_size_per_gpu", "4", "--max_steps", "3",
                          "--finetuning_type", "lora", "--lora_target_modules", "all", "--lora_dropout", "0",
                          "--learning_rate", "1e-2", "--sft_weight", "0", "--train_model_precision", precision,
                          "--output_dir", str(out)))
    return read_metrics(str(out)), {name: p.dtype for name, p in seen["model"].named_parameters()}


def test_dpo_lora_bf16_keeps_the_frozen_weights_bf16_with_the_same_numbers(task, tmp_path, monkeypatch):
    old, old_dtypes = dpo_run(task, tmp_path, monkeypatch, "bf16", old_path=True)
    new, dtypes = dpo_run(task, tmp_path, monkeypatch, "bf16", old_path=False)
    assert set(old_dtypes.values()) == {torch.float32}
    for name, dtype in dtypes.items():
        linear = name.endswith(("proj.weight", "proj.bias", "lm_head.weight"))
        assert dtype == (torch.bfloat16 if linear else torch.float32), name  # adapters, norms, embedding fp32
    # autocast rounds an fp32 weight to bf16 exactly as the stored copy was rounded: the same numbers
    assert len(new) == 3 and new[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    for a, b in zip(old, new):
        for key in a:
            if key not in ("train/tokens_per_sec", "train/mfu"):
                assert b[key] == a[key], (a["step"], key)


def test_dpo_lora_fp32_is_untouched(task, tmp_path, monkeypatch):
    old, _ = dpo_run(task, tmp_path, monkeypatch, "fp32", old_path=True)
    new, dtypes = dpo_run(task, tmp_path, monkeypatch, "fp32", old_path=False)
    assert set(dtypes.values()) == {torch.float32}
    assert new[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert "train/mfu" not in new[0]  # on CPU: no peak, no MFU, as in pretraining
    for a, b in zip(old, new):
        for key in a:
            if key != "train/tokens_per_sec":
                assert b[key] == a[key], (a["step"], key)


def test_a_weight_tied_to_the_embedding_stays_fp32():
    model = Transformer(ModelConfig(vocab_size=64, **(SMALL | {"tie_word_embeddings": True})))
    inject_lora(model, rank=2, alpha=4, dropout=0.0, target_modules="q_proj")
    cast = train_dpo.keep_frozen_in_compute_dtype(model, torch.bfloat16)
    assert model.lm_head.weight is model.embed_tokens.weight and model.embed_tokens.weight.dtype == torch.float32
    assert model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32
    assert cast == len([n for n, _ in model.named_parameters() if n.endswith(("proj.weight", "proj.bias"))])
    assert train_dpo.keep_frozen_in_compute_dtype(model, torch.float32) == 0
    assert model.norm.weight.dtype == torch.float32
