"""TRL's dataset formats and Parquet files, read by SFT, DPO and pretraining.

Each TRL record must give exactly the tokens (and loss mask) of the same data
written in a shape nanobumble read before (messages for SFT, a messages pair
for DPO); the same records in a Parquet file must give what their JSON Lines
file gives; a bad Parquet row is `file:row N: reason`, a damaged file one line.
"""

import hashlib
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from chat_helpers import assistant, small_tokenizer, system, user

from nanobumble.base.errors import DataError
from nanobumble.data import records as records_module
from nanobumble.data.dpo_data import PreferenceDataset, load_preference_pairs, tokenize_pairs
from nanobumble.data.records import iter_text_records, list_data_files
from nanobumble.data.sft_data import load_conversations, tokenize_sft
from nanobumble.data.tokenizer import EOT_ID, IM_END_ID, IM_START_ID, Tokenizer

TEXT = ("You are Bumblebee, a helpful AI assistant. system user assistant\n"
        "What is the capital of France? The capital of France is Paris. It is Rome.\n"
        "How many legs does a bee have? A bee has six legs. Eight. Thank you! You are welcome.\n"
        "Bees live in a hive and make honey from flowers.\n"
        "蜜蜂有几条腿？蜜蜂有六条腿。八条。\n") * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return small_tokenizer(tmp_path_factory, TEXT)


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


def write_parquet(path, records, row_group_size=None) -> str:
    """One column per key of any record (from_pylist would keep only the first record's keys), null where absent."""
    keys = list(dict.fromkeys(key for record in records for key in record))
    table = pa.Table.from_pydict({key: [record.get(key) for record in records] for key in keys})
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def sft_tokens(path, tok, cutoff_len=200, system_prompt=""):
    conversations = load_conversations(path, quiet=True)
    samples, _ = tokenize_sft(conversations, tok, cutoff_len, system_prompt=system_prompt, quiet=True)
    return samples


def dpo_tokens(path, tok, cutoff_len=200, system_prompt=""):
    pairs = load_preference_pairs(path, quiet=True)
    tokenized, _ = tokenize_pairs(pairs, tok, cutoff_len, system_prompt=system_prompt, quiet=True)
    return pairs, tokenized


# ---------------------------------------------------------------------------
# SFT: prompt-completion and language modelling

PROMPT_COMPLETION = [
    {"prompt": "What is the capital of France?", "completion": "Paris."},
    {"prompt": "How many legs does a bee have?", "completion": " A bee has six legs."},
]
PROMPT_COMPLETION_AS_MESSAGES = [
    {"messages": [user("What is the capital of France?"), assistant("Paris.")]},
    {"messages": [user("How many legs does a bee have?"), assistant(" A bee has six legs.")]},
]
CONVERSATIONAL_PROMPT_COMPLETION = [
    {"prompt": [system("Be brief."), user("Hi"), assistant("Hello!"), user("What is the capital of France?")],
     "completion": [assistant("Paris.")]},
    {"prompt": [user("How many legs does a bee have?")],
     "completion": [{"role": "assistant", "content": "Six.", "name": "bee"}]},  # extra keys are dropped
]
CONVERSATIONAL_AS_MESSAGES = [
    {"messages": [system("Be brief."), user("Hi"), assistant("Hello!"), user("What is the capital of France?"),
                  assistant("Paris.")]},
    {"messages": [user("How many legs does a bee have?"), assistant("Six.")]},
]


