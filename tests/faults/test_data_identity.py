"""Which data a run trains on: the content hash (data_sha256) the readers compute
while parsing, recorded in every checkpoint and compared on resume; and what is
never data: the directories nanobumble wrote, and hidden names."""

import hashlib
import json
import os
import shutil

import pytest
from conftest import REPO_ROOT
from copy_task import LETTERS, write_sft_data
from runs import FAST, run

from nanobumble.base.errors import DataError, UserError
from nanobumble.data import token_cache
from nanobumble.data.records import iter_text_records, list_data_files
from nanobumble.data.sft_data import load_conversations
from nanobumble.data.tokenizer import Tokenizer, train_tokenizer

STEPS = FAST + ["--save_steps", "1", "--save_total_limit", "0", "--logging_steps", "1", "--eval_steps", "0"]


def reference_sha256(files) -> str:
    """The data's identity, written out: per file, its size in decimal, a NUL byte, its bytes."""
    digest = hashlib.sha256()
    for path in files:
        data = open(path, "rb").read()
        digest.update(f"{len(data)}\0".encode() + data)
    return digest.hexdigest()


def test_the_readers_hash_every_byte_of_every_file(tmp_path):
    lines = tmp_path / "a.jsonl"
    lines.write_bytes(b'\xef\xbb\xbf{"text": "one"}\n\n{"text": "tw\\u00f6"}\nnot json\n')  # BOM, blank, bad line
    array = tmp_path / "b.json"
    array.write_text('  [{"text": "three"}, {"text": ""}]  ')
    stats = {}
    assert list(iter_text_records([str(lines), str(array)], stats=stats)) == ["one", "twö", "three"]
    assert stats["data_sha256"] == reference_sha256([lines, array])
    assert stats["data_sha256"] != reference_sha256([array, lines])  # the order of the files counts

    sft = tmp_path / "sft.jsonl"
    write_sft_data(str(sft), ["abc", "bcd"])
    stats = {}
    load_conversations(str(sft), quiet=True, stats=stats)
    assert stats["data_sha256"] == reference_sha256([sft])


def test_the_token_cache_keeps_the_hash_of_what_it_tokenized(tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    write_sft_data(str(data), ["abc", "bcd", "cdef"])
    tok = Tokenizer(train_tokenizer([f"copy:\n{w}\n{w}" for w in ("abc", "bcd", "cdef")] + [" ".join(LETTERS)],
                                    280, str(tmp_path / "tok.model")))
    for expect in ("tokenizing", "reusing"):
        _, stats = token_cache.tokenized_sft(str(data), tok, 40, "", str(tmp_path / "cache"))
        assert expect in capsys.readouterr().out and stats["data_sha256"] == reference_sha256([data])


@pytest.fixture
def trained(tmp_path):
    """A copy of datasets/pretrain and a 2-step run on it (checkpoint-1, checkpoint-2)."""
    data, out, cache = tmp_path / "data", tmp_path / "run", str(tmp_path / "cache")
    shutil.copytree(os.path.join(REPO_ROOT, "datasets", "pretrain"), data)
    run(STEPS + ["--cache_dir", cache, "--dataset_path", str(data), "--output_dir", str(out), "--max_steps", "2"])
    return data, out, cache


def test_resume_refuses_other_text_of_the_same_names_and_sizes(trained, capsys):
    data, out, cache = trained
    text = (data / "en.jsonl").read_text()
    i = text.index("the ")
    (data / "en.jsonl").write_text(text[:i] + "teh " + text[i + 4:])  # same name, same size, other text
    args = STEPS + ["--cache_dir", cache, "--dataset_path", str(data), "--output_dir", str(out), "--max_steps", "3",
                    "--allow_schedule_change", "true"]
    with pytest.raises(UserError, match=r"is not the data .*checkpoint-2 was trained on"):
        run(args + ["--resume", "auto"])
    assert not (out / "checkpoint-3").exists()

    (data / "en.jsonl").write_text(text)  # the same text again: resumes
    run(args + ["--resume", "auto"])
    assert "was not verified" not in capsys.readouterr().out and (out / "checkpoint-3").is_dir()
    for step in (2, 3):
        state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert state["data_sha256"] == reference_sha256(list_data_files(str(data)))


def test_a_checkpoint_from_before_the_hash_resumes_with_a_warning(trained, capsys):
    data, out, cache = trained
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2, "world_size": 1, "data": "0123"}\n')
    run(STEPS + ["--cache_dir", cache, "--dataset_path", str(data), "--output_dir", str(out), "--max_steps", "3",
                 "--allow_schedule_change", "true", "--resume", "auto"])
    printed = capsys.readouterr().out
    assert "warning: resume:" in printed and "checkpoint-2 does not record the data's content hash" in printed
    assert "was not verified" in printed and (out / "checkpoint-3").is_dir()


def test_what_nanobumble_wrote_is_never_read_as_data(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(REPO_ROOT, "datasets", "pretrain"), data)
    mine = sorted(list_data_files(str(data)))
    # a run's output, a model, a cache (each holds a .nanobumble-files record), hidden names
    for name in ("run", "models/merged", "cache"):
        (data / name).mkdir(parents=True)
        (data / name / ".nanobumble-files").write_text('{"written": []}\n')
        (data / name / "config.json").write_text("{}")
    (data / ".git").mkdir()
    (data / ".git" / "x.json").write_text("{}")
    (data / ".hidden.jsonl").write_text('{"text": "not data"}\n')
    assert sorted(list_data_files(str(data))) == mine
    with pytest.raises(DataError, match="is a directory nanobumble wrote"):
        list_data_files(str(data / "run"))


def test_a_cache_inside_the_data_is_not_read_as_data(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(REPO_ROOT, "datasets", "pretrain"), data)
    run(STEPS + ["--cache_dir", str(data / "cache"), "--dataset_path", str(data), "--output_dir",
                 str(tmp_path / "run"), "--max_steps", "1"])
    assert any(name.startswith("shards-") for name in os.listdir(data / "cache"))  # meta.json is in there
    assert all("/cache/" not in path for path in list_data_files(str(data)))
