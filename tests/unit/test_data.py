import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch
from helpers import write_shard

from nanobumble import prepare
from nanobumble.base.errors import DataError, run_cli
from nanobumble.data.records import files_fingerprint, iter_text_records, list_data_files
from nanobumble.data.shards import (HEADER_BYTES, MAGIC, TokenShards, ensure_shards, prepare_shards, read_shard,
                                    token_dtype)
from nanobumble.data.tokenizer import EOT_ID, Tokenizer, train_tokenizer
from nanobumble.run.config import PretrainConfig, parse_config

WORDS = ("bee honey flower garden model token train learn small data 蜜蜂 花园 语言 模型 学习 "
         "预训练 😀 🐝 def return x = 1").split()


def make_documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(5, 60)))
        docs.append(f"Document {i}:\n" + " ".join(words) + ("\tend" if i % 3 else "  "))
    return docs


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer(make_documents(200, seed=1), 600, path)
    return Tokenizer(path)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_documents(120)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tok, docs) -> str:
    root = tmp_path_factory.mktemp("shards")
    data = write_jsonl(root / "data.jsonl", [{"text": d} for d in docs])
    out = str(root / "out")
    prepare_shards([data], tok, out, val_ratio=0.1, shard_tokens=700, num_workers=1)
    return out


# ---------------------------------------------------------------------------
# Shard files


def test_shard_write_read(tmp_path):
    tokens = np.array([0, 1, 2, 65535, 7], dtype=np.int64)
    path = str(tmp_path / "a.bin")
    write_shard(path, tokens, vocab_size=65536)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:4]) == [MAGIC, 1, 2, 5] and not header[4:].any()
    assert os.path.getsize(path) == HEADER_BYTES + 5 * 2
    read = read_shard(path)
    assert read.dtype == np.uint16 and read.tolist() == tokens.tolist()
    assert os.listdir(tmp_path) == ["a.bin"]  # no temp file left behind


def test_shard_uint32_for_big_vocab(tmp_path):
    path = str(tmp_path / "b.bin")
    write_shard(path, np.array([70000, 3]), vocab_size=100_000)
    assert np.fromfile(path, dtype="<i4", count=3)[2] == 4
    read = read_shard(path)
    assert read.dtype == np.uint32 and read.tolist() == [70000, 3]
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_shard_rejects_out_of_range_tokens(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        write_shard(str(tmp_path / "c.bin"), np.array([5, 100]), vocab_size=100)


def test_truncated_shard_names_file(tmp_path):
    path = str(tmp_path / "trunc.bin")
    write_shard(path, np.arange(100), vocab_size=1000)
    with open(path, "r+b") as f:
        f.truncate(HEADER_BYTES + 50)
    with pytest.raises(DataError, match="trunc.bin.*truncated"):
        read_shard(path)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(DataError, match="trunc.bin.*header"):
        read_shard(path)


def test_bad_magic_names_file(tmp_path):
    path = tmp_path / "magic.bin"
    path.write_bytes(np.zeros(256 + 10, dtype="<i4").tobytes())
    with pytest.raises(DataError, match="magic.bin.*magic"):
        read_shard(str(path))


# ---------------------------------------------------------------------------
# Raw records


def test_list_data_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.jsonl", "a.json", "sub/c.jsonl", "notes.txt", "sub/d.parquet", ".hidden.parquet"]:
        (tmp_path / name).write_text("")
    assert list_data_files(str(tmp_path)) == [str(tmp_path / n) for n in ["a.json", "b.jsonl", "sub/c.jsonl",
                                                                          "sub/d.parquet"]]
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")
    assert list_data_files(f"{b},{a}") == [b, a]
    assert list_data_files([a]) == [a]
    with pytest.raises(DataError, match="missing.jsonl"):
        list_data_files(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.json, \.jsonl or \.parquet files"):
        list_data_files(str(tmp_path / "empty"))


def bad_jsonl(tmp_path) -> str:
    return write_jsonl(tmp_path / "bad.jsonl", [
        {"text": "first"},
        "",
        '{"text": "broken',
        {"content": "no text field"},
        [1, 2],
        {"text": 5},
        {"text": ""},
        {"text": "last", "other": 1},
    ])


def test_iter_records_skips_and_reports(tmp_path, capsys):
    path = bad_jsonl(tmp_path)
    stats = {}
    assert list(iter_text_records([path], stats=stats)) == ["first", "last"]
    assert stats.pop("data_sha256") == hashlib.sha256(f"{os.path.getsize(path)}\0".encode()
                                                      + open(path, "rb").read()).hexdigest()
    assert stats == {"documents": 2, "skipped": 4, "empty": 1, "bytes": len("firstlast")}
    err = capsys.readouterr().err
    assert f"{path}:3: malformed JSON" in err
    assert f'{path}:4: record has no "text" field' in err
    assert f"{path}:5: expected a JSON object" in err
    assert f'{path}:6: "text" must be a string' in err


def test_iter_records_strict(tmp_path):
    path = bad_jsonl(tmp_path)
    with pytest.raises(DataError, match=f"{path}:3: malformed JSON"):
        list(iter_text_records([path], strict=True))


def test_json_array_input(tmp_path, capsys):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([{"text": "one"}, {"text": "二"}, {"title": "x"}], ensure_ascii=False))
    stats = {}
    assert list(iter_text_records([str(path)], stats=stats)) == ["one", "二"]
    assert stats["skipped"] == 1
    assert f"{path}:record 2" in capsys.readouterr().err

    path.write_text('[{"text": "one"},')
    with pytest.raises(DataError, match="array.json"):
        list(iter_text_records([str(path)]))


def test_no_documents_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "nothing.jsonl", [{"text": ""}, "", {"other": 1}])
    with pytest.raises(DataError, match="no documents with text in .*nothing.jsonl"):
        list(iter_text_records([path]))
    with pytest.raises(DataError, match="nothing.jsonl"):
        train_tokenizer(iter_text_records([path]), 500, str(tmp_path / "t.model"))


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes('\ufeff{"text": "a"}\n{"text": "b"}\n'.encode("utf-8"))
    assert list(iter_text_records([str(path)], strict=True)) == ["a", "b"]


