import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from chat_helpers import assistant, small_tokenizer, system, user
from conftest import REPO_ROOT

from nanobumble.base.errors import DataError
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT, render
from nanobumble.data.sft_data import SFTDataset, load_conversations, sample_targets, tokenize_sft
from nanobumble.data.tokenizer import EOT_ID, IM_END_ID, IM_START_ID, Tokenizer
from nanobumble.model.transformer import ModelConfig, Transformer

TEXT = ("You are Bumblebee, a helpful AI assistant. system user assistant\n"
        "What is the capital of France? The capital of France is Paris.\n"
        "How many legs does a bee have? A bee has six legs. Thank you! You are welcome.\n"
        "Reverse the word: garden. nedrag. Add 12 and 30: 42.\n"
        "蜜蜂有几条腿？蜜蜂有六条腿。谢谢！不客气。\n") * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return small_tokenizer(tmp_path_factory, TEXT)


def conversation(*messages):
    return {"messages": list(messages), "where": "test"}


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return str(path)


def write_json(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
    return str(path)


# ---------------------------------------------------------------------------
# Rendering and masks


def test_two_turn_mask_token_by_token(tok):
    messages = [system("Be brief."), user("What is the capital of France?"), assistant("Paris."),
                user("Thank you!"), assistant("You are welcome.")]
    S, E = [IM_START_ID], [IM_END_ID]
    nl = tok.encode("\n")
    # (token ids of the segment, trained?) in order
    segments = [
        (S + tok.encode("system\n"), False), (tok.encode("Be brief."), False), (E, False), (nl, False),
        (S + tok.encode("user\n"), False), (tok.encode("What is the capital of France?"), False), (E, False),
        (nl, False),
        (S + tok.encode("assistant\n"), False), (tok.encode("Paris."), True), (E, True), (nl, False),
        (S + tok.encode("user\n"), False), (tok.encode("Thank you!"), False), (E, False), (nl, False),
        (S + tok.encode("assistant\n"), False), (tok.encode("You are welcome."), True), (E, True), (nl, False),
    ]
    expected_ids = [t for ids, _ in segments for t in ids]
    expected_mask = [trained for ids, trained in segments for _ in ids]
    ids, mask = render(messages, tok)
    assert ids == expected_ids
    assert mask == expected_mask
    assert tok.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of "
                               "France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\n"
                               "Thank you!<|im_end|>\n<|im_start|>assistant\nYou are welcome.<|im_end|>\n")

    # tokenize_sft gives the same sample; targets are ids[1:] with untrained ones at -100.
    samples, stats = tokenize_sft([conversation(*messages)], tok, cutoff_len=1000)
    assert samples == [(expected_ids, expected_mask)]
    assert stats["truncated"] == 0 and stats["dropped"] == 0
    x, y = sample_targets(*samples[0])
    assert x.tolist() == expected_ids[:-1]
    assert y.tolist() == [t if m else -100 for t, m in zip(expected_ids[1:], expected_mask[1:])]
    trained = [t for t in y.tolist() if t != -100]
    assert trained == tok.encode("Paris.") + E + tok.encode("You are welcome.") + E


def test_default_system_prompt_in_sft(tok):
    conv = conversation(user("Hi"), assistant("Hello"))
    (with_default, _), = tokenize_sft([conv], tok, 1000, quiet=True)[0]
    assert with_default == render([system(DEFAULT_SYSTEM_PROMPT), user("Hi"), assistant("Hello")], tok,
                                  system_prompt=None)[0]
    for none in ("", None):
        (without, _), = tokenize_sft([conv], tok, 1000, system_prompt=none, quiet=True)[0]
        assert without == render([user("Hi"), assistant("Hello")], tok, system_prompt=None)[0]
        assert without[:2] == [IM_START_ID] + tok.encode("user\n")[:1]


# ---------------------------------------------------------------------------
# Loading


