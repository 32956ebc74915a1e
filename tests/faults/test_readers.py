"""One door in (nanobumble/base/reading.py): every JSON and YAML file a program
reads is checked before it is trusted. Too big, a directory, not UTF-8, nested
too deep, YAML aliases: each is one line naming the file, raised as the error
its reader uses (run_cli prints it and exits 2), never a RecursionError, a
UnicodeDecodeError or a message of millions of characters."""

import json
import os

import pytest

from nanobumble.base import reading
from nanobumble.base.errors import ConfigError, DataError, UserError
from nanobumble.data.hf_tokenizer import HFTokenizer
from nanobumble.store.checkpoint import read_trainer_state
from nanobumble.store.model_dir import load_model_config
from nanobumble.store.run_files import read_metrics, read_training_args
from nanobumble.store.tensor_files import DamagedFile


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---------------------------------------------------------------------------
# The readers themselves


def test_json_nesting_is_bounded(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(nested(100))
    assert reading.read_json(str(path)) is not None  # 100 levels: fine
    for depth in (101, 600, 100_000):  # past the bound; past the parser's stack
        path.write_text(nested(depth))
        with pytest.raises(UserError, match=rf"^{path}: not valid JSON \(nested deeper than 100 levels\)$"):
            reading.read_json(str(path))
    path.write_text('{"a": ' * 101 + "1" + "}" * 101)
    with pytest.raises(ConfigError, match="nested deeper than 100 levels"):  # objects count too; the caller's class
        reading.read_json(str(path), error=ConfigError)


def test_the_size_is_checked_before_reading(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("[" + " " * 100 + "]")
    assert reading.read_json(str(path), max_bytes=102) == []
    with pytest.raises(UserError, match=rf"^{path}: 102 bytes, more than the 101 bytes such a file may be$"):
        reading.read_json(str(path), max_bytes=101)
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:  # 16 GiB that take no disk: reading them would exhaust memory
        f.truncate(2**34)
    with pytest.raises(UserError, match=rf"^{huge}: 16,384.0 MB, more than the 1.0 MB such a file may be$"):
        reading.read_yaml(str(huge))


def test_what_is_not_a_readable_file(tmp_path):
    with pytest.raises(UserError, match=rf"^{tmp_path}: is a directory, not a file$"):
        reading.read_json(str(tmp_path))
    with pytest.raises(DataError, match=rf"^{tmp_path / 'missing.json'}: not found$"):
        reading.read_json(str(tmp_path / "missing.json"), error=DataError)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening one would wait for a writer forever
    with pytest.raises(UserError, match=rf"^{fifo}: not a regular file$"):
        reading.read_text(str(fifo), 100)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"a": "caf\xe9"}')
    with pytest.raises(UserError, match=rf"^{latin}: not UTF-8 text \(byte 0xe9 at offset 10\)$"):
        reading.read_json(str(latin))
    bom = tmp_path / "bom.json"
    bom.write_bytes(b'\xef\xbb\xbf{"a": 1}')  # a byte order mark, as some editors write: fine
    assert reading.read_json(str(bom)) == {"a": 1}


def test_yaml_aliases_and_nesting_are_refused(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("a: &x [1, 2]\nb: c\n")
    assert reading.read_yaml(str(path)) == {"a": [1, 2], "b": "c"}  # an anchor alone: fine
    path.write_text("a: &x [1, 2]\nb: *x\n")
    with pytest.raises(UserError, match=rf"^{path}: not valid YAML \(line 2, column 4: an alias \(\*name\)"):
        reading.read_yaml(str(path))
    path.write_text("a: &x {k: 1}\nb:\n  <<: *x\n")  # a merge key is an alias too
    with pytest.raises(UserError, match="an alias"):
        reading.read_yaml(str(path))
    path.write_text("- " * 99 + "1\n")  # block style: 99 sequences, fine
    assert reading.read_yaml(str(path)) is not None
    for depth in (101, 1000):  # past the bound; past Python's stack
        path.write_text(nested(depth))
        with pytest.raises(UserError, match=rf"^{path}: not valid YAML \(line 1, column 101: nested deeper than "
                                             rf"100 levels\)$"):
            reading.read_yaml(str(path))
    path.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match=rf"^{path}: not valid YAML \(line 2, column 1: expected ',' or ']'"):
        reading.read_yaml(str(path))


def test_cut_bounds_what_a_message_shows():
    assert reading.cut("short") == "short"
    assert reading.cut("x" * 1000) == "x" * 197 + "..."
    assert reading.cut(list(range(10**6))) == "[0, 1, 2, 3, 4, 5, 6, 7, ...]"
    shown = reading.cut(10**1000)
    assert len(shown) <= 200 and shown.startswith("1000")
    shared = [["lol"] * 9]  # a structure that repeats itself: its repr would be 9^12 strings
    for _ in range(12):
        shared = [shared] * 9
    assert len(reading.cut(shared)) <= 200


# ---------------------------------------------------------------------------
# Each file a program reads, through the door


def test_training_args_yaml(tmp_path):
    run = tmp_path / "run"
    (run / "training_args.yaml").mkdir(parents=True)
    with pytest.raises(UserError, match=r"training_args.yaml: is a directory, not a file$"):
        read_training_args(str(run))  # was: {} as if there were none
    os.rmdir(run / "training_args.yaml")
    for content, message in ((b"stage: caf\xe9\n", r"not UTF-8 text \(byte 0xe9 at offset 10\)"),
                             (b"a: &x [1]\nb: [*x, *x]\n", r"not valid YAML \(line 2, column 5: an alias"),
                             (b"stage: " + nested(1000).encode(), r"not valid YAML \(line 1, column 107: nested")):
        (run / "training_args.yaml").write_bytes(content)
        with pytest.raises(UserError, match=rf"^{run / 'training_args.yaml'}: {message}"):
            read_training_args(str(run))


def test_model_config_json(tmp_path):
    config = tmp_path / "config.json"
    for content, message in ((nested(5000), r"not valid JSON \(nested deeper than 100 levels\)"),
                             ('{"hidden_size": ' + nested(200) + "}", r"not valid JSON \(nested deeper than 100"),
                             ('{"hidden_size": 1' + "0" * 5000 + "}", r"not valid JSON \(Exceeds the limit")):
        config.write_text(content)
        with pytest.raises(ConfigError, match=rf"^{config}: {message}"):
            load_model_config(str(config))


def test_trainer_state_json(tmp_path):
    (tmp_path / "trainer_state.json").write_text('{"step": 1, "world_size": ' + nested(5000) + "}")
    with pytest.raises(DamagedFile, match=r"trainer_state.json: not valid JSON \(nested deeper than 100 levels\)$"):
        read_trainer_state(str(tmp_path))


def test_metrics_jsonl_skips_a_line_nested_too_deep(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "x": ' + nested(5000) + '}\n{"step": 3, "loss": 1.0}\n')
    records, skipped = read_metrics(str(path))
    assert [r["step"] for r in records] == [1, 3] and skipped == 1


def hf_tokenizer_dir(directory) -> str:
    """A minimal tokenizer.json with ChatML's special tokens (no transformers needed)."""
    from tokenizers import Tokenizer, models

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.WordLevel({**{s: i for i, s in enumerate(specials)}, "hi": 3}, unk_token=specials[0]))
    tokenizer.add_special_tokens(specials)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tokenizer.to_str())
    return str(directory)