def test_prompt_completion_is_a_user_turn_and_its_answer(tmp_path, tok):
    """Fails before TRL's formats: {"prompt", "completion"} was an unknown record shape."""
    trl = write_jsonl(tmp_path / "trl.jsonl", PROMPT_COMPLETION)
    messages = write_jsonl(tmp_path / "messages.jsonl", PROMPT_COMPLETION_AS_MESSAGES)
    for system_prompt in ("", "You are a bee."):
        assert sft_tokens(trl, tok, system_prompt=system_prompt) == \
            sft_tokens(messages, tok, system_prompt=system_prompt)
    # Checked by hand: ChatML with no system prompt, the loss on the answer and its <|im_end|> only.
    (ids, mask), _ = sft_tokens(trl, tok)
    S, E, nl = [IM_START_ID], [IM_END_ID], tok.encode("\n")
    segments = [(S + tok.encode("user\n"), False), (tok.encode("What is the capital of France?"), False),
                (E, False), (nl, False), (S + tok.encode("assistant\n"), False), (tok.encode("Paris."), True),
                (E, True), (nl, False)]
    assert ids == [t for part, _ in segments for t in part]
    assert mask == [trained for part, trained in segments for _ in part]
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "Paris.<|im_end|>"


def test_conversational_prompt_completion_is_one_conversation(tmp_path, tok):
    """Fails before TRL's formats: unknown record shape."""
    trl = write_jsonl(tmp_path / "trl.jsonl", CONVERSATIONAL_PROMPT_COMPLETION)
    messages = write_jsonl(tmp_path / "messages.jsonl", CONVERSATIONAL_AS_MESSAGES)
    assert [c["messages"] for c in load_conversations(trl, quiet=True)] == \
        [r["messages"] for r in CONVERSATIONAL_AS_MESSAGES]
    assert sft_tokens(trl, tok) == sft_tokens(messages, tok)
    assert sft_tokens(trl, tok, system_prompt="You are a bee.") == \
        sft_tokens(messages, tok, system_prompt="You are a bee.")


def test_bad_prompt_completion_records(tmp_path, capsys):
    path = write_jsonl(tmp_path / "pc.jsonl", [
        PROMPT_COMPLETION[0],
        {"prompt": "Hi"},
        {"prompt": "Hi", "completion": [assistant("Hello!")]},
        {"prompt": [user("Hi")], "completion": [user("Hello?")]},
        {"prompt": [user("Hi"), assistant("Hello!")], "completion": [assistant("again")]},
        {"prompt": [user("Hi")], "completion": [assistant("Hello!"), user("and?")]},
        PROMPT_COMPLETION[1],
    ])
    assert len(load_conversations(path)) == 2
    err = capsys.readouterr().err
    assert f'{path}:2: missing "completion"' in err
    assert f'{path}:3: "prompt" and "completion" must be two strings or two lists of messages, got str and list' \
        in err
    assert f'{path}:4: "completion" must start with an assistant message' in err
    assert f"{path}:5: message 2 is 'assistant' where 'user' was expected" in err
    assert f"{path}:6: the conversation must end with an assistant turn" in err


def test_text_is_trained_on_every_token_without_a_template(tmp_path, tok):
    """Fails before TRL's formats: {"text"} was an unknown record shape for SFT."""
    texts = ["Bees live in a hive and make honey from flowers.", "蜜蜂有六条腿。"]
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    assert [c["text"] for c in load_conversations(path, quiet=True)] == texts
    for system_prompt in ("", "You are a bee."):  # no chat template, so no system prompt either
        samples = sft_tokens(path, tok, system_prompt=system_prompt)
        # As pretraining lays a document out: its tokens, then <|endoftext|>; every one a target.
        assert samples == [(tok.encode(t) + [EOT_ID], [True] * (len(tok.encode(t)) + 1)) for t in texts]
    # Too long: the start is kept, cut at cutoff_len + 1 tokens.
    ids = tok.encode(texts[0]) + [EOT_ID]
    samples, stats = tokenize_sft(load_conversations(path, quiet=True), tok, 5, quiet=True)
    assert samples[0] == (ids[:6], [True] * 6) and stats["truncated"] == 1
    # A text with no token: only <|endoftext|>, nothing to predict: dropped.
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": texts[1]}])
    samples, stats = tokenize_sft(load_conversations(empty, quiet=True), tok, 100, quiet=True)
    assert len(samples) == 1 and stats["dropped"] == 1


