import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import REPO_ROOT
from helpers import lora_state_dict
from safetensors.torch import load_file, save_file

from nanobumble.base.errors import ConfigError, UserError
from nanobumble.data.tokenizer import train_tokenizer
from nanobumble.model.lora import LoRALinear, disable_adapters, init_lora_weights, inject_lora, merge_lora
from nanobumble.model.transformer import ModelConfig, Transformer
from nanobumble.store.adapter import PEFT_CONFIG, adapter_config_for, load_adapter, read_adapter_config, save_adapter
from nanobumble.store.model_dir import load_model_dir, save_model_dir

CFG = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
           max_position_embeddings=32)
# hidden 32, 4 heads of 8, 2 KV heads -> k/v project 32 -> 16; MLP 32 -> 48 -> 32.
ATTN_IN_OUT = {"q_proj": 32 + 32, "k_proj": 32 + 16, "v_proj": 32 + 16, "o_proj": 32 + 32}
MLP_IN_OUT = {"gate_proj": 32 + 48, "up_proj": 32 + 48, "down_proj": 48 + 32}


def tiny_model(seed: int = 0) -> Transformer:
    model = Transformer(ModelConfig(**CFG))
    model.init_weights(seed)
    return model.eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def adapter_config(model: nn.Module, rank: int = 4, alpha: float = 8.0, targets="q_proj,k_proj,v_proj,o_proj",
                   use_rslora: bool = False) -> dict:
    return {"base_model_name_or_path": "base", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
            "target_modules": targets.split(","), "use_rslora": use_rslora}


