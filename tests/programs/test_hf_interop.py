"""nanobumble beside the Hugging Face stack: its LoRA adapters load in PEFT and
PEFT's load here with the same logits; a padded batch gives transformers' logits."""

import json

import pytest
import torch

from nanobumble.base.errors import UserError
from nanobumble.data.tokenizer import Tokenizer, train_tokenizer
from nanobumble.export_hf import export_hf
from nanobumble.model.lora import inject_lora
from nanobumble.model.transformer import ModelConfig, Transformer, pad_vocab_size
from nanobumble.store.adapter import adapter_config_for, load_adapter, save_adapter
from nanobumble.store.model_dir import load_model_dir, save_model_dir

transformers = pytest.importorskip("transformers")

TEXT = "The bees fly from flower to flower and make honey in the hive. A small model learns one token at a time.\n"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small random nanobumble model directory and its Hugging Face export."""
    root = tmp_path_factory.mktemp("interop")
    tokenizer_file = str(root / "tokenizer.model")
    train_tokenizer([TEXT] * 8, 320, tokenizer_file)
    cfg = ModelConfig(vocab_size=pad_vocab_size(Tokenizer(tokenizer_file).vocab_size), hidden_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, intermediate_size=96, max_position_embeddings=128,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # every weight matters: norms away from 1, biases away from 0
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    save_model_dir(str(root / "model"), model, tokenizer_file, "stage: sft\n")
    export_hf(str(root / "model"), str(root / "hf"))
    return root


def ids(vocab: int, rows: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(1))


def test_a_nanobumble_adapter_loads_in_peft_with_the_same_logits(exported, tmp_path):
    peft = pytest.importorskip("peft")
    model, cfg = load_model_dir(str(exported / "model"))
    inject_lora(model, rank=4, alpha=8.0, dropout=0.0, target_modules="q_proj,v_proj,down_proj", use_rslora=True)
    with torch.no_grad():  # B starts at zero: give the adapter something to say
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    save_adapter(str(tmp_path / "adapter"), model, adapter_config_for(model, str(exported / "hf")))

    base = transformers.AutoModelForCausalLM.from_pretrained(str(exported / "hf"), torch_dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    x = ids(cfg.vocab_size)
    with torch.no_grad():
        ours, theirs = model.eval()(x), adapted(x).logits
        with adapted.disable_adapter():
            plain = adapted(x).logits
    assert (ours - plain).abs().max() > 1e-2  # the adapter changes the output, so the match below means something
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_an_exported_lora_run_loads_with_auto_peft_model_with_the_same_logits(exported, tmp_path):
    """export_hf on a LoRA run's directory: the base model at save_path, the adapter in
    save_path/adapter naming it, so AutoPeftModelForCausalLM finds both from the adapter alone."""
    peft = pytest.importorskip("peft")
    model, cfg = load_model_dir(str(exported / "model"))
    inject_lora(model, rank=4, alpha=8.0, dropout=0.0, target_modules="q_proj,o_proj,up_proj", use_rslora=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    run = tmp_path / "lora_run"  # what train_sft.py --finetuning_type lora writes
    save_model_dir(str(run), model, str(exported / "tokenizer.model"), "stage: sft\n",
                   adapter_config_for(model, str(exported / "model")))
    export_hf(str(run), str(tmp_path / "hf"))

    adapted = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "hf" / "adapter"),
                                                            torch_dtype=torch.float32).eval()
    x = ids(cfg.vocab_size)
    with torch.no_grad():
        ours, theirs = model.eval()(x), adapted(x).logits
        with adapted.disable_adapter():
            plain = adapted(x).logits
    assert (ours - plain).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tokenizer.encode(TEXT, add_special_tokens=False) == Tokenizer(str(exported / "tokenizer.model")).encode(TEXT)


def peft_adapter(exported, path, **options):
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(exported / "hf"), torch_dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "up_proj"], init_lora_weights=False, **options)
    adapted = peft.get_peft_model(base, config).eval()
    adapted.save_pretrained(str(path))
    return adapted


def test_a_peft_adapter_loads_here_with_the_same_logits(exported, tmp_path):
    adapted = peft_adapter(exported, tmp_path / "peft")
    model, cfg = load_model_dir(str(exported / "model"))
    config = load_adapter(model, str(tmp_path / "peft"))
    assert config["r"] == 4 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == ["k_proj", "q_proj", "up_proj"]
    x = ids(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), adapted(x).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("option,value", [("use_dora", True), ("bias", "lora_only"),
                                          ("modules_to_save", ["lm_head"]), ("rank_pattern", {"q_proj": 8})])
def test_peft_options_that_change_the_math_are_refused_by_name(exported, tmp_path, option, value):
    adapter = tmp_path / "adapter"
    peft_adapter(exported, adapter)  # plain, then the option written in as PEFT would
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, option: value}))
    model, _ = load_model_dir(str(exported / "model"))
    with pytest.raises(UserError, match=rf"adapter_config.json: {option}="):
        load_adapter(model, str(adapter))


def test_a_left_padded_batch_matches_transformers(exported):
    model, cfg = load_model_dir(str(exported / "model"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(exported / "hf"), torch_dtype=torch.float32).eval()
    x = ids(cfg.vocab_size)
    mask = torch.ones_like(x)
    mask[0, :9] = 0  # row 0 is left-padded by 9 tokens, row 1 is full
    with torch.no_grad():
        ours = model.eval()(x, attention_mask=mask)
        theirs = hf(x, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - model(x)[real]).abs().max() > 1e-2  # padding matters for row 0
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    # and the padded row equals the same tokens without padding
    torch.testing.assert_close(ours[0, 9:], model(x[:1, 9:])[0], atol=1e-5, rtol=1e-5)