def test_the_old_shapes_win_and_unknown_shapes_list_their_keys(tmp_path):
    both = write_jsonl(tmp_path / "both.jsonl", [{**PROMPT_COMPLETION_AS_MESSAGES[0], "text": "x", "prompt": "y"}])
    assert load_conversations(both, quiet=True)[0]["messages"] == PROMPT_COMPLETION_AS_MESSAGES[0]["messages"]
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "x", "answer": "y"}])
    with pytest.raises(DataError) as error:
        load_conversations(odd)
    assert str(error.value).startswith(f"{odd}:1: unknown record shape (keys ['answer', 'question']); expected ")
    assert "prompt and completion" in str(error.value) and "\n" not in str(error.value)
    pref = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"pref\.jsonl:1: this is preference data"):
        load_conversations(pref)


# ---------------------------------------------------------------------------
# DPO: explicit and implicit prompts

EXPLICIT = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Rome."},
    {"prompt": "How many legs does a bee have?", "chosen": "Six.", "rejected": "Eight."},
]
EXPLICIT_AS_MESSAGES = [
    {"messages": [user("What is the capital of France?")], "chosen": "Paris.", "rejected": "Rome."},
    {"messages": [user("How many legs does a bee have?")], "chosen": "Six.", "rejected": "Eight."},
]
CONVERSATIONAL_EXPLICIT = [
    {"prompt": [user("What is the capital of France?")], "chosen": [assistant("Paris.")],
     "rejected": [assistant("Rome.")]},
    {"prompt": [system("Be brief."), user("Hi"), assistant("Hello!"), user("How many legs does a bee have?")],
     "chosen": [assistant("Six.")], "rejected": [assistant("Eight.")]},
]
CONVERSATIONAL_EXPLICIT_AS_MESSAGES = [
    {"messages": [user("What is the capital of France?")], "chosen": "Paris.", "rejected": "Rome."},
    {"messages": [system("Be brief."), user("Hi"), assistant("Hello!"), user("How many legs does a bee have?")],
     "chosen": "Six.", "rejected": "Eight."},
]
IMPLICIT = [  # UltraFeedback's layout: both answers as whole conversations
    {"chosen": [user("What is the capital of France?"), assistant("Paris.")],
     "rejected": [user("What is the capital of France?"), assistant("Rome.")]},
    {"chosen": [system("Be brief."), user("Hi"), assistant("Hello!"), user("How many legs does a bee have?"),
                assistant("Six.")],
     "rejected": [system("Be brief."), user("Hi"), assistant("Hello!"), user("How many legs does a bee have?"),
                  assistant("Eight.")], "score_chosen": 8.0, "score_rejected": 2.0},
]

ULTRAFEEDBACK = [  # HuggingFaceH4/ultrafeedback_binarized's columns: "prompt" and "messages" beside the two
    {"prompt": r["chosen"][-2]["content"], "prompt_id": str(i), "chosen": r["chosen"], "rejected": r["rejected"],
     "messages": r["chosen"], "score_chosen": 8.0, "score_rejected": 2.0} for i, r in enumerate(IMPLICIT)]


def same_pairs(a: str, b: str, tok) -> None:
    """a and b give the same pairs, the same token ids and the same DPO batch (ids and labels)."""
    pairs_a, tokens_a = dpo_tokens(a, tok)
    pairs_b, tokens_b = dpo_tokens(b, tok)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs_a] == \
        [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs_b]
    assert tokens_a == tokens_b and len(tokens_a) == len(pairs_a)
    batch_a, batch_b = (PreferenceDataset(t).batch_of_pairs(range(len(t))) for t in (tokens_a, tokens_b))
    for key in ("input_ids", "labels"):
        assert torch.equal(batch_a[key], batch_b[key])
    bee = "You are a bee."
    assert dpo_tokens(a, tok, system_prompt=bee)[1] == dpo_tokens(b, tok, system_prompt=bee)[1]


@pytest.mark.parametrize("trl_records, old_records", [(EXPLICIT, EXPLICIT_AS_MESSAGES),
                                                      (CONVERSATIONAL_EXPLICIT, CONVERSATIONAL_EXPLICIT_AS_MESSAGES),
                                                      (IMPLICIT, CONVERSATIONAL_EXPLICIT_AS_MESSAGES),
                                                      (ULTRAFEEDBACK, CONVERSATIONAL_EXPLICIT_AS_MESSAGES)],
                         ids=["explicit-standard", "explicit-conversational", "implicit-conversational",
                              "ultrafeedback"])
