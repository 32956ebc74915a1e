"""Export to the Hugging Face format: transformers loads it as Qwen2ForCausalLM and
gives the same logits; its tokenizer gives nanobumble's ids and chat layout."""

import json
import os

import pytest
import torch

from nanobumble.chat_template import render
from nanobumble.checkpoint import save_model_dir
from nanobumble.export_hf import main as export_main
from nanobumble.model import ModelConfig, Transformer, pad_vocab_size
from nanobumble.tokenizer import Tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

TEXT = ("The bees fly from flower to flower and make honey in the hive. " * 3 +
        "A small model learns to answer questions, one token at a time 42 times.\n"
        "蜜蜂从一朵花飞到另一朵花，在蜂巢里酿蜜。小模型一次学习一个词。\n")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer([TEXT] * 4, 400, path)
    return path


def export_model(tmp_path, tokenizer_file, tie: bool, qkv_bias: bool):
    vocab = pad_vocab_size(Tokenizer(tokenizer_file).vocab_size)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=96, max_position_embeddings=128, rope_theta=5000.0,
                      tie_word_embeddings=tie, qkv_bias=qkv_bias)
    model = Transformer(cfg)
    with torch.no_grad():  # make every weight matter: non-zero biases, norms away from 1
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    save_model_dir(str(tmp_path / "model"), model, tokenizer_file, "stage: sft\n")
    export_main(["--model_path", str(tmp_path / "model"), "--save_path", str(tmp_path / "hf")])
    return model.eval(), str(tmp_path / "hf")


@pytest.mark.parametrize("tie,qkv_bias", [(True, True), (False, False)])
def test_transformers_loads_the_export_with_the_same_logits(tmp_path, tokenizer_file, tie, qkv_bias):
    model, hf_dir = export_model(tmp_path, tokenizer_file, tie, qkv_bias)
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["tie_word_embeddings"] is tie and config["num_key_value_heads"] == 2
    hf = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings is tie
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert ours.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_exported_tokenizer_gives_nanobumble_ids_and_chat_layout(tmp_path, tokenizer_file):
    _, hf_dir = export_model(tmp_path, tokenizer_file, tie=True, qkv_bias=True)
    with open(os.path.join(hf_dir, "generation_config.json")) as f:
        gen = json.load(f)
    assert (gen["temperature"], gen["top_p"], gen["top_k"], gen["repetition_penalty"]) == (0.7, 0.8, 20, 1.1)
    assert gen["eos_token_id"] == [3, 1]
    # AutoTokenizer would pick transformers' byte-level Qwen2 tokenizer for model_type qwen2 (v5);
    # the exported tokenizer.json is a sentencepiece-style BPE, loaded as a plain fast tokenizer.
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(hf_dir)
    ours = Tokenizer(tokenizer_file)
    for text in ["The bees fly to the hive.", "  two  spaces\n\nand lines 1234", "蜜蜂酿蜜。", "unseen 🐝 字"]:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text), text
        assert hf_tok.decode(ids) == text
    messages = [{"role": "user", "content": "Where do bees live?"}, {"role": "assistant", "content": "In a hive."},
                {"role": "user", "content": "蜜蜂?"}]
    theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(theirs["input_ids"]) == render(messages, ours, add_generation_prompt=True)[0]
