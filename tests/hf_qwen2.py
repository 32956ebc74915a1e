"""A small Hugging Face Qwen2 model directory built offline, as `save_pretrained`
writes one (used by tests/programs/test_import_hf.py): a random Qwen2ForCausalLM, and a
byte-level BPE tokenizer trained with the `tokenizers` library on the copy task's
text, with the ChatML special tokens and a chat template written in the manner
of Qwen2.5's (a default system prompt when the conversation has none)."""

import os

import torch
from copy_task import LETTERS

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def write_tokenizer(directory: str, texts: list[str], vocab_size: int = 400) -> int:
    """Train and save the tokenizer; return its size (specials included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return tokenizer.get_vocab_size()


def make_qwen2_dir(directory: str, texts: list[str], tie: bool = True, shard: bool = False, seed: int = 0,
                   hidden_size: int = 64, num_layers: int = 2, intermediate_size: int = 96) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    os.makedirs(directory, exist_ok=True)
    vocab = write_tokenizer(directory, texts)
    config = Qwen2Config(vocab_size=(vocab + 63) // 64 * 64, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=intermediate_size,
                         max_position_embeddings=256, rope_theta=5000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=tie, use_sliding_window=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # every weight matters: norms away from 1, biases away from 0
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    model.save_pretrained(directory, max_shard_size="200KB" if shard else "5GB")
    return directory


def tokenizer_texts() -> list[str]:
    """What the tokenizer learns its merges from: the task's fixed words, and its
    letters only one at a time, so that a word is its letters (as for the copy
    task's sentencepiece tokenizer), and copying it is learnable in a few steps."""
    return ["copy:\n" + " ".join(LETTERS), "system user assistant"] * 50