def train_adapters(model: Transformer, steps: int = 5) -> None:
    """A few optimizer steps so that B (and the model's output) moves away from the base."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    x = tokens(2)
    for _ in range(steps):
        loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_inject_keeps_output_and_freezes_base():
    model = tiny_model()
    x = tokens()
    before = model(x)
    weight = model.layers[0].self_attn.q_proj.weight
    trainable = inject_lora(model, rank=8, alpha=16, dropout=0.05, target_modules="q_proj,k_proj,v_proj,o_proj")
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and isinstance(q, nn.Linear)
    assert q.weight is weight  # the same Parameter, not a copy
    assert torch.equal(model(x), before)  # B = 0: exactly the base model
    assert trainable == 2 * 8 * sum(ATTN_IN_OUT.values()) == 3584
    grads = {name for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(name.endswith((".lora_A", ".lora_B")) for name in grads)
    assert len(grads) == 2 * 4 * 2
    names = {name for name, _ in model.named_parameters()}
    assert {"layers.0.self_attn.q_proj.weight", "layers.0.self_attn.q_proj.bias",
            "layers.0.self_attn.q_proj.lora_A", "layers.0.self_attn.q_proj.lora_B"} <= names
    assert q.lora_A.shape == (8, 32) and q.lora_B.shape == (32, 8)
    assert torch.count_nonzero(q.lora_B) == 0 and torch.count_nonzero(q.lora_A) == q.lora_A.numel()
    bound = 1 / math.sqrt(32)  # kaiming-uniform with a=sqrt(5) is U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert q.lora_A.abs().max() <= bound and q.lora_A.abs().max() > 0.8 * bound


def test_forward_matches_float64_reference():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=3, alpha=6, dropout=0.0)
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), base(x))  # a new layer starts as the identity update
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    W, b, A, B = (t.double() for t in (base.weight, base.bias, layer.lora_A, layer.lora_B))
    expected = x.double() @ W.T + b + 2.0 * (x.double() @ A.T @ B.T)  # scaling 6 / 3
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_merge_equals_adapted_model():
    model = tiny_model()
    x = tokens()
    base_logits = model(x)
    inject_lora(model, rank=4, alpha=8, dropout=0.0, target_modules="all")
    train_adapters(model)
    adapted = model(x)
    assert (adapted - base_logits).abs().max() > 1e-3  # training did change the model
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(getattr(model.layers[0].mlp, n)) is nn.Linear for n in MLP_IN_OUT)
    names = [name for name, _ in model.named_parameters()]
    assert not any("lora" in name for name in names)
    assert names == [name for name, _ in tiny_model().named_parameters()]
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    # The merged model is a plain one: its weights load into a fresh Transformer.
    fresh = tiny_model(seed=3)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), adapted, rtol=1e-5, atol=1e-5)


def test_merge_weight_is_w_plus_scaled_ba():
    model = tiny_model()
    inject_lora(model, rank=2, alpha=3, dropout=0.0, target_modules="v_proj")
    v = model.layers[1].self_attn.v_proj
    with torch.no_grad():
        v.lora_B.normal_()
    expected = v.weight.double() + 1.5 * (v.lora_B.double() @ v.lora_A.double())
    merge_lora(model)
    torch.testing.assert_close(model.layers[1].self_attn.v_proj.weight.double(), expected, rtol=0, atol=1e-6)


def test_disable_adapters_gives_base_and_restores():
    model = tiny_model()
    x = tokens()
    base_logits = model(x)
    inject_lora(model, rank=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj,down_proj")
    train_adapters(model)
    adapted = model(x)
    with disable_adapters(model):
        assert torch.equal(model(x), base_logits)
    assert torch.equal(model(x), adapted)
    with pytest.raises(RuntimeError, match="inside"):
        with disable_adapters(model):
            raise RuntimeError("inside")
    assert torch.equal(model(x), adapted)
    # A layer switched off before the block stays off after it.
    model.layers[0].self_attn.q_proj.adapter_enabled = False
    with disable_adapters(model):
        pass
    assert not model.layers[0].self_attn.q_proj.adapter_enabled
    assert model.layers[1].self_attn.q_proj.adapter_enabled


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    inject_lora(model, rank=4, alpha=8, dropout=0.0, target_modules="q_proj,k_proj,v_proj,o_proj")
    train_adapters(model)
    x = tokens()
    adapted = model(x)
    save_adapter(str(tmp_path), model, adapter_config(model))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    # PEFT's names: the Hugging Face module path under PEFT's wrapper
    assert set(state) == {f"base_model.model.model.{name}.weight" for name in lora_state_dict(model)}
    assert len(state) == 2 * 4 * 2
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config == {**PEFT_CONFIG, **adapter_config(model)}
    assert adapter_config_for(model, "base") == adapter_config(model)  # what the scripts use to describe theirs

    fresh = tiny_model()
    loaded = load_adapter(fresh, str(tmp_path), seed=5)
    assert loaded["r"] == 4 and loaded["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert torch.equal(fresh(x), adapted)
    assert read_adapter_config(str(tmp_path)) == loaded


def test_load_errors_name_the_file(tmp_path):
    model = tiny_model()
    inject_lora(model, rank=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj")
    save_adapter(str(tmp_path), model, adapter_config(model, targets="q_proj,v_proj"))
    config_file = tmp_path / "adapter_config.json"
    weights_file = str(tmp_path / "adapter_model.safetensors")

    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "r": 2}))  # says rank 2, the weights are rank 4
    with pytest.raises(UserError, match="adapter_model.safetensors.*shape"):
        load_adapter(tiny_model(), str(tmp_path))

    config_file.write_text(json.dumps(config))
    state = load_file(weights_file)
    del state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(state, weights_file)
    with pytest.raises(UserError, match=r"adapter_model.safetensors.*missing.*layers.1.self_attn.v_proj.lora_B"):
        load_adapter(tiny_model(), str(tmp_path))

    # A base model of another width.
    other = Transformer(ModelConfig(**{**CFG, "hidden_size": 16, "num_heads": 2, "num_kv_heads": 1}))
    save_adapter(str(tmp_path), model, adapter_config(model, targets="q_proj,v_proj"))
    with pytest.raises(UserError, match="adapter_model.safetensors.*shape"):
        load_adapter(other, str(tmp_path))

    config_file.write_text(json.dumps({**config, "lora_alpah": 3}))
    with pytest.raises(UserError, match="adapter_config.json.*lora_alpah"):
        read_adapter_config(str(tmp_path))
    config_file.write_text(json.dumps({**config, "r": 0}))
    with pytest.raises(UserError, match="adapter_config.json: key 'r' must be at least 1, got 0$"):
        read_adapter_config(str(tmp_path))
    with pytest.raises(UserError, match="nowhere.*adapter_config.json.*not found"):
        load_adapter(tiny_model(), str(tmp_path / "nowhere"))


@pytest.mark.parametrize("text,message", [
    ('"lora_alpha": Infinity', "key 'lora_alpha' must be a finite number in (0, 2^16], got inf"),
    ('"lora_alpha": NaN', "key 'lora_alpha' must be a finite number in (0, 2^16], got nan"),
    ('"lora_alpha": 1e300', "key 'lora_alpha' must be <= 2^16, got 1e+300"),
    ('"r": 100000000000', "key 'r' must be at most 4096, got 100000000000"),
    ('"r": 8.5', "key 'r' must be an integer, got 8.5"),
    ('"lora_dropout": -Infinity', "key 'lora_dropout' must be a finite number in [0, 1), got -inf"),
])
def test_absurd_numbers_in_adapter_config_are_one_line(tmp_path, text, message):
    """adapter_config.json holds the numbers an adapter was trained with; NaN, infinite
    or absurd ones are refused before any layer is built, naming the file and key."""
    config = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj"]}
    body = json.dumps(config)
    key = text.split(":")[0]
    body = body.replace(f'{key}: {json.dumps(config[json.loads(key)])}', text)
    (tmp_path / "adapter_config.json").write_text(body)
    with pytest.raises(UserError) as error:
        read_adapter_config(str(tmp_path))
    assert str(error.value) == f"{tmp_path / 'adapter_config.json'}: {message}"


def test_an_unreadable_adapter_config_is_one_line(tmp_path):
    config_file = tmp_path / "adapter_config.json"
    good = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}
    config_file.write_bytes(json.dumps({**good, "base_model_name_or_path": "café"}, ensure_ascii=False)
                            .encode("latin-1"))
    with pytest.raises(UserError, match=r"adapter_config.json: not UTF-8 text \(byte 0xe9 at offset \d+\)$"):
        read_adapter_config(str(tmp_path))
    config_file.write_text(json.dumps(good)[:-1] + ', "extra": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(UserError, match=r"adapter_config.json: not valid JSON \(nested deeper than 100 levels\)$"):
        read_adapter_config(str(tmp_path))
    config_file.write_text(json.dumps({**good, "use_dora": "x" * 100_000}))
    with pytest.raises(UserError) as error:  # an unsupported key's value, cut short
        read_adapter_config(str(tmp_path))
    assert "use_dora='xxx" in str(error.value) and len(str(error.value)) < 500
    config_file.unlink()
    config_file.mkdir()
    with pytest.raises(UserError, match=r"adapter_config.json: is a directory, not a file$"):
        read_adapter_config(str(tmp_path))


def test_lora_settings_follow_the_configs_table():
    """inject_lora, adapter_config.json and the training configs hold LoRA's numbers to the same ranges."""
    from nanobumble.model.lora import LORA_ALPHA, LORA_RANK, lora_settings_problem
    from nanobumble.run.config import NUMBERS, SFTConfig
    assert NUMBERS["lora_rank"] is LORA_RANK and NUMBERS["lora_alpha"] is LORA_ALPHA
    for alpha in (math.inf, math.nan, 0.0, -1.0, 2.0**17):
        with pytest.raises(UserError, match=f"^key 'lora_alpha' must be .*, got {alpha}$"):
            inject_lora(tiny_model(), rank=4, alpha=alpha, dropout=0.0, target_modules="q_proj")
        with pytest.raises(ConfigError, match=f"^key 'lora_alpha' must be .*, got {alpha}$"):
            SFTConfig(lora_alpha=alpha)
    assert lora_settings_problem(8, 16.0, 0.0) is None
    assert lora_settings_problem(0, 16.0, 0.0, names=("r", "a", "d")) == "key 'r' must be at least 1, got 0"


