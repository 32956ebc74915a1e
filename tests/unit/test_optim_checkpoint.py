import os

import pytest
import torch
from helpers import read_metrics

from nanobumble.base.errors import UserError
from nanobumble.data.tokenizer import train_tokenizer
from nanobumble.model.transformer import ModelConfig, Transformer
from nanobumble.run.metrics import MetricsLogger
from nanobumble.run.optim import build_optimizer, lr_at
from nanobumble.store.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from nanobumble.store.model_dir import load_model_dir, save_model_dir


def small_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=48, max_position_embeddings=32))


def test_lr_schedule_shapes():
    peak = 1e-3
    assert lr_at(1, 100, peak, 10) == pytest.approx(1e-4)
    assert lr_at(10, 100, peak, 10) == pytest.approx(peak)
    assert lr_at(100, 100, peak, 10, "cosine", 0.1) == pytest.approx(1e-4)
    assert lr_at(55, 100, peak, 10, "cosine", 0.1) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(55, 100, peak, 10, "linear", 0.0) == pytest.approx(0.5e-3)
    assert lr_at(80, 100, peak, 10, "constant") == peak
    lrs = [lr_at(s, 100, peak, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_no_decay_on_norms_biases_embeddings():
    model = small_model()
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 and "embed" not in names[id(p)] for p in decay["params"])
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "embed_tokens.weight" in no_decay_names and "norm.weight" in no_decay_names
    assert "layers.0.self_attn.q_proj.bias" in no_decay_names
    total = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert total == model.num_parameters()  # the tied head is not listed twice


def test_model_dir_round_trip(tmp_path):
    model = small_model()
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"not really a tokenizer")
    save_model_dir(str(tmp_path / "m"), model, str(tok), "seed: 1\n")
    assert sorted(os.listdir(tmp_path / "m")) == [".nanobumble-files", "complete.json", "config.json",
                                                 "model.safetensors", "tokenizer.model", "training_args.yaml"]
    loaded, cfg = load_model_dir(str(tmp_path / "m"))
    assert cfg == model.config
    x = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_mismatched_weights_are_refused(tmp_path):
    model = small_model()
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"x")
    save_model_dir(str(tmp_path / "m"), model, str(tok), "")
    cfg_file = tmp_path / "m" / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"intermediate_size": 48', '"intermediate_size": 50'))
    with pytest.raises(UserError, match=r"proj.weight has shape .* config.json says"):
        load_model_dir(str(tmp_path / "m"))


def test_checkpoint_save_load_and_rotation(tmp_path):
    model = small_model()
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))).backward()
    opt.step()
    tok = tmp_path / "tok.model"  # a real tokenizer: a checkpoint with a garbage one is damaged
    train_tokenizer(["the bees fly from flower to flower and make honey in the hive"] * 20, 300, str(tok))
    out = str(tmp_path / "run")
    for step in (10, 20, 30):
        save_checkpoint(out, step, model, opt, str(tok), "seed: 1\n", save_total_limit=2)
    assert [s for s, _ in list_checkpoints(out)] == [20, 30]
    assert latest_checkpoint(out).endswith("checkpoint-30")
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]

    fresh = small_model()
    fresh_opt = build_optimizer(fresh, 1e-3, 0.1, (0.9, 0.95))
    for p in fresh.parameters():
        p.data.zero_()
    assert load_checkpoint(latest_checkpoint(out), fresh, fresh_opt) == 30
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    saved, loaded = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert len(saved) == len(loaded) == len(list(model.parameters()))
    for index in saved:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(saved[index][key], loaded[index][key]), (index, key)


def test_metrics_resume_drops_steps_after_the_checkpoint(tmp_path):
    log = MetricsLogger(str(tmp_path), use_tensorboard=False)
    for step in (1, 2, 3, 4):
        log.log(step, {"train/loss": float(step)})
    log.close()
    MetricsLogger(str(tmp_path), use_tensorboard=False, resume_step=2).close()
    assert [m["step"] for m in read_metrics(str(tmp_path))] == [1, 2]
    MetricsLogger(str(tmp_path), use_tensorboard=False).close()  # a fresh run starts a fresh log
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_cuda_rng_states_round_trip_through_the_checkpoint_file(tmp_path, monkeypatch):
    # The CUDA branch of rng_state / set_rng_state, reached on a CPU machine with
    # two stand-in GPUs: what is saved per device comes back to the same device.
    from nanobumble.store.checkpoint import rng_state, set_rng_state
    from nanobumble.store.tensor_files import open_file, write_gathered

    gpu_states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: gpu_states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    cpu_state = torch.get_rng_state()
    write_gathered(str(tmp_path / "rng_state.safetensors"), list(rng_state().items()))
    torch.rand(5)  # moves the CPU generator on
    with open_file(str(tmp_path / "rng_state.safetensors")) as f:
        set_rng_state({name: f.get_tensor(name) for name in f.keys()})
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert len(restored) == 2 and all(torch.equal(a, b) for a, b in zip(restored, gpu_states))
