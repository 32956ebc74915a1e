"""A second checkable task, unlike the word transforms: add two numbers.

    python tests/sum_task.py OUT_DIR [--seed 0] [--sft 3000] [--pairs 3000] [--held_out 200] [--digits 3]

Each instruction adds two numbers of 1 to --digits digits:

    add: 347 + 85   -> 432

The answer is a number computed with carries, not a rearrangement of letters of
the prompt; sample_pairs checks it with --checker number. Writes the same four
files as tests/word_task.py (sft.jsonl, dpo.jsonl whose rejected answer is off by
1, 10 or 100, held_out.jsonl, held_out_pairs.jsonl). No held-out sum (in either
order) appears in sft.jsonl or dpo.jsonl. Everything is a function of the seed.
"""

from __future__ import annotations

import argparse
import random

from word_task import write_task_files


def instruction(a: int, b: int) -> str:
    return f"add: {a} + {b}"


def wrong_answer(rng: random.Random, a: int, b: int) -> str:
    """A near miss: the sum off by 1, 10 or 100 (a dropped or doubled carry), never negative."""
    right = a + b
    return str(rng.choice([x for x in (right + d for d in (-100, -10, -1, 1, 10, 100)) if x >= 0]))


def write_sum_task(directory: str, seed: int = 0, num_sft: int = 3000, num_pairs: int = 3000,
                   num_held_out: int = 200, digits: int = 3) -> dict[str, str]:
    """The four files of the task in directory; returns their paths by name (sft, dpo, held_out, held_out_pairs)."""
    rng = random.Random(seed)
    top = 10 ** digits

    def draw() -> tuple[int, int]:
        return rng.randrange(top), rng.randrange(top)

    held_out: list[tuple[int, int]] = []
    kept_out: set[tuple[int, int]] = set()
    while len(held_out) < num_held_out:
        a, b = draw()
        if (a, b) not in kept_out:
            kept_out.update({(a, b), (b, a)})
            held_out.append((a, b))

    def training_items(count: int) -> list[tuple[int, int]]:
        items = []
        while len(items) < count:
            a, b = draw()
            if (a, b) not in kept_out:
                items.append((a, b))
        return items

    sft_items = training_items(num_sft)
    pair_items = training_items(num_pairs)
    return write_task_files(directory, held_out, sft_items, pair_items, lambda item: instruction(*item),
                            lambda item: str(sum(item)), lambda item: wrong_answer(rng, *item))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft", type=int, default=3000, help="SFT instructions")
    parser.add_argument("--pairs", type=int, default=3000, help="preference pairs")
    parser.add_argument("--held_out", type=int, default=200, help="held-out prompts")
    parser.add_argument("--digits", type=int, default=3, help="most digits of each number")
    args = parser.parse_args()
    for name, path in write_sum_task(args.out_dir, args.seed, args.sft, args.pairs, args.held_out,
                                     args.digits).items():
        print(f"{name}: {path}")