# ---------------------------------------------------------------------------
# Preparing shards


def read_split(directory: str, split: str) -> np.ndarray:
    meta = json.load(open(os.path.join(directory, "meta.json")))
    shards = [read_shard(os.path.join(directory, name)) for name in meta[f"{split}_shards"]]
    return np.concatenate(shards) if shards else np.zeros(0, dtype=np.uint16)


def split_documents(tokens: np.ndarray) -> list[list[int]]:
    ends = np.flatnonzero(tokens == EOT_ID)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e].tolist() for s, e in zip(starts, ends)]


def test_prepare_shards_contents(shard_dir, tok, docs):
    meta = json.load(open(os.path.join(shard_dir, "meta.json")))
    train, val = read_split(shard_dir, "train"), read_split(shard_dir, "val")
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(tok.encode(d)) + 1 for d in docs)
    assert meta["documents"] == len(docs) and 0 < meta["val_documents"] < len(docs)
    assert meta["tokenizer_checksum"] == tok.checksum and meta["vocab_size"] == tok.vocab_size
    assert meta["dtype"] == "uint16" and len(meta["train_shards"]) > 1
    assert meta["text_bytes"] == sum(len(d.encode()) for d in docs)
    # Every document ends with EOT and decodes back to itself.
    assert train[-1] == EOT_ID and val[-1] == EOT_ID
    assert (train == EOT_ID).sum() + (val == EOT_ID).sum() == len(docs)
    decoded = [tok.decode(ids) for ids in split_documents(train) + split_documents(val)]
    assert sorted(decoded) == sorted(docs)
    assert Tokenizer(os.path.join(shard_dir, "tokenizer.model")).checksum == tok.checksum


def test_prepare_shards_same_for_any_worker_count(shard_dir, tok, tmp_path):
    data = os.path.join(os.path.dirname(shard_dir), "data.jsonl")
    out = str(tmp_path / "two")
    prepare_shards([data], tok, out, val_ratio=0.1, shard_tokens=700, num_workers=2)
    assert sorted(os.listdir(out)) == sorted(os.listdir(shard_dir))
    for name in os.listdir(out):
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(shard_dir, name), "rb") as b:
            assert a.read() == b.read(), name