ALPACA = [
    {"instruction": "Reverse the word", "input": "garden", "output": "nedrag"},
    {"instruction": "Add 12 and 30", "output": "42", "system": "Be brief.",
     "history": [["Hi", "Hello!"], ["Thank you!", "You are welcome."]]},
]
ALPACA_MESSAGES = [
    [user("Reverse the word\ngarden"), assistant("nedrag")],
    [system("Be brief."), user("Hi"), assistant("Hello!"), user("Thank you!"), assistant("You are welcome."),
     user("Add 12 and 30"), assistant("42")],
]
SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                       {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Add 12 and 30"},
                       {"from": "gpt", "value": "42"}]},
    {"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello!"}],
     "system": "Top-level system."},
]
SHAREGPT_MESSAGES = [
    [system("Be brief."), user("Hi"), assistant("Hello!"), user("Add 12 and 30"), assistant("42")],
    [system("Top-level system."), user("Hi"), assistant("Hello!")],
]
OPENAI = [
    {"messages": [user("Hi"), assistant("Hello!")]},
    {"messages": [system("Be brief."), user("Hi"), assistant("Hello!"), user("Bye"), assistant("Bye!")],
     "id": 7},
]


PROMPT_COMPLETION = [  # TRL's prompt-completion, standard and conversational
    {"prompt": "Reverse the word: garden.", "completion": "nedrag."},
    {"prompt": [system("Be brief."), user("Hi")], "completion": [assistant("Hello!")]},
]
PROMPT_COMPLETION_MESSAGES = [
    [user("Reverse the word: garden."), assistant("nedrag.")],
    [system("Be brief."), user("Hi"), assistant("Hello!")],
]


def write_parquet(path, records) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = list(dict.fromkeys(key for record in records for key in record))  # every record's, null where absent
    pq.write_table(pa.Table.from_pydict({key: [record.get(key) for record in records] for key in keys}), str(path))
    return str(path)


@pytest.mark.parametrize("records, expected", [(ALPACA, ALPACA_MESSAGES), (SHAREGPT, SHAREGPT_MESSAGES),
                                               (OPENAI, [r["messages"] for r in OPENAI]),
                                               (PROMPT_COMPLETION[:1], PROMPT_COMPLETION_MESSAGES[:1]),
                                               (PROMPT_COMPLETION[1:], PROMPT_COMPLETION_MESSAGES[1:])],
                         ids=["alpaca", "sharegpt", "messages", "prompt-completion", "conversational-pc"])
@pytest.mark.parametrize("writer", [write_json, write_jsonl, write_parquet], ids=["json", "jsonl", "parquet"])
def test_formats_load(tmp_path, records, expected, writer):
    suffix = {write_json: ".json", write_jsonl: ".jsonl", write_parquet: ".parquet"}[writer]
    path = writer(tmp_path / f"data{suffix}", records)
    conversations = load_conversations(path)
    assert [c["messages"] for c in conversations] == expected
    first_where = {write_json: f"{path}:record 0", write_jsonl: f"{path}:1", write_parquet: f"{path}:row 1"}[writer]
    assert conversations[0]["where"] == first_where


def test_directory_and_comma_list(tmp_path):
    a = write_json(tmp_path / "a.json", ALPACA)
    b = write_jsonl(tmp_path / "b.jsonl", SHAREGPT)
    assert len(load_conversations(str(tmp_path))) == 4
    assert len(load_conversations(f"{a},{b}")) == 4
    assert len(load_conversations(b)) == 2


