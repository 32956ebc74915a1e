"""A small synthetic instruction task for the SFT and DPO tests: "copy:\\n<word>"
-> "<word>", over random words of the letters a-j. Held-out words never
appear in training, so a correct answer shows the skill, not memory."""

import json
import os
import random

import torch
from helpers import generate

from nanobumble.data.chat_template import render
from nanobumble.data.tokenizer import Tokenizer, train_tokenizer
from nanobumble.inference.generation import GenerationConfig
from nanobumble.model.transformer import Transformer
from nanobumble.store.model_dir import model_config_for, save_model_dir

LETTERS = "abcdefghij"


def make_words(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6))) for _ in range(count)]


def prompt(word: str) -> list[dict]:
    return [{"role": "user", "content": f"copy:\n{word}"}]


def make_base(directory: str, train_words: list[str]) -> Tokenizer:
    """A randomly initialised tiny model directory with a tokenizer for the task."""
    os.makedirs(directory, exist_ok=True)
    tok_file = train_tokenizer([f"copy:\n{w}\n{w}" for w in train_words[:500]] + [" ".join(LETTERS)], 280,
                               os.path.join(directory, "tok.model"))
    tokenizer = Tokenizer(tok_file)
    torch.manual_seed(0)
    base = Transformer(model_config_for("tiny", tokenizer.vocab_size))
    save_model_dir(os.path.join(directory, "base"), base, tok_file, "stage: pretrain\n")
    return tokenizer


def write_sft_data(path: str, words: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for w in words:
            f.write(json.dumps({"messages": prompt(w) + [{"role": "assistant", "content": w}]}) + "\n")


def write_dpo_data(path: str, words: list[str]) -> None:
    """chosen = the copy, rejected = the word reversed (a wrong answer of the same letters)."""
    with open(path, "w", encoding="utf-8") as f:
        for w in words:
            if w != w[::-1]:
                f.write(json.dumps({"messages": prompt(w), "chosen": w, "rejected": w[::-1]}) + "\n")


@torch.no_grad()
def greedy_answers(model, tokenizer: Tokenizer, words: list[str], system_prompt: str = "") -> list[str]:
    model.eval()
    cfg = GenerationConfig(max_new_tokens=10, do_sample=False, repetition_penalty=1.0)
    answers = []
    for w in words:
        ids, _ = render(prompt(w), tokenizer, system_prompt=system_prompt, add_generation_prompt=True)
        answers.append(tokenizer.decode(generate(model, ids, cfg, vocab_size=tokenizer.vocab_size,
                                                 stop_ids=(tokenizer.im_end_id, tokenizer.eot_id))))
    return answers


def greedy_accuracy(model, tokenizer: Tokenizer, words: list[str], system_prompt: str = "") -> float:
    answers = greedy_answers(model, tokenizer, words, system_prompt)
    return sum(a == w for a, w in zip(answers, words)) / len(words)