def test_hf_tokenizer_files(tmp_path):
    directory = hf_tokenizer_dir(tmp_path / "tok")
    config = {"chat_template": "{{ messages }}"}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    assert HFTokenizer(directory).chat_template == "{{ messages }}"

    template = os.path.join(directory, "chat_template.jinja")
    with open(template, "wb") as f:
        f.write(b"{{ 'caf\xe9' }}")
    with pytest.raises(DataError, match=rf"^{template}: not UTF-8 text \(byte 0xe9 at offset 7\)$"):
        HFTokenizer(directory)  # was: a UnicodeDecodeError traceback
    os.remove(template)

    config_file = os.path.join(directory, "tokenizer_config.json")
    for content, message in ((nested(5000).encode(), r"not valid JSON \(nested deeper than 100 levels\)"),
                             (b'{"chat_template": "caf\xe9"}', r"not UTF-8 text \(byte 0xe9 at offset 22\)")):
        with open(config_file, "wb") as f:
            f.write(content)
        with pytest.raises(DataError, match=rf"^{config_file}: {message}$"):  # the file named is the one at fault
            HFTokenizer(directory)
    with open(config_file, "w") as f:
        f.write("[]")  # not an object: no chat template in it
    assert HFTokenizer(directory).chat_template is None

    model = os.path.join(directory, "tokenizer.json")
    with open(model, "r+b") as f:  # Qwen's is 7 MB; 65 MB is refused before it is read
        f.truncate(65 * 2**20)
    with pytest.raises(DataError, match=rf"^{model}: 65.0 MB, more than the 64.0 MB such a file may be$"):
        HFTokenizer(directory)


def test_parquet_data_files(tmp_path):
    """A Parquet data file (SFT, DPO, pretraining) that pyarrow cannot turn into records is one line naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanobumble.data.records import iter_text_records

    deep = str(tmp_path / "deep.parquet")
    value = "x"
    for _ in range(101):
        value = [value]
    pq.write_table(pa.table({"text": ["a"], "x": [value]}), deep)  # pyarrow reads at most 100 schema levels
    with pytest.raises(DataError) as error:
        list(iter_text_records([deep]))
    assert str(error.value).startswith(f"{deep}: not a readable Parquet file: Parquet schema too deeply nested")
    latin = str(tmp_path / "latin.parquet")
    column = pa.array([b"ok", b"caf\xe9"], type=pa.binary()).view(pa.string())  # a string column, not UTF-8
    pq.write_table(pa.table({"text": column}), latin)
    with pytest.raises(DataError) as error:
        list(iter_text_records([latin]))
    assert str(error.value) == f"{latin}: not UTF-8 text in a string column, in rows 1 to 2: unexpected end of data"