def test_unknown_shape_names_file_and_record(tmp_path):
    path = write_json(tmp_path / "odd.json", [{"question": "x", "answer": "y"}])  # (prompt, completion): TRL's
    with pytest.raises(DataError, match=r"odd\.json:record 0: unknown record shape .*'answer', 'question'"):
        load_conversations(path)
    path = write_jsonl(tmp_path / "odd.jsonl", ['"just a string"', {"instruction": "x", "output": "y"}])
    with pytest.raises(DataError, match=r"odd\.jsonl:1: unknown record shape \(a JSON str"):
        load_conversations(path)
    pref = write_jsonl(tmp_path / "pref.jsonl", [{"conversations": [], "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"pref\.jsonl:1: .*preference data"):
        load_conversations(pref)


def test_bad_records_skipped_or_strict(tmp_path, capsys):
    path = write_jsonl(tmp_path / "data.jsonl", [
        ALPACA[0],
        '{"instruction": "broken',
        {"instruction": "no output"},
        {"instruction": "x", "output": "y", "history": [["only one"]]},
        ALPACA[1],
    ])
    conversations = load_conversations(path)
    assert [c["messages"] for c in conversations] == ALPACA_MESSAGES
    captured = capsys.readouterr()
    err = captured.err
    assert f"{path}:2: malformed JSON" in err
    assert f'{path}:3: missing "output"' in err
    assert f"{path}:4: history[0]" in err
    assert "2 conversations from 1 files (alpaca 2), 3 bad records skipped" in captured.out
    with pytest.raises(DataError, match=f"{path}:2: malformed JSON"):
        load_conversations(path, strict=True)


def test_bad_sharegpt_records(tmp_path, capsys):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        SHAREGPT[0],
        {"conversations": [{"from": "gpt", "value": "I start"}, {"from": "human", "value": "no"}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "tool", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "Hi"}]},
    ])
    assert len(load_conversations(path)) == 1
    err = capsys.readouterr().err
    assert f"{path}:2: message 0 is 'assistant' where 'user' was expected" in err
    assert f"{path}:3: conversations[1] has \"from\": 'tool'" in err
    assert f"{path}:4: the conversation must end with an assistant turn" in err


def test_bundled_sft_datasets_load(capsys):
    alpaca = load_conversations(os.path.join(REPO_ROOT, "datasets/sft/alpaca_zh_en.json"), strict=True)
    sharegpt = load_conversations(os.path.join(REPO_ROOT, "datasets/sft/sharegpt_multiturn.jsonl"), strict=True)
    assert len(alpaca) == 360 and len(sharegpt) == 240
    assert any(c["messages"][0]["role"] == "system" for c in alpaca)
    assert any(len(c["messages"]) > 3 for c in alpaca)  # history
    assert max(len(c["messages"]) for c in sharegpt) >= 7
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------
# Truncation and dropping


def test_truncation_drops_whole_trailing_exchanges(tok):
    messages = [system("Be brief."), user("Hi"), assistant("Hello!"), user("Add 12 and 30"), assistant("42"),
                user("Reverse the word: garden."), assistant("nedrag.")]
    two_exchanges = render(messages[:5], tok)[0]
    full = render(messages, tok)[0]
    assert len(two_exchanges) < len(full)
    # Room for two exchanges but not three: the third goes, the start stays untouched.
    for cutoff_len in (len(two_exchanges) - 1, len(full) - 2):
        samples, stats = tokenize_sft([conversation(*messages)], tok, cutoff_len, quiet=True)
        assert samples == [render(messages[:5], tok)]
        assert stats["truncated"] == 1
    # Exactly fitting: nothing is cut.
    samples, stats = tokenize_sft([conversation(*messages)], tok, len(full) - 1, quiet=True)
    assert samples == [render(messages, tok)] and stats["truncated"] == 0
    # Not even the first exchange fits: its tokens are cut at cutoff_len + 1, keeping the start.
    one_exchange = render(messages[:3], tok)
    cutoff_len = len(one_exchange[0]) - 4
    samples, stats = tokenize_sft([conversation(*messages)], tok, cutoff_len, quiet=True)
    assert samples == [(one_exchange[0][:cutoff_len + 1], one_exchange[1][:cutoff_len + 1])]
    assert stats["truncated"] == 1 and stats["dropped"] == 0


