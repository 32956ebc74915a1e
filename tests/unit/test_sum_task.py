"""The second benchmark task (tests/sum_task.py): right answers, near-miss rejections,
and no held-out sum, in either order, among the training prompts."""

import json
import re

from sum_task import write_sum_task


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def operands(prompt):
    a, b = re.fullmatch(r"add: (\d+) \+ (\d+)", prompt).groups()
    return int(a), int(b)


def test_the_sum_task_is_right_and_keeps_its_held_out_sums_out(tmp_path):
    paths = write_sum_task(str(tmp_path / "a"), seed=3, num_sft=400, num_pairs=400, num_held_out=100, digits=2)
    sft, dpo, held_out = read(paths["sft"]), read(paths["dpo"]), read(paths["held_out"])
    assert (len(sft), len(dpo), len(held_out)) == (400, 400, 100)
    for record in sft:
        a, b = operands(record["messages"][0]["content"])
        assert record["messages"][1]["content"] == str(a + b) and a < 100 and b < 100
    for record in dpo + read(paths["held_out_pairs"]):
        a, b = operands(record["messages"][0]["content"])
        assert record["chosen"] == str(a + b)
        assert abs(int(record["rejected"]) - (a + b)) in (1, 10, 100) and int(record["rejected"]) >= 0
    kept_out = {operands(r["prompt"]) for r in held_out}
    assert all(int(r["answer"]) == sum(operands(r["prompt"])) for r in held_out)
    seen = {operands(r["messages"][0]["content"]) for r in sft + dpo}
    assert not seen & (kept_out | {(b, a) for a, b in kept_out})
    again = write_sum_task(str(tmp_path / "b"), seed=3, num_sft=400, num_pairs=400, num_held_out=100, digits=2)
    assert all(read(paths[k]) == read(again[k]) for k in paths)  # a function of the seed