def test_rslora_scaling():
    model = tiny_model()
    inject_lora(model, rank=16, alpha=8, dropout=0.0, target_modules="q_proj", use_rslora=True)
    assert model.layers[0].self_attn.q_proj.scaling == 2.0  # 8 / sqrt(16)
    model = tiny_model()
    inject_lora(model, rank=16, alpha=8, dropout=0.0, target_modules="q_proj")
    assert model.layers[0].self_attn.q_proj.scaling == 0.5  # 8 / 16


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), rank=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    no_dropout = LoRALinear(nn.Linear(16, 8), rank=4, alpha=4, dropout=0.0)
    no_dropout.load_state_dict(layer.state_dict())
    assert torch.equal(layer(x), no_dropout(x))
    layer.train()
    assert not torch.allclose(layer(x), no_dropout(x))
    # Dropout touches only the adapter's input: with the adapter off, train mode changes nothing.
    layer.adapter_enabled = False
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def test_targets():
    with pytest.raises(UserError, match="qq_proj.*valid: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                        "down_proj"):
        inject_lora(tiny_model(), rank=4, alpha=8, dropout=0.0, target_modules="q_proj,qq_proj")
    model = tiny_model()
    trainable = inject_lora(model, rank=4, alpha=8, dropout=0.0, target_modules="all")
    assert trainable == 2 * 4 * (sum(ATTN_IN_OUT.values()) + sum(MLP_IN_OUT.values()))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 7
    assert type(model.lm_head) is nn.Linear  # only projections inside the blocks
    model = tiny_model()
    trainable = inject_lora(model, rank=2, alpha=8, dropout=0.0, target_modules=["gate_proj", " down_proj"])
    assert trainable == 2 * 2 * (MLP_IN_OUT["gate_proj"] + MLP_IN_OUT["down_proj"])
    assert isinstance(model.layers[1].mlp.down_proj, LoRALinear)
    assert type(model.layers[1].mlp.up_proj) is nn.Linear
    assert type(model.layers[1].self_attn.q_proj) is nn.Linear
    with pytest.raises(UserError, match="already has LoRA"):
        inject_lora(model, rank=2, alpha=8, dropout=0.0, target_modules="q_proj")


def test_deterministic_init_and_meta_device():
    a, b, c = tiny_model(), tiny_model(seed=1), tiny_model()
    inject_lora(a, rank=4, alpha=8, dropout=0.0, target_modules="all", seed=7)
    inject_lora(b, rank=4, alpha=8, dropout=0.0, target_modules="all", seed=7)
    inject_lora(c, rank=4, alpha=8, dropout=0.0, target_modules="all", seed=8)
    sa, sb, sc = lora_state_dict(a), lora_state_dict(b), lora_state_dict(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.0.self_attn.q_proj.lora_A"], sc["layers.0.self_attn.q_proj.lora_A"])
    # Different layers get different values from the same seed.
    assert not torch.equal(sa["layers.0.self_attn.q_proj.lora_A"], sa["layers.1.self_attn.q_proj.lora_A"])

    with torch.device("meta"):
        meta = Transformer(ModelConfig(**CFG))
    inject_lora(meta, rank=4, alpha=8, dropout=0.0, target_modules="all", seed=7)
    assert meta.layers[0].mlp.up_proj.lora_A.is_meta
    meta.to_empty(device="cpu")
    init_lora_weights(meta, seed=7)
    sm = lora_state_dict(meta)
    assert all(torch.equal(sa[k], sm[k]) for k in sa)


def test_merge_cli_end_to_end(tmp_path):
    base_dir, lora_dir, out_dir = tmp_path / "base", tmp_path / "lora", tmp_path / "merged"
    tok = tmp_path / "tok.model"
    train_tokenizer(["bees make honey in the hive, flower after flower"] * 20, 300, str(tok))
    model = tiny_model()
    save_model_dir(str(base_dir), model, str(tok), "stage: sft\n")
    inject_lora(model, rank=4, alpha=8, dropout=0.0, target_modules="q_proj,up_proj", use_rslora=True)
    train_adapters(model)
    x = tokens()
    adapted = model(x)
    save_adapter(str(lora_dir), model, adapter_config(model, targets="q_proj,up_proj", use_rslora=True))
    (lora_dir / "training_args.yaml").write_text("stage: dpo\n")

    def merge(*args):
        return subprocess.run([sys.executable, "-m", "nanobumble.merge_lora", *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)

    result = merge("--base_model_path", str(base_dir), "--lora_model_path", str(lora_dir),
                   "--save_path", str(out_dir))
    assert result.returncode == 0, result.stderr
    assert "merged" in result.stdout and str(out_dir) in result.stdout
    merged, _ = load_model_dir(str(out_dir))
    torch.testing.assert_close(merged.eval()(x), adapted, rtol=1e-5, atol=1e-5)
    assert (out_dir / "tokenizer.model").read_bytes() == tok.read_bytes()
    assert (out_dir / "training_args.yaml").read_text() == "stage: dpo\n"
    assert "lora" not in " ".join(load_file(str(out_dir / "model.safetensors")))

    result = merge("--base_model_path", str(base_dir), "--lora_model_path", str(lora_dir))
    assert result.returncode == 2 and result.stderr.strip() == "error: key 'save_path' is required (--save_path)"
    result = merge("--base_model_path", str(base_dir), "--lora_model_path", str(lora_dir),
                   "--save_path", str(tmp_path / "x"), "--overwrite_output_dir", "maybe")
    assert result.returncode == 2 and "key 'overwrite_output_dir' expects bool" in result.stderr
    result = merge("--base_model_path", str(tmp_path / "missing"), "--lora_model_path", str(lora_dir),
                   "--save_path", str(tmp_path / "x"))
    assert result.returncode == 2 and "missing" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    (lora_dir / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    result = merge("--base_model_path", str(base_dir), "--lora_model_path", str(lora_dir),
                   "--save_path", str(tmp_path / "x"))
    assert result.returncode == 2 and "adapter_model.safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