def test_preference_formats_give_the_same_pairs(tmp_path, tok, trl_records, old_records):
    """Fails before TRL's formats: each was an unknown preference record shape."""
    same_pairs(write_jsonl(tmp_path / "trl.jsonl", trl_records), write_jsonl(tmp_path / "old.jsonl", old_records), tok)


def test_explicit_prompt_labels_by_hand(tmp_path, tok):
    path = write_jsonl(tmp_path / "trl.jsonl", EXPLICIT[:1])
    _, (item,) = dpo_tokens(path, tok)
    S, E, nl = [IM_START_ID], [IM_END_ID], tok.encode("\n")
    prompt = S + tok.encode("user\n") + tok.encode("What is the capital of France?") + E + nl + S + \
        tok.encode("assistant\n")
    assert item == {"prompt_ids": prompt, "chosen_ids": tok.encode("Paris.") + E,
                    "rejected_ids": tok.encode("Rome.") + E}
    batch = PreferenceDataset([item]).batch_of_pairs([0])
    chosen_labels = batch["labels"][0].tolist()
    assert chosen_labels == [-100] * (len(prompt) - 1) + tok.encode("Paris.") + E + \
        [-100] * (len(chosen_labels) - len(prompt) - len(tok.encode("Paris.")))


def test_bad_implicit_and_explicit_records(tmp_path, capsys):
    path = write_jsonl(tmp_path / "pref.jsonl", [
        IMPLICIT[0],
        {"chosen": [user("Capital?"), assistant("Paris.")],
         "rejected": [user("Capital of Italy?"), assistant("Rome.")]},
        {"chosen": [user("Capital?"), assistant("Paris."), user("Sure?")],
         "rejected": [user("Capital?"), assistant("Rome.")]},
        {"chosen": [user("Capital?"), assistant("Paris.")], "rejected": "Rome."},
        {"chosen": [user("Capital?"), assistant("Paris.")]},
        IMPLICIT[1],
    ])
    assert len(load_preference_pairs(path)) == 2
    err = capsys.readouterr().err
    assert f'{path}:2: "chosen" and "rejected" do not share a prompt' in err
    assert f'{path}:3: "chosen" must end with an assistant turn' in err
    assert f'{path}:4: "rejected" must be a list of messages' in err
    assert f'{path}:5: missing "rejected"' in err
    assert all(line.startswith(f"{path}:") for line in err.splitlines())
    with pytest.raises(DataError, match=rf'^{path}:2: "chosen" and "rejected" do not share a prompt: [^\n]*$'):
        load_preference_pairs(path, strict=True)

    explicit = write_jsonl(tmp_path / "explicit.jsonl", [
        EXPLICIT[0],
        {"prompt": [user("Hi"), assistant("Hello!")], "chosen": "a", "rejected": "b"},
        {"prompt": 5, "chosen": "a", "rejected": "b"},
        {"prompt": "Hi", "chosen": [assistant("a"), assistant("b")], "rejected": "b"},
        {"prompt": [user("Hi"), {"role": "tool", "content": "x"}], "chosen": "a", "rejected": "b"},
    ])
    assert len(load_preference_pairs(explicit)) == 1
    err = capsys.readouterr().err
    assert f"{explicit}:2: the prompt must end with a user turn" in err
    assert f'{explicit}:3: "prompt" must be a string or a list of messages, got int' in err
    assert f'{explicit}:4: "chosen" must be a string or an assistant message' in err
    assert f"{explicit}:5: \"prompt\": message 1 has role 'tool'" in err


