"""Shared by the chat-template, data, chat and serving tests: message builders, a
small tokenizer trained in-process on a test's own text, and a tiny chat model."""

import torch

from nanobumble.data.tokenizer import Tokenizer, train_tokenizer
from nanobumble.model.lora import inject_lora
from nanobumble.model.transformer import ModelConfig, Transformer, pad_vocab_size
from nanobumble.store.adapter import adapter_config_for, save_adapter
from nanobumble.store.model_dir import save_model_dir


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def small_tokenizer(tmp_path_factory, text: str) -> Tokenizer:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer(text.split("\n"), 500, path)
    return Tokenizer(path)


def save_tiny_chat_model(root, corpus: str, context: int, model_dirs: dict[str, str]) -> None:
    """A random tiny model with weights scaled up, so that its greedy answers vary,
    saved as root/<name> with the training_args.yaml given for each name, and a
    LoRA adapter on top of the first one (random B: it changes the answers) as
    root/adapter."""
    tok_file = train_tokenizer([corpus], 400, str(root / "tokenizer.model"))
    cfg = ModelConfig(vocab_size=pad_vocab_size(Tokenizer(tok_file).vocab_size), hidden_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, intermediate_size=96, max_position_embeddings=context)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20)
    for name, training_args in model_dirs.items():
        save_model_dir(str(root / name), model, tok_file, training_args)
    inject_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    save_adapter(str(root / "adapter"), model, adapter_config_for(model, str(root / next(iter(model_dirs)))))
