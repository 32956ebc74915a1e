import json
import os

import pytest
import torch
from chat_helpers import assistant, small_tokenizer, system, user
from conftest import REPO_ROOT

from nanobumble.base.errors import DataError
from nanobumble.data.chat_template import render
from nanobumble.data.dpo_data import PreferenceDataset, load_preference_pairs, tokenize_pairs
from nanobumble.data.tokenizer import EOT_ID, IM_END_ID, IM_START_ID, Tokenizer

TEXT = ("You are Bumblebee, a helpful AI assistant. system user assistant\n"
        "What is the capital of France? The capital of France is Paris. It is Rome.\n"
        "How many legs does a bee have? A bee has six legs. Eight. Thank you! You are welcome.\n"
        "蜜蜂有几条腿？蜜蜂有六条腿。八条。\n") * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return small_tokenizer(tmp_path_factory, TEXT)


def pair(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "where": "test"}


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return str(path)


def write_json(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False)
    return str(path)


# ---------------------------------------------------------------------------
# Loading

SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                       {"from": "human", "value": "How many legs does a bee have?"}],
     "chosen": {"from": "gpt", "value": "Six."}, "rejected": {"from": "gpt", "value": "Eight."}},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of France?"}],
     "chosen": "Paris.", "rejected": "Rome."},
]
ALPACA = [
    {"instruction": "Name the capital", "input": "France", "chosen": "Paris.", "rejected": "Rome."},
    {"instruction": "How many legs does a bee have?", "system": "Be brief.", "chosen": "Six.", "rejected": "Eight."},
]
OPENAI = [
    {"messages": [user("Capital of France?")], "chosen": "Paris.",
     "rejected": {"role": "assistant", "content": "Rome."}},
    {"messages": [system("Be brief."), user("Hi"), assistant("Hello!"), user("Legs of a bee?")],
     "chosen": {"role": "assistant", "content": "Six."}, "rejected": "Eight."},
]
EXPECTED = {
    "sharegpt": [([user("Hi"), assistant("Hello!"), user("How many legs does a bee have?")], "Six.", "Eight."),
                 ([system("Be brief."), user("Capital of France?")], "Paris.", "Rome.")],
    "alpaca": [([user("Name the capital\nFrance")], "Paris.", "Rome."),
               ([system("Be brief."), user("How many legs does a bee have?")], "Six.", "Eight.")],
    "messages": [([user("Capital of France?")], "Paris.", "Rome."),
                 ([system("Be brief."), user("Hi"), assistant("Hello!"), user("Legs of a bee?")], "Six.", "Eight.")],
}


@pytest.mark.parametrize("name, records", [("sharegpt", SHAREGPT), ("alpaca", ALPACA), ("messages", OPENAI)])
@pytest.mark.parametrize("writer", [write_json, write_jsonl], ids=["json", "jsonl"])
def test_formats_load(tmp_path, name, records, writer):
    path = writer(tmp_path / ("pref.json" if writer is write_json else "pref.jsonl"), records)
    pairs = load_preference_pairs(path)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == EXPECTED[name]
    assert pairs[1]["where"] == (f"{path}:record 1" if writer is write_json else f"{path}:2")


def test_bundled_dpo_dataset_loads(tok, capsys):
    pairs = load_preference_pairs(os.path.join(REPO_ROOT, "datasets/dpo"), strict=True)
    assert len(pairs) == 340
    assert all(p["prompt"][-1]["role"] == "user" and p["chosen"] != p["rejected"] for p in pairs)
    assert capsys.readouterr().err == ""
    tokenized, stats = tokenize_pairs(pairs, tok, 256, quiet=True)
    assert len(tokenized) == 340 and stats["dropped_identical"] == stats["dropped_empty"] == 0
    batch = PreferenceDataset(tokenized).batch(0, range(4))
    assert batch["input_ids"].shape[0] == 8


def test_unknown_shape_and_bad_records(tmp_path, capsys):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "x", "output": "y"}])
    with pytest.raises(DataError, match=r"sft\.jsonl:1: unknown preference record shape .*'instruction', 'output'"):
        load_preference_pairs(sft)
    path = write_jsonl(tmp_path / "pref.jsonl", [
        SHAREGPT[0],
        "{not json",
        {"conversations": [{"from": "human", "value": "Hi"}], "chosen": "a"},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"}], "chosen": "a",
         "rejected": "b"},
        {"conversations": [{"from": "human", "value": "Hi"}], "chosen": ["a"], "rejected": "b"},
        SHAREGPT[1],
    ])
    assert len(load_preference_pairs(path)) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: malformed JSON" in err
    assert f'{path}:3: missing "rejected"' in err
    assert f"{path}:4: the prompt must end with a user turn" in err
    assert f'{path}:5: "chosen" must be a string or an assistant message' in err
    with pytest.raises(DataError, match=f"{path}:2: malformed JSON"):
        load_preference_pairs(path, strict=True)