def test_sample_without_trained_tokens_is_dropped(tok):
    short = conversation(user("Hi"), assistant("Hello!"))
    long_question = conversation(user("What is the capital of France? " * 10), assistant("Paris."))
    prompt_len = len(render(long_question["messages"][:1], tok, system_prompt=None)[0])
    header = [IM_START_ID] + tok.encode("assistant\n")
    # The window ends inside the assistant header: no answer token is left to learn.
    cutoff_len = prompt_len + len(header) - 2
    samples, stats = tokenize_sft([short, long_question, short], tok, cutoff_len, system_prompt=None, quiet=True)
    assert len(samples) == 2 and stats["dropped"] == 1 and stats["loaded"] == 3 and stats["truncated"] == 1
    # The answer's first token as the very last token of the window is still one trained target.
    first_answer = prompt_len + len(header)
    samples, stats = tokenize_sft([long_question], tok, first_answer, system_prompt=None, quiet=True)
    assert stats["dropped"] == 0 and sum(samples[0][1]) == 1


def test_tokenize_prints_summary(tok, capsys):
    tokenize_sft([conversation(user("Hi"), assistant("Hello!"))], tok, 100)
    out = capsys.readouterr().out
    assert "1 samples from 1 conversations" in out and "0 truncated" in out and "0 dropped" in out


# ---------------------------------------------------------------------------
# Packing and padding


def synthetic(lengths: list[int], start: int = 10) -> list[tuple[list[int], list[bool]]]:
    """Samples of distinct ids, every token trained: targets show exactly what they predict."""
    samples = []
    for n in lengths:
        samples.append((list(range(start, start + n)), [True] * n))
        start += 100
    return samples


def test_packing_layout():
    samples = synthetic([5, 4, 7, 9, 3])  # 4, 3, 6, 8, 2 input tokens
    data = SFTDataset(samples, cutoff_len=8, packing=True)
    # Greedy in order: [4+3] [6] [8] [2]; a sample that does not fit starts the next row.
    assert data.num_rows == 4
    x0, y0, p0 = data.rows[0]
    assert x0.tolist() == [10, 11, 12, 13, 110, 111, 112, EOT_ID]
    assert y0.tolist() == [11, 12, 13, 14, 111, 112, 113, -100]
    assert p0.tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    x1, y1, p1 = data.rows[1]
    assert x1.tolist() == [210, 211, 212, 213, 214, 215, EOT_ID, EOT_ID]
    assert p1.tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert y1.tolist() == [211, 212, 213, 214, 215, 216, -100, -100]
    x2, y2, p2 = data.rows[2]
    assert p2.tolist() == list(range(8)) and y2.tolist() == list(range(311, 319))
    assert data.rows[3][2].tolist() == [0, 1, 0, 1, 2, 3, 4, 5]
    for x, y, p in data.rows:
        assert len(x) == len(y) == len(p) == 8
    # Targets never cross a boundary: the last input of sample A predicts A's own last
    # token, and sample B's first target is B's second token.
    assert y0[3] == 14 and y0[4] == 111
    assert data.num_target_tokens == 4 + 3 + 6 + 8 + 2


def test_packing_with_real_samples_masks(tok):
    convs = [conversation(user("Hi"), assistant("Hello!")),
             conversation(user("Add 12 and 30"), assistant("42")),
             conversation(user("Thank you!"), assistant("You are welcome."))]
    samples, _ = tokenize_sft(convs, tok, 200, quiet=True)
    data = SFTDataset(samples, cutoff_len=200, packing=True)
    assert data.num_rows == 1
    x, y, p = data.rows[0]
    offset = 0
    for ids, mask in samples:
        n = len(ids) - 1
        ex, ey = sample_targets(ids, mask)
        assert x[offset:offset + n].tolist() == ex.tolist() and y[offset:offset + n].tolist() == ey.tolist()
        assert p[offset:offset + n].tolist() == list(range(n))
        offset += n
    assert (y[offset:] == -100).all() and (x[offset:] == EOT_ID).all()
    assert data.num_target_tokens == sum(sum(m[1:]) for _, m in samples)