def test_unknown_preference_shapes_list_their_keys(tmp_path):
    for record in ({"chosen": "The sky is blue.", "rejected": "The sky is green."},  # TRL's standard implicit
                   {"question": "x", "chosen": "a", "rejected": "b"}):
        path = write_jsonl(tmp_path / "pref.jsonl", [record])
        with pytest.raises(DataError) as error:
            load_preference_pairs(path)
        message = str(error.value)
        assert message.startswith(f"{path}:1: unknown preference record shape (keys {sorted(record)!r}); expected")
        assert "implicit prompt" in message and "\n" not in message


# ---------------------------------------------------------------------------
# Parquet


def test_parquet_sft_gives_what_jsonl_gives(tmp_path, tok):
    """Fails before Parquet: a .parquet file was read as JSON Lines (every line malformed)."""
    for name, records in (("messages", CONVERSATIONAL_AS_MESSAGES), ("pc", PROMPT_COMPLETION),
                          ("conv_pc", CONVERSATIONAL_PROMPT_COMPLETION),
                          ("text", [{"text": "Bees make honey."}, {"text": "蜜蜂有六条腿。"}])):
        jsonl = write_jsonl(tmp_path / f"{name}.jsonl", records)
        parquet = write_parquet(tmp_path / f"{name}.parquet", records)
        loaded = load_conversations(parquet, quiet=True)
        assert [c["where"] for c in loaded] == [f"{parquet}:row {i + 1}" for i in range(len(records))]
        assert sft_tokens(parquet, tok) == sft_tokens(jsonl, tok) != []


def test_parquet_dpo_gives_what_jsonl_gives(tmp_path, tok):
    for name, records in (("explicit", EXPLICIT), ("conv", CONVERSATIONAL_EXPLICIT), ("implicit", IMPLICIT),
                          ("ultrafeedback", ULTRAFEEDBACK), ("messages", EXPLICIT_AS_MESSAGES)):
        same_pairs(write_parquet(tmp_path / f"{name}.parquet", records),
                   write_jsonl(tmp_path / f"{name}.jsonl", records), tok)


def test_parquet_pretraining_text_and_its_identity(tmp_path):
    texts = [f"document {i}: bees make honey" for i in range(7)]
    jsonl = write_jsonl(tmp_path / "data.jsonl", [{"text": t} for t in texts])
    parquet = write_parquet(tmp_path / "data.parquet", [{"text": t, "id": i} for i, t in enumerate(texts)],
                            row_group_size=3)  # three row groups
    stats = {}
    assert list(iter_text_records([parquet], stats=stats)) == list(iter_text_records([jsonl])) == texts
    # The identity covers the Parquet file's bytes as it covers a JSON file's: its size, NUL, every byte.
    with open(parquet, "rb") as f:
        expected = hashlib.sha256(f"{os.path.getsize(parquet)}\0".encode() + f.read()).hexdigest()
    assert stats["data_sha256"] == expected and stats["documents"] == 7
    # A directory lists Parquet files beside JSON ones.
    assert list_data_files(str(tmp_path)) == [jsonl, parquet]


def test_parquet_rows_are_read_a_batch_at_a_time_and_numbered_from_1(tmp_path, monkeypatch, capsys):
    records = [{"text": f"doc {i}"} for i in range(10)]
    records[6]["text"] = None  # row 7
    path = write_parquet(tmp_path / "data.parquet", records, row_group_size=4)
    monkeypatch.setattr(records_module, "PARQUET_BATCH_ROWS", 3)  # batches cut across row groups
    assert list(iter_text_records([path])) == [f"doc {i}" for i in range(10) if i != 6]
    assert capsys.readouterr().err == f'{path}:row 7: "text" must be a string, got NoneType (skipped)\n'
    with pytest.raises(DataError) as error:
        list(iter_text_records([path], strict=True))
    assert str(error.value) == f'{path}:row 7: "text" must be a string, got NoneType'