def test_prepare_shards_from_parquet_same_tokens(shard_dir, tok, docs, tmp_path):
    """Pretraining reads Parquet through the same reader: the same documents give the same shards.
    Fails before Parquet support: every line of the .parquet file was malformed JSON, no documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = str(tmp_path / "data.parquet")
    pq.write_table(pa.Table.from_pylist([{"text": d} for d in docs]), data, row_group_size=50)
    out = str(tmp_path / "parquet")
    meta = prepare_shards([data], tok, out, val_ratio=0.1, shard_tokens=700, num_workers=1)
    assert sorted(os.listdir(out)) == sorted(os.listdir(shard_dir))
    for name in os.listdir(out):
        if name.endswith(".bin"):
            assert read_shard(os.path.join(out, name)).tolist() == read_shard(os.path.join(shard_dir, name)).tolist()
    with open(data, "rb") as f:  # the data's identity: the Parquet file's size and bytes
        assert meta["data_sha256"] == hashlib.sha256(f"{os.path.getsize(data)}\0".encode() + f.read()).hexdigest()


def test_two_documents_give_a_validation_document(tok, tmp_path):
    data = write_jsonl(tmp_path / "two.jsonl", [{"text": "one bee"}, {"text": "two bees"}])
    meta = prepare_shards([data], tok, str(tmp_path / "out"), val_ratio=0.01, num_workers=1)
    assert meta["val_documents"] == 1 and meta["train_tokens"] > 0


def test_prepare_shards_is_atomic(tok, tmp_path):
    data = bad_jsonl(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="bad.jsonl:3"):
        prepare_shards([data], tok, str(out), strict=True, num_workers=1)
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no out dir, no temp dir

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="already exists"):
        prepare_shards([data], tok, str(out), num_workers=1)
    assert os.listdir(out) == ["keep.txt"]


def test_prepare_empty_dataset(tok, tmp_path):
    data = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"other": 1}])
    with pytest.raises(DataError, match="no documents"):
        prepare_shards([data], tok, str(tmp_path / "out"), num_workers=1)
    assert not (tmp_path / "out").exists()


def test_ensure_shards_caches(tok, docs, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": d} for d in docs[:20]])
    cache = str(tmp_path / "cache")
    first = ensure_shards(data, tok, cache, num_workers=1)
    assert "preparing" in capsys.readouterr().out
    assert os.path.basename(first).startswith("shards-")
    assert ensure_shards(data, tok, cache, num_workers=1) == first
    assert "reusing" in capsys.readouterr().out
    # A prepared shard directory is used as it is.
    assert ensure_shards(first, tok, cache) == first
    # Changed data means new shards.
    fingerprint = files_fingerprint([data])
    write_jsonl(tmp_path / "data.jsonl", [{"text": d} for d in docs[:21]])
    assert files_fingerprint([data]) != fingerprint
    assert ensure_shards(data, tok, cache, num_workers=1) != first


def test_ensure_shards_detects_tokenizer_mismatch(shard_dir, tmp_path):
    path = str(tmp_path / "other.model")
    train_tokenizer(make_documents(50, seed=2), 400, path)
    with pytest.raises(DataError, match="tokenizer/shard mismatch"):
        ensure_shards(shard_dir, Tokenizer(path), str(tmp_path))


def test_prepare_cli(tmp_path, docs, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": d} for d in docs[:40]])
    out = str(tmp_path / "out")
    prepare.main(["--dataset_path", data, "--output_dir", out, "--vocab_size", "500", "--num_workers", "1",
                  "--strict"])
    tok = Tokenizer(os.path.join(out, "tokenizer.model"))
    assert json.load(open(os.path.join(out, "meta.json")))["tokenizer_checksum"] == tok.checksum
    # One default vocabulary size for a new tokenizer: train_pretrain.py's.
    config = parse_config(["--dataset_path", data, "--output_dir", out], prepare.PrepareConfig)
    assert config.vocab_size == PretrainConfig().vocab_size == 4096
    assert config.num_workers == 0 and config.strict is False

    other = str(tmp_path / "other")
    for argv, message in (
        (["--dataset_path", str(tmp_path / "missing"), "--output_dir", other], "dataset path not found"),
        (["--dataset_path", data, "--output_dir", out], f"--output_dir {out} exists and is not empty"),
        (["--dataset_path", data, "--output_dir", data], "must lie apart from every input"),  # its own input
        (["--dataset_path", data], "key 'output_dir' is required"),
        (["--dataset_path", data, "--output_dir", other, "--shard_tokens", "0"], "key 'shard_tokens' must be"),
        (["--dataset_path", data, "--output_dir", other, "--num_worker", "1"], "did you mean num_workers"),
    ):
        monkeypatch.setattr(sys, "argv", ["prepare", *argv])
        with pytest.raises(SystemExit) as exit_info:
            run_cli(prepare.main)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(other)


# ---------------------------------------------------------------------------
# Sampling batches


def test_batches_are_deterministic(shard_dir):
    shards = TokenShards(shard_dir)
    x, y = shards.batch(seed=1, draws=range(8), cutoff_len=64)
    assert x.shape == y.shape == (8, 64) and x.dtype == torch.long
    x2, y2 = shards.batch(seed=1, draws=range(8), cutoff_len=64)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = shards.batch(seed=1, draws=range(8, 16), cutoff_len=64)
    assert not torch.equal(x, x3)
    x4, _ = shards.batch(seed=2, draws=range(8), cutoff_len=64)
    assert not torch.equal(x, x4)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_a_window_depends_on_its_draw_alone(shard_dir):
    shards = TokenShards(shard_dir)
    x_all, y_all = shards.batch(3, [4, 5, 6, 7], cutoff_len=32)
    x_one, y_one = TokenShards(shard_dir).batch(3, [6], cutoff_len=32)  # a fresh reader: a resumed run
    assert torch.equal(x_all[2:3], x_one) and torch.equal(y_all[2:3], y_one)


def all_windows(shards, cutoff_len):
    """Every non-overlapping window of cutoff_len + 1 tokens, shard by shard."""
    return [tuple(np.asarray(s[offset:offset + cutoff_len + 1]).tolist())
            for s in shards.shards for offset in range(0, len(s) - cutoff_len, cutoff_len)
            if offset + cutoff_len + 1 <= len(s)]


def test_an_epoch_visits_every_window_exactly_once(shard_dir):
    shards = TokenShards(shard_dir)
    cutoff_len = 50
    n = shards.num_windows(cutoff_len)
    expected = sorted(all_windows(shards, cutoff_len))
    assert len(expected) == n > 10 and len(shards.shards) > 1

    def rows(draws):
        x, y = shards.batch(7, draws, cutoff_len)
        return [tuple(row) for row in torch.cat([x, y[:, -1:]], dim=1).tolist()]

    first, second = rows(range(n)), rows(range(n, 2 * n))
    assert sorted(first) == expected and sorted(second) == expected  # each window once per epoch
    assert first != second  # a new order every epoch
    # every token but a shard's first is a target once per epoch (up to a shard's short tail)
    targets = sum(len(r) - 1 for r in first)
    assert shards.num_tokens - len(shards.shards) - cutoff_len * len(shards.shards) <= targets
    # a batch that runs over the end of the epoch continues into the next one
    across = rows(range(n - 3, n + 2))
    assert across == first[-3:] + second[:2]


def test_val_batches(shard_dir):
    shards = TokenShards(shard_dir, split="val")
    batches = list(shards.val_batches(cutoff_len=16, batch_size=2, max_rows=5))
    assert [len(x) for x, _ in batches] == [2, 2, 1]
    again = list(shards.val_batches(cutoff_len=16, batch_size=2, max_rows=5))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    # the same rows whatever the batch size (validation after resuming on other ranks)
    assert torch.equal(torch.cat([x for x, _ in batches]),
                       torch.cat([x for x, _ in shards.val_batches(cutoff_len=16, batch_size=3, max_rows=5)]))
    # Consecutive, non-overlapping inputs from the start of the split.
    inputs = torch.cat([x for x, _ in batches]).flatten().numpy()
    assert (inputs == np.asarray(shards.shards[0][:len(inputs)])).all()
    for x, y in batches:
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_dataset_too_small(shard_dir):
    shards = TokenShards(shard_dir, split="val")
    with pytest.raises(DataError, match="dataset too small for cutoff_len=100000"):
        shards.batch(0, [0], cutoff_len=100_000)
    with pytest.raises(DataError, match="dataset too small"):
        next(shards.val_batches(cutoff_len=100_000, batch_size=1, max_rows=1))


def test_a_big_json_array_is_refused_with_the_command_to_convert_it(tmp_path, monkeypatch):
    import nanobumble.data.records as data_module

    path = tmp_path / "big.json"
    path.write_text(json.dumps([{"text": f"document {i}"} for i in range(50)]))
    assert len(list(iter_text_records([str(path)]))) == 50  # under the limit: read
    monkeypatch.setattr(data_module, "MAX_JSON_ARRAY_BYTES", 100)
    with pytest.raises(DataError, match=r"big.json: a JSON array .* convert it to JSON Lines.*jq -c"):
        list(iter_text_records([str(path)]))


# ---------------------------------------------------------------------------
# Records nested too deep, and meta.json: one line naming the file, never a RecursionError


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_a_record_nested_too_deep_is_a_bad_record(tmp_path, capsys):
    from nanobumble.data.sft_data import load_conversations

    # 600 levels parse, then overflow the checks that walk a record; 5000 overflow the parser
    path = write_jsonl(tmp_path / "deep.jsonl", ['{"text": "first"}', '{"text": "a", "x": ' + nested(600) + "}",
                                                 '{"text": ' + nested(5000) + "}", '{"text": "last"}'])
    assert list(iter_text_records([path])) == ["first", "last"]
    err = capsys.readouterr().err
    assert f"{path}:2: nested deeper than 100 levels (skipped)" in err
    assert f"{path}:3: nested deeper than 100 levels (skipped)" in err
    with pytest.raises(DataError, match=f"^{path}:2: nested deeper than 100 levels$"):
        list(iter_text_records([path], strict=True))

    array = tmp_path / "deep.json"  # in a JSON array too
    array.write_text('[{"text": "first"}, {"text": "a", "x": ' + nested(150) + '}, {"text": "last"}]')
    assert list(iter_text_records([str(array)])) == ["first", "last"]
    assert f"{array}:record 1: nested deeper than 100 levels (skipped)" in capsys.readouterr().err
    array.write_text('[{"text": "first"}, ' + nested(5000) + "]")  # the parser gives up: the file is unreadable
    with pytest.raises(DataError, match=f"^{array}: not valid JSON: nested deeper than 100 levels$"):
        list(iter_text_records([str(array)]))

    conversations = write_jsonl(tmp_path / "sft.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        '{"messages": [{"role": "user", "content": ' + nested(600) + "}]}"])
    assert len(load_conversations(conversations, quiet=True)) == 1
    with pytest.raises(DataError, match=f"^{conversations}:2: nested deeper than 100 levels$"):
        load_conversations(conversations, strict=True, quiet=True)

    within = write_jsonl(tmp_path / "within.jsonl", ['{"text": "a", "x": ' + nested(99) + "}"])
    assert list(iter_text_records([within])) == ["a"]  # 100 levels with the record itself: fine


def test_an_integer_of_too_many_digits_is_a_bad_record(tmp_path, capsys):
    path = write_jsonl(tmp_path / "digits.jsonl", ['{"text": "first"}', '{"text": "a", "n": ' + "9" * 5000 + "}"])
    assert list(iter_text_records([path])) == ["first"]
    assert f"{path}:2: malformed JSON: Exceeds the limit (4300 digits)" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    (b"\xff\xfe{}", "meta.json: not UTF-8 text (byte 0xff at offset 0)"),
    (nested(5000).encode(), "meta.json: not valid JSON (nested deeper than 100 levels)"),
    (b"[1, 2]", "meta.json: expected a JSON object, got list"),
])
def test_a_damaged_meta_json_is_one_line(tmp_path, content, message):
    (tmp_path / "meta.json").write_bytes(content)
    with pytest.raises(DataError) as error:
        TokenShards(str(tmp_path), split="train")
    assert str(error.value) == f"{tmp_path}/{message}"
