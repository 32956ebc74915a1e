"""nanobumble/estimate_speed.py: the FLOP count, every term of the step time, the recipes' fit."""

import dataclasses
import os
import sys

import pytest
from conftest import REPO_ROOT

from nanobumble import estimate_speed as es
from nanobumble.base.errors import run_cli
from nanobumble.model.mfu import training_flops_per_token
from nanobumble.model.transformer import PRESETS, ModelConfig

SMALL = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=128, max_position_embeddings=64)
BUMBLEBEE = ModelConfig(vocab_size=151936, **PRESETS["bumblebee-1.5b"])
TERMS = {"GEMMs (model)", "GEMMs (recompute)", "attention", "RMSNorm", "RoPE", "SwiGLU", "autocast casts",
         "gradient sums", "residual adds", "cross entropy + LM head dW", "embedding", "weights per micro-step",
         "optimizer per step"}

# Recipes and the device class each is for (the DPO files serve both).
RECIPES = [("configs/pretrain/pretrain_1.5b_80gb.yaml", "h100"), ("configs/pretrain/pretrain_1.5b_141gb.yaml", "h200"),
           ("configs/sft/sft_1.5b_80gb.yaml", "h100"), ("configs/sft/sft_1.5b_141gb.yaml", "h200"),
           ("configs/dpo/dpo_lora_1.5b_80gb.yaml", "h100"), ("configs/dpo/dpo_lora_1.5b_80gb.yaml", "h200"),
           ("configs/dpo/dpo_full_1.5b_80gb.yaml", "h100"), ("configs/dpo/dpo_full_1.5b_80gb.yaml", "h200")]


def config(path: str, *extra: str) -> list[str]:
    return ["--yaml_config", os.path.join(REPO_ROOT, path), *extra]


def test_model_flops_hand_count():
    """SMALL by hand: per layer q 64x64, k and v 64x32, o 64x64, MLP 3 x 64x128 = 36,864 weights;
    2 layers + the LM head 256x64 = 90,112; 6 per weight per token, + causal attention
    6 L T H = 6 x 2 x 32 x 64 at T = 32: 565,248 FLOPs per token; mfu.py says the same."""
    setup = es.Setup(model=SMALL, micro_batch=3, seq_len=32)
    est = es.estimate(setup, es.DEVICES["h100"])
    assert est.real_tokens == est.computed_tokens == 96
    assert est.model_flops / est.real_tokens == pytest.approx(565_248)
    assert training_flops_per_token(SMALL, 32) == pytest.approx(565_248)
    # recompute is overhead: full checkpointing runs 2 x 73,728 more per token, model FLOPs unchanged
    full = es.estimate(dataclasses.replace(setup, checkpointing="full"), es.DEVICES["h100"])
    assert full.model_flops == est.model_flops
    assert (full.hardware_flops - est.hardware_flops) / 96 == pytest.approx(2 * 73_728 + 6 * 2 * 32 * 64 / 3)


def test_every_term_is_counted():
    """Today's one-GPU path (autocast, eager, full recompute, accumulation): every term is there and
    takes time, and the step is their sum. A term dropped from estimate() fails here."""
    setup = es.Setup(model=BUMBLEBEE, micro_batch=8, seq_len=2048, accumulation=16, checkpointing="full")
    est = es.estimate(setup, es.DEVICES["h100"])
    assert set(est.terms) == TERMS
    assert all(seconds > 0 for seconds in est.terms.values()), est.terms
    assert est.step_seconds == pytest.approx(sum(est.terms.values()))
    # each setting moves its own terms
    compiled = es.estimate(dataclasses.replace(setup, compiled=True), es.DEVICES["h100"])
    assert compiled.terms["SwiGLU"] < 0.7 * est.terms["SwiGLU"]
    bf16 = es.estimate(dataclasses.replace(setup, bf16_params=True), es.DEVICES["h100"])
    assert bf16.terms["autocast casts"] == 0 and bf16.terms["residual adds"] < est.terms["residual adds"]
    none = es.estimate(dataclasses.replace(setup, checkpointing="none"), es.DEVICES["h100"])
    assert none.terms["GEMMs (recompute)"] == 0 and none.terms["SwiGLU"] < est.terms["SwiGLU"]
    assert none.terms["GEMMs (model)"] == est.terms["GEMMs (model)"]
    h200 = es.estimate(setup, es.DEVICES["h200"])  # same peak, more bandwidth: only memory terms shrink
    assert h200.terms["GEMMs (model)"] == est.terms["GEMMs (model)"] and h200.terms["SwiGLU"] < est.terms["SwiGLU"]
    lora = es.estimate(dataclasses.replace(setup, lora_rank=16, stage="sft"), es.DEVICES["h100"])
    assert lora.terms["LoRA adapters"] > 0


def test_shipped_config_lands_near_the_review():
    """The issue's paper review: pretrain_full.yaml (autocast, eager, full recompute, micro 8 x 2048)
    ~31k tokens/s, ~31% MFU on one H100, ~34% on an H200."""
    est, plan, text = es.estimate_config(config("configs/pretrain/pretrain_full.yaml", "--device", "h100",
                                                "--single_process_fsdp", "false"))
    assert est.setup.checkpointing == "full" and not est.setup.compiled and not est.setup.bf16_params
    assert 0.28 < est.mfu < 0.34 and 28_000 < est.tokens_per_second < 34_000
    assert "FLOP convention" in text and "MFU" in text and plan.fits()
    h200, _, _ = es.estimate_config(config("configs/pretrain/pretrain_full.yaml", "--device", "h200",
                                           "--single_process_fsdp", "false"))
    assert 0.32 < h200.mfu < 0.38


@pytest.mark.parametrize("path,device", RECIPES)
def test_recipe_parses_and_fits(path, device):
    est, plan, text = es.estimate_config(config(path, "--device", device))
    assert plan.fits(), plan.summary()
    assert plan.device_bytes == es.DEVICES[device].memory_bytes
    assert est.setup.compiled and est.setup.bf16_params
    if "sft" in path:
        assert est.setup.packing
    if "pretrain" in path:
        assert est.setup.checkpointing == "none"
        assert est.mfu >= (0.45 if device == "h100" else 0.48), text


def test_recipes_table_lists_the_tested_recipes():
    assert {(path, device) for path, device, _ in es.RECIPES if "pretrain_full" not in path} == set(RECIPES)


@pytest.mark.parametrize("argv,words", [
    (["--device", "a100"], "device"),
    (["--stage", "rl"], "stage"),
    (["--doc_tokens", "x"], "doc_tokens"),
    (["--model", "gpt5"], "model"),
    (["--learning_rat", "1"], "learning_rat"),
    (["--train_model_precision", "fp32"], "fp32"),
])
def test_bad_input_is_one_line(monkeypatch, capsys, argv, words):
    monkeypatch.setattr(sys, "argv", ["estimate_speed", *config("configs/pretrain/pretrain_full.yaml"), *argv])
    with pytest.raises(SystemExit) as stop:
        run_cli(es.main)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