def test_a_bad_parquet_row_is_file_row_n(tmp_path, capsys):
    """Fails before Parquet: the file was read as JSON Lines."""
    sft = write_parquet(tmp_path / "sft.parquet", [PROMPT_COMPLETION[0], {"prompt": "Hi", "completion": None},
                                                   PROMPT_COMPLETION[1]])
    assert len(load_conversations(sft)) == 2
    assert f'{sft}:row 2: "prompt" and "completion" must be two strings or two lists of messages, got str and ' \
        f"NoneType (skipped)" in capsys.readouterr().err
    dpo = write_parquet(tmp_path / "dpo.parquet", [EXPLICIT[0], {**EXPLICIT[1], "rejected": None}, EXPLICIT[1]])
    with pytest.raises(DataError, match=rf'^{dpo}:row 2: "rejected" must be a string or an assistant message'):
        load_preference_pairs(dpo, strict=True)


@pytest.mark.parametrize("reader", ["text", "sft", "dpo"])
def test_a_damaged_parquet_file_is_one_line(tmp_path, reader):
    """Fails before Parquet: read as JSON Lines, a damaged file gave 'no documents' or 'malformed JSON' lines,
    not a message saying the Parquet file is unreadable."""
    records = {"text": [{"text": "bees"}] * 20, "sft": PROMPT_COMPLETION * 10, "dpo": EXPLICIT * 10}[reader]
    whole = open(write_parquet(tmp_path / "whole.parquet", records), "rb").read()
    damaged = bytearray(whole)
    damaged[8:200] = bytes(192)  # the first data pages zeroed: the footer still reads
    for name, content in (("truncated", whole[: len(whole) // 2]), ("empty", b""), ("damaged", bytes(damaged))):
        path = tmp_path / f"{name}.parquet"
        path.write_bytes(content)
        with pytest.raises(DataError) as error:
            {"text": lambda p: list(iter_text_records([p])), "sft": load_conversations,
             "dpo": load_preference_pairs}[reader](str(path))
        message = str(error.value)
        assert message.startswith(f"{path}: not a readable Parquet file: ") and "\n" not in message, message


def test_without_pyarrow_parquet_is_one_line(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "data.parquet", [{"text": "bees"}])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if pyarrow were not installed
    with pytest.raises(DataError) as error:
        list(iter_text_records([path]))
    assert str(error.value) == f"{path}: reading Parquet files needs pyarrow (pip install pyarrow)"


# ---------------------------------------------------------------------------
# TRL itself reads the records the same way (slow: importing trl takes seconds)


@pytest.mark.slow
def test_trl_agrees_on_the_formats(tmp_path):
    from trl.data_utils import extract_prompt, is_conversational, maybe_extract_prompt

    for records, conversational in ((PROMPT_COMPLETION, False), (CONVERSATIONAL_PROMPT_COMPLETION, True),
                                    (EXPLICIT, False), (CONVERSATIONAL_EXPLICIT, True), (IMPLICIT, True)):
        assert all(is_conversational(r) == conversational for r in records)
    # The implicit prompt is TRL's extracted prompt; the answers are what TRL leaves of chosen and rejected.
    pairs = load_preference_pairs(write_jsonl(tmp_path / "implicit.jsonl", IMPLICIT), quiet=True)
    for record, pair in zip(IMPLICIT, pairs):
        extracted = extract_prompt({"chosen": record["chosen"], "rejected": record["rejected"]})
        assert extracted["prompt"] == pair["prompt"]
        assert extracted["chosen"] == [assistant(pair["chosen"])]
        assert extracted["rejected"] == [assistant(pair["rejected"])]
    # A string "prompt" beside whole conversations (UltraFeedback) is ignored by TRL, and here.
    pairs = load_preference_pairs(write_jsonl(tmp_path / "uf.jsonl", ULTRAFEEDBACK), quiet=True)
    for record, pair in zip(ULTRAFEEDBACK, pairs):
        extracted = maybe_extract_prompt(record)
        assert (extracted["prompt"], extracted["chosen"], extracted["rejected"]) == \
            (pair["prompt"], [assistant(pair["chosen"])], [assistant(pair["rejected"])])
    # And where the prompt is conversational too, TRL reads it as given (the explicit prompt).
    for record in CONVERSATIONAL_EXPLICIT:
        assert maybe_extract_prompt(record) == record