def tiny_model(vocab_size: int) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                                    num_kv_heads=2, intermediate_size=64, max_position_embeddings=256))
    model.kernels = "torch"
    return model.eval()


@torch.no_grad()
def test_packed_row_loss_equals_each_conversation_alone(tok):
    convs = [conversation(user("Hi"), assistant("Hello!")),
             conversation(system("Be brief."), user("Add 12 and 30"), assistant("42"), user("Thank you!"),
                          assistant("You are welcome.")),
             conversation(user("蜜蜂有几条腿？"), assistant("蜜蜂有六条腿。"))]
    samples, _ = tokenize_sft(convs, tok, 200, quiet=True)
    data = SFTDataset(samples, cutoff_len=200, packing=True)
    assert data.num_rows == 1
    model = tiny_model(tok.vocab_size)
    x, y, pos = data.batch(0, [0])
    packed = F.cross_entropy(model(x, position_ids=pos)[0], y[0], reduction="none")
    offset = 0
    for ids, mask in samples:
        ax, ay = (torch.from_numpy(a)[None] for a in sample_targets(ids, mask))
        alone = F.cross_entropy(model(ax)[0], ay[0], reduction="none")
        n = ax.shape[1]
        torch.testing.assert_close(packed[offset:offset + n], alone, atol=1e-5, rtol=1e-5)
        assert (alone > 0).sum() == (ay != -100).sum()  # the test compares real losses, not zeros
        offset += n
    assert offset < 200 and (packed[offset:] == 0).all()  # end padding: ignored targets
    # The model's own masked mean over the row equals the mean over every trained token.
    mean = model(x, targets=y, position_ids=pos)
    torch.testing.assert_close(mean, packed[y[0] != -100].mean(), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_padding_mode_ignores_padding(tok):
    convs = [conversation(user("Hi"), assistant("Hello!")),
             conversation(user("What is the capital of France?"), assistant("The capital of France is Paris."))]
    samples, _ = tokenize_sft(convs, tok, 200, quiet=True)
    data = SFTDataset(samples, cutoff_len=200, packing=False)
    assert data.num_rows == 2
    model = tiny_model(tok.vocab_size)
    i_short = next(i for i in range(4) if data.order(3, i) == 0)
    i_long = next(i for i in range(4) if data.order(3, i) == 1)
    x, y, pos = data.batch(3, [i_short, i_long])
    assert pos is None
    short_len, long_len = len(samples[0][0]) - 1, len(samples[1][0]) - 1
    assert x.shape == (2, long_len) and short_len < long_len
    assert (x[0, short_len:] == EOT_ID).all() and (y[0, short_len:] == -100).all()
    losses = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(2, -1)
    ax, ay = (torch.from_numpy(a)[None] for a in sample_targets(*samples[0]))
    alone = F.cross_entropy(model(ax)[0], ay[0], reduction="none")
    torch.testing.assert_close(losses[0, :short_len], alone, atol=1e-5, rtol=1e-5)
    assert (losses[0, short_len:] == 0).all()


def test_batch_determinism_and_epochs():
    samples = synthetic([3, 4, 5, 6, 7, 8, 9])
    for packing in (False, True):
        data = SFTDataset(samples, cutoff_len=10, packing=packing)
        n = data.num_rows
        first = data.batch(5, list(range(2 * n + 3)))
        again = data.batch(5, list(range(2 * n + 3)))
        for a, b in zip(first, again):
            assert (a is None and b is None) or torch.equal(a, b)
        # Index i gives the same row alone or inside any batch.
        for i in range(2 * n + 3):
            alone = data.batch(5, [i])
            rows = data.rows[data.order(5, i)]
            assert alone[0][0, :len(rows[0])].tolist() == rows[0].tolist()
            length = len(rows[0])
            assert first[0][i, :length].tolist() == rows[0].tolist()
            assert first[1][i, :length].tolist() == rows[1].tolist()
        # Each epoch visits every row once, in an order that depends on (seed, epoch).
        epoch0 = [data.order(5, i) for i in range(n)]
        epoch1 = [data.order(5, n + i) for i in range(n)]
        assert sorted(epoch0) == sorted(epoch1) == list(range(n))
        assert epoch0 == np.random.default_rng([5, 0]).permutation(n).tolist()
        assert epoch1 == np.random.default_rng([5, 1]).permutation(n).tolist()
    data = SFTDataset(samples, cutoff_len=10)
    orders = {tuple(data.order(seed, i) for i in range(7)) for seed in range(5)}
    assert len(orders) > 1


def test_dataset_rejects_too_long_samples():
    with pytest.raises(ValueError, match="sample 1"):
        SFTDataset(synthetic([3, 12]), cutoff_len=10)


def test_bundled_data_end_to_end(tok):
    conversations = load_conversations(os.path.join(REPO_ROOT, "datasets/sft"), quiet=True)
    samples, stats = tokenize_sft(conversations, tok, 128, quiet=True)
    assert stats["loaded"] == 600 and len(samples) + stats["dropped"] == 600 and stats["truncated"] > 0
    assert all(len(ids) <= 129 for ids, _ in samples)
    for packing in (False, True):
        data = SFTDataset(samples, 128, packing=packing)
        x, y, pos = data.batch(0, range(8))
        assert x.shape[0] == 8 and x.shape[1] <= 128 and (y != -100).any()
        assert data.num_target_tokens == sum(sum(m[1:]) for _, m in samples)


def test_a_long_sharegpt_speaker_is_quoted_cut_in_the_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "x" * 5000, "value": "hi"},
                                                  {"from": "gpt", "value": "a"}]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match='conversations\\[0\\] has "from"') as error:
        load_conversations(str(path), strict=True)
    assert len(str(error.value)) < 500  # the property suite's long profile found 5,114 characters