# ---------------------------------------------------------------------------
# Tokenizing


def test_labels_cover_exactly_the_response(tok):
    prompt = [user("Capital of France?")]
    tokenized, stats = tokenize_pairs([pair(prompt, "Paris.", "It is Rome.")], tok, 200, system_prompt=None,
                                      quiet=True)
    assert stats["pairs"] == 1
    p = tokenized[0]
    expected_prompt = ([IM_START_ID] + tok.encode("user\n") + tok.encode("Capital of France?") + [IM_END_ID]
                       + tok.encode("\n") + [IM_START_ID] + tok.encode("assistant\n"))
    assert p["prompt_ids"] == expected_prompt
    assert p["chosen_ids"] == tok.encode("Paris.") + [IM_END_ID]
    assert p["rejected_ids"] == tok.encode("It is Rome.") + [IM_END_ID]

    batch = PreferenceDataset(tokenized).batch(0, [0])
    P, C, R = len(expected_prompt), len(p["chosen_ids"]), len(p["rejected_ids"])
    L = P + max(C, R) - 1
    assert batch["input_ids"].shape == batch["labels"].shape == (2, L)
    chosen_row = expected_prompt + tok.encode("Paris.")  # inputs: the sequence without its last token
    rejected_row = expected_prompt + tok.encode("It is Rome.")
    assert batch["input_ids"][0].tolist() == chosen_row + [EOT_ID] * (L - len(chosen_row))
    assert batch["input_ids"][1].tolist() == rejected_row + [EOT_ID] * (L - len(rejected_row))
    # labels[i] is the token after input i: -100 until the last prompt token, which predicts the answer.
    padding = [-100] * (L - (P - 1 + C))
    assert batch["labels"][0].tolist() == [-100] * (P - 1) + tok.encode("Paris.") + [IM_END_ID] + padding
    assert batch["labels"][1].tolist() == [-100] * (P - 1) + tok.encode("It is Rome.") + [IM_END_ID]


def test_default_system_prompt_in_pairs(tok):
    prompt = [user("Capital of France?")]
    with_default = tokenize_pairs([pair(prompt, "Paris.", "Rome.")], tok, 200, quiet=True)[0][0]
    assert with_default["prompt_ids"] == render(prompt, tok, add_generation_prompt=True)[0]
    assert tok.decode(with_default["prompt_ids"]).startswith("<|im_start|>system\nYou are Bumblebee")


def test_truncation_cuts_prompt_from_the_left_then_responses(tok):
    prompt = [system("Be brief."), user("What is the capital of France? " * 4)]
    full_prompt = render(prompt, tok, add_generation_prompt=True)[0]
    header = [IM_START_ID] + tok.encode("assistant\n")
    chosen = tok.encode("The capital of France is Paris.") + [IM_END_ID]
    rejected = tok.encode("Rome.") + [IM_END_ID]
    p = pair(prompt, "The capital of France is Paris.", "Rome.")

    # Fits exactly: nothing cut.
    cutoff_len = len(full_prompt) + len(chosen) - 1
    (t,), stats = tokenize_pairs([p], tok, cutoff_len, quiet=True)
    assert (t["prompt_ids"], t["chosen_ids"], t["rejected_ids"]) == (full_prompt, chosen, rejected)
    assert stats["truncated"] == 0

    # Five tokens too long: the prompt loses its first five tokens, the responses stay whole.
    (t,), stats = tokenize_pairs([p], tok, cutoff_len - 5, quiet=True)
    assert t["prompt_ids"] == full_prompt[5:]
    assert (t["chosen_ids"], t["rejected_ids"]) == (chosen, rejected)
    assert stats["truncated"] == 1
    assert len(t["prompt_ids"]) + len(t["chosen_ids"]) == cutoff_len - 5 + 1

    # Room for less than header + chosen: the prompt is down to the header, chosen is cut from the right.
    cutoff_len = len(header) + 3 - 1
    (t,), _ = tokenize_pairs([p], tok, cutoff_len, quiet=True)
    assert t["prompt_ids"] == header
    assert t["chosen_ids"] == chosen[:3]
    assert t["rejected_ids"] == rejected[:3]

    # No room for any response token: dropped.
    out, stats = tokenize_pairs([p], tok, len(header) - 1, quiet=True)
    assert out == [] and stats["dropped_empty"] == 1


