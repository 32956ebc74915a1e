"""A checkable instruction task for the quality benchmark: transform a word.

    python tests/word_task.py OUT_DIR [--seed 0] [--sft 3000] [--pairs 3000] [--held_out 200]

Each instruction names an operation and a word of 3-7 letters from a-j:

    reverse: cabd      -> dbac
    uppercase: cabd    -> CABD
    repeat: cabd       -> cabd cabd
    sort: cabd         -> abcd

Writes into OUT_DIR:
    sft.jsonl              SFT records, {"messages": [user, assistant]}
    dpo.jsonl              preference pairs, {"messages": [user], "chosen": right, "rejected": another
                           operation's output (never equal to the right one)}
    held_out.jsonl         exact-match prompts for nanobumble.evaluate, {"prompt", "answer"}
    held_out_pairs.jsonl   preference pairs on the held-out prompts (DPO's --eval_dataset_path)

Held-out words never appear in sft.jsonl or dpo.jsonl, so a right answer shows
the skill, not memory. Everything is a function of the seed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Callable

LETTERS = "abcdefghij"
OPERATIONS = {
    "reverse": lambda w: w[::-1],
    "uppercase": lambda w: w.upper(),
    "repeat": lambda w: f"{w} {w}",
    "sort": lambda w: "".join(sorted(w)),
}


def random_word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))


def instruction(operation: str, word: str) -> str:
    return f"{operation}: {word}"


def wrong_answer(rng: random.Random, operation: str, word: str) -> str:
    """Another operation's output on the same word that differs from the right answer."""
    right = OPERATIONS[operation](word)
    others = [OPERATIONS[op](word) for op in OPERATIONS if op != operation]
    return rng.choice([answer for answer in others if answer != right])  # uppercase always differs


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def write_word_task(directory: str, seed: int = 0, num_sft: int = 3000, num_pairs: int = 3000,
                    num_held_out: int = 200) -> dict[str, str]:
    """The four files of the task in directory; returns their paths by name (sft, dpo, held_out, held_out_pairs)."""
    rng = random.Random(seed)
    held_out_words: set[str] = set()
    held_out = []
    while len(held_out) < num_held_out:  # distinct (operation, word) prompts, words kept out of training
        operation, word = rng.choice(list(OPERATIONS)), random_word(rng)
        if word not in held_out_words:
            held_out_words.add(word)
            held_out.append((operation, word))

    def training_items(count: int) -> list[tuple[str, str]]:
        items = []
        while len(items) < count:
            word = random_word(rng)
            if word not in held_out_words:
                items.append((rng.choice(list(OPERATIONS)), word))
        return items

    sft_items = training_items(num_sft)
    pair_items = training_items(num_pairs)
    return write_task_files(directory, held_out, sft_items, pair_items, lambda item: instruction(*item),
                            lambda item: OPERATIONS[item[0]](item[1]), lambda item: wrong_answer(rng, *item))


def write_task_files(directory: str, held_out: list, sft_items: list, pair_items: list,
                     prompt: Callable, answer: Callable, wrong: Callable) -> dict[str, str]:
    """A checkable task's four files in directory from its items (prompt(item), answer(item):
    the right answer, wrong(item): a wrong one); their paths by name (sft, dpo, held_out, held_out_pairs)."""
    def pair(item) -> dict:
        return {"messages": [{"role": "user", "content": prompt(item)}], "chosen": answer(item),
                "rejected": wrong(item)}

    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, f"{name}.jsonl") for name in ("sft", "dpo", "held_out", "held_out_pairs")}
    write_jsonl(paths["sft"], [{"messages": [{"role": "user", "content": prompt(item)},
                                             {"role": "assistant", "content": answer(item)}]} for item in sft_items])
    write_jsonl(paths["dpo"], [pair(item) for item in pair_items])
    write_jsonl(paths["held_out"], [{"prompt": prompt(item), "answer": answer(item)} for item in held_out])
    write_jsonl(paths["held_out_pairs"], [pair(item) for item in held_out])
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft", type=int, default=3000, help="SFT instructions")
    parser.add_argument("--pairs", type=int, default=3000, help="preference pairs")
    parser.add_argument("--held_out", type=int, default=200, help="held-out prompts")
    args = parser.parse_args()
    for name, path in write_word_task(args.out_dir, args.seed, args.sft, args.pairs, args.held_out).items():
        print(f"{name}: {path}")