# ---------------------------------------------------------------------------
# Token ids checked where rows are made (the LM loss does not check its targets: no host sync)


def test_tokenize_refuses_an_id_outside_the_vocabulary(tok, monkeypatch):
    """The tokenizer cannot make such an id; if one ever did, it is refused naming file:line."""
    monkeypatch.setattr(tok, "encode", lambda text: [5, tok.vocab_size + 3])
    record = {"text": "hello", "where": "data.jsonl:3"}
    with pytest.raises(DataError, match=rf"^data.jsonl:3: token id {tok.vocab_size + 3} is outside the vocabulary"):
        tokenize_sft([record], tok, 100, quiet=True)


@pytest.mark.parametrize("packing", [False, True])
def test_dataset_refuses_ids_outside_the_vocabulary(packing):
    good = synthetic([5, 4])
    SFTDataset(good, cutoff_len=8, packing=packing, vocab_size=200)
    with pytest.raises(DataError, match=r"^SFT sample 1 \(tokenized data\), an input: token id 112 is outside "
                                        r"the vocabulary \[0, 100\)"):
        SFTDataset(good, cutoff_len=8, packing=packing, vocab_size=100)
    last_only = [(list(range(10, 14)) + [100], [True] * 5)]  # only a target is out of range
    with pytest.raises(DataError, match=r"sample 0 \(tokenized data\), a target: token id 100"):
        SFTDataset(last_only, cutoff_len=8, packing=packing, vocab_size=100)
    with pytest.raises(DataError, match="token id -5"):  # negative: refused even without a vocabulary
        SFTDataset([([1, -5, 3], [True] * 3)], cutoff_len=8, packing=packing)
    untrained = [(list(range(10, 14)) + [100], [True] * 4 + [False])]  # an ignored target is not an id
    SFTDataset(untrained, cutoff_len=8, packing=packing, vocab_size=101)
    with pytest.raises(DataError, match="pad_id"):
        SFTDataset(good, cutoff_len=8, packing=packing, pad_id=300, vocab_size=200)