def test_identical_pairs_dropped(tok):
    prompt = [user("Capital of France?")]
    pairs = [pair(prompt, "Paris.", "Paris."), pair(prompt, "Paris.", "Rome."),
             pair(prompt, "It is Paris.", "It is Rome.")]
    out, stats = tokenize_pairs(pairs, tok, 200, quiet=True)
    assert len(out) == 2 and stats["dropped_identical"] == 1
    # Identical once truncated (same start, cut before they differ): dropped too.
    header = [IM_START_ID] + tok.encode("assistant\n")
    common = len(tok.encode("It is"))
    assert tok.encode("It is Paris.")[:common] == tok.encode("It is Rome.")[:common]
    out, stats = tokenize_pairs(pairs[2:], tok, len(header) + common - 1, quiet=True)
    assert out == [] and stats["dropped_identical"] == 1


# ---------------------------------------------------------------------------
# Batches


def make_dataset(tok) -> tuple[PreferenceDataset, list[dict]]:
    questions = ["Capital of France?", "How many legs does a bee have?", "Hi", "蜜蜂有几条腿？", "Thank you!"]
    pairs = [pair([user(q)], f"Good answer {i}.", f"Bad {i}") for i, q in enumerate(questions)]
    tokenized, _ = tokenize_pairs(pairs, tok, 200, quiet=True)
    return PreferenceDataset(tokenized), tokenized


def test_batch_layout(tok):
    data, tokenized = make_dataset(tok)
    assert data.num_pairs == 5
    indices = [0, 1, 2]
    batch = data.batch(7, indices)
    n = len(indices)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape[0] == labels.shape[0] == 2 * n
    for row, index in enumerate(indices):
        p = tokenized[data.order(7, index)]
        P = len(p["prompt_ids"])
        assert ids[row, :P].tolist() == ids[n + row, :P].tolist() == p["prompt_ids"]
        chosen = [t for t in labels[row].tolist() if t != -100]
        rejected = [t for t in labels[n + row].tolist() if t != -100]
        assert chosen == p["chosen_ids"] and rejected == p["rejected_ids"]
    # Padding: EOT inputs and ignored labels after each row's end.
    lengths = [len(tokenized[data.order(7, i)]["prompt_ids"]) + len(tokenized[data.order(7, i)][k]) - 1
               for k in ("chosen_ids", "rejected_ids") for i in indices]
    assert ids.shape[1] == max(lengths)
    for row, length in enumerate(lengths):
        assert (ids[row, length:] == EOT_ID).all() and (labels[row, length:] == -100).all()


def test_batch_determinism(tok):
    data, _ = make_dataset(tok)
    a = data.batch(3, list(range(12)))
    b = data.batch(3, list(range(12)))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    # Index i gives the same pair alone or inside a batch; each epoch covers every pair once.
    for i in range(12):
        alone = data.batch(3, [i])
        width = alone["input_ids"].shape[1]
        assert alone["input_ids"][0].tolist() == a["input_ids"][i, :width].tolist()
        assert alone["labels"][1].tolist() == a["labels"][12 + i, :width].tolist()
    assert sorted(data.order(3, i) for i in range(5)) == list(range(5))
    assert sorted(data.order(3, i) for i in range(5, 10)) == list(range(5))
    assert len({tuple(data.order(seed, i) for i in range(5)) for seed in range(6)}) > 1


# ---------------------------------------------------------------------------
# Token ids checked where rows are made (the LM loss does not check its targets: no host sync)


def test_tokenize_refuses_an_id_outside_the_vocabulary(tok, monkeypatch):
    """The tokenizer cannot make such an id; if one ever did, it is refused naming file:line."""
    monkeypatch.setattr(tok, "encode", lambda text: [7, tok.vocab_size] if text == "Rome." else [7, 8])
    p = pair([user("Capital of France?")], "Paris.", "Rome.") | {"where": "prefs.jsonl:12"}
    with pytest.raises(DataError, match=rf"^prefs.jsonl:12: token id {tok.vocab_size} is outside the vocabulary"):
        tokenize_pairs([p], tok, 200, system_prompt=None, quiet=True)


def test_dataset_refuses_ids_outside_the_vocabulary():
    pairs = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7]},
             {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 99]}]
    PreferenceDataset(pairs, vocab_size=100)
    with pytest.raises(DataError, match=r"^preference pair \(rejected_ids\) 1 \(tokenized data\), a target: "
                                        r"token id 99 is outside the vocabulary \[0, 99\)"):
        PreferenceDataset(pairs, vocab_size=99)
    with pytest.raises(DataError, match="token id -1"):
        PreferenceDataset([{"prompt_ids": [1, -1], "chosen_ids": [4], "rejected_ids": [6]}])
