"""The SFT/DPO token cache (nanobumble/data/token_cache.py): the same tokens as tokenizing
directly, rebuilt when any part of its key changes (one test per part), reused
otherwise, tokenized in parallel processes with the same result, and a damaged
cache is tokenized again rather than trusted."""

import json
import os
import subprocess
import sys

import pytest
from copy_task import LETTERS, write_dpo_data, write_sft_data

from nanobumble.base.errors import DataError
from nanobumble.data import token_cache
from nanobumble.data.shards import ensure_shards
from nanobumble.data.dpo_data import load_preference_pairs, tokenize_pairs
from nanobumble.data.sft_data import load_conversations, tokenize_sft
from nanobumble.data.tokenizer import Tokenizer, train_tokenizer

WORDS = ["abc", "bcd", "cdef", "defg", "efghij", "fgh", "ghij", "hij", "ijab", "jabc"] * 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("token_cache")
    text = [f"copy:\n{w}\n{w}" for w in WORDS] + [" ".join(LETTERS)]
    tokenizers = [Tokenizer(train_tokenizer(text, size, str(root / f"tok{size}.model"))) for size in (280, 290)]
    write_sft_data(str(root / "sft.jsonl"), WORDS)
    write_dpo_data(str(root / "dpo.jsonl"), WORDS)
    return root, tokenizers


def sft(root, tokenizer, capsys, cutoff_len=40, system_prompt="", strict=False, data="sft.jsonl", **kwargs):
    """(samples, stats, printed output, cache directories) of one tokenized_sft call."""
    samples, stats = token_cache.tokenized_sft(str(root / data), tokenizer, cutoff_len, system_prompt,
                                               str(root / "cache"), strict, **kwargs)
    return samples, stats, capsys.readouterr().out, sorted(os.listdir(root / "cache"))


def as_lists(samples):
    return [(list(map(int, ids)), list(map(bool, mask))) for ids, mask in samples]


def test_cached_sft_samples_equal_direct_tokenization_and_are_reused(setup, capsys, monkeypatch):
    root, (tok, _) = setup
    direct, direct_stats = tokenize_sft(load_conversations(str(root / "sft.jsonl"), quiet=True), tok, 40, "",
                                        quiet=True)
    first, stats, out, dirs = sft(root, tok, capsys)
    assert "tokenizing 1 file(s)" in out and as_lists(first) == direct
    assert {k: stats[k] for k in direct_stats} == direct_stats and stats["skipped"] == 0

    # reused: nothing is tokenized again, and the counts are printed again
    monkeypatch.setattr(token_cache, "_tokenize_in_parallel", lambda *a, **k: pytest.fail("tokenized again"))
    again, stats_again, out, dirs_again = sft(root, tok, capsys)
    assert as_lists(again) == direct and stats_again == stats and dirs_again == dirs
    assert "reusing" in out and f"sft data: {len(direct)} samples from {len(WORDS)} conversations" in out


def test_the_cache_is_readable_like_any_new_file(setup, capsys, tmp_path):
    root, (tok, _) = setup
    old = os.umask(0o022)
    try:
        token_cache.tokenized_sft(str(root / "sft.jsonl"), tok, 40, "", str(tmp_path / "cache"), False)
    finally:
        os.umask(old)
    (directory,) = [d for d in os.listdir(tmp_path / "cache") if not d.startswith(".")]
    modes = {name: os.stat(tmp_path / "cache" / directory / name).st_mode & 0o777
             for name in os.listdir(tmp_path / "cache" / directory)}
    assert modes == {"tokens.safetensors": 0o644, "meta.json": 0o644}  # safetensors' save_file leaves 0600


def test_cached_preference_pairs_equal_direct_tokenization(setup, capsys):
    root, (tok, _) = setup
    pairs = load_preference_pairs(str(root / "dpo.jsonl"), quiet=True)
    direct, _ = tokenize_pairs(pairs, tok, 12, "be brief", quiet=True)
    for _ in range(2):
        cached, stats = token_cache.tokenized_pairs(str(root / "dpo.jsonl"), tok, 12, "be brief", str(root / "cache"))
        assert [{k: list(map(int, v)) for k, v in p.items()} for p in cached] == direct
        assert stats["pairs"] == len(direct) and stats["truncated"] > 0  # cutoff 12 cuts the prompts
    assert "reusing" in capsys.readouterr().out


def rebuilt(root, tok, capsys, before: dict, after: dict) -> bool:
    """True when the settings `after` tokenize into a new directory, once `before` is cached
    (each a dict of sft() keywords, the tokenizer included)."""
    _, _, _, dirs_before = sft(root, before.pop("tokenizer", tok), capsys, **before)
    _, _, out, dirs_after = sft(root, after.pop("tokenizer", tok), capsys, **after)
    return "tokenizing" in out and len(dirs_after) == len(dirs_before) + 1


def test_changed_data_file_is_tokenized_again(setup, capsys, tmp_path):
    root, (tok, _) = setup
    data = tmp_path / "data.jsonl"
    write_sft_data(str(data), WORDS[:5])
    first, *_ = token_cache.tokenized_sft(str(data), tok, 40, "", str(root / "cache"))
    write_sft_data(str(data), WORDS[:6])
    second, *_ = token_cache.tokenized_sft(str(data), tok, 40, "", str(root / "cache"))
    assert len(first) == 5 and len(second) == 6
    assert "tokenizing" in capsys.readouterr().out.split("sft data: 5 samples")[1]


def test_other_tokenizer_is_tokenized_again(setup, capsys):
    root, (tok, other) = setup
    assert rebuilt(root, tok, capsys, {}, {"tokenizer": other})


def test_other_chat_template_is_tokenized_again(setup, capsys, monkeypatch):
    root, (tok, _) = setup
    _, _, _, before = sft(root, tok, capsys)
    monkeypatch.setattr(token_cache, "CHATML_RENDERER", "a changed renderer")
    _, _, out, after = sft(root, tok, capsys)
    assert "tokenizing" in out and len(after) == len(before) + 1


def test_a_models_own_chat_template_is_part_of_the_key(setup, monkeypatch):
    root, (tok, _) = setup
    key = lambda: token_cache.cache_key("sft", [str(root / "sft.jsonl")], tok, "", 40, False)
    plain = key()
    monkeypatch.setattr(tok, "chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with_template = key()
    monkeypatch.setattr(tok, "chat_template", "{% for m in messages %}{{ m['role'] }}{% endfor %}")
    assert len({plain, with_template, key()}) == 3


def test_other_system_prompt_is_tokenized_again(setup, capsys):
    root, (tok, _) = setup
    samples, *_ = sft(root, tok, capsys, cutoff_len=100, system_prompt="be brief")
    assert rebuilt(root, tok, capsys, dict(cutoff_len=100, system_prompt="be brief"),
                   dict(cutoff_len=100, system_prompt="be very brief"))
    longer, *_ = sft(root, tok, capsys, cutoff_len=100, system_prompt="be very brief")
    assert len(longer[0][0]) > len(samples[0][0])


def test_other_cutoff_len_is_tokenized_again(setup, capsys):
    root, (tok, _) = setup
    assert rebuilt(root, tok, capsys, {}, dict(cutoff_len=30))
    samples, stats, *_ = sft(root, tok, capsys, cutoff_len=30)
    assert max(len(ids) for ids, _ in samples) == 31 and stats["truncated"] > 0


def test_strict_is_part_of_the_key(setup, capsys):
    root, (tok, _) = setup
    with open(root / "bad.jsonl", "w") as f:
        f.write('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\nnot json\n')
    _, stats, out, _ = sft(root, tok, capsys, data="bad.jsonl")
    assert stats["skipped"] == 1
    with pytest.raises(DataError, match="bad.jsonl:2"):  # a cache made while skipping does not hide the error
        sft(root, tok, capsys, data="bad.jsonl", strict=True)


def test_parallel_tokenization_gives_the_same_samples_in_order(setup, capsys, monkeypatch, tmp_path):
    root, (tok, _) = setup
    direct, _ = tokenize_sft(load_conversations(str(root / "sft.jsonl"), quiet=True), tok, 40, "", quiet=True)
    monkeypatch.setattr(token_cache, "CHUNK_ITEMS", 4)  # 30 conversations -> 8 chunks over 2 processes
    samples, stats = token_cache.tokenized_sft(str(root / "sft.jsonl"), tok, 40, "", str(tmp_path), num_workers=2)
    assert as_lists(samples) == direct and stats["samples"] == len(direct) == stats["loaded"]
    assert "tokenizing: 30/30 records" in capsys.readouterr().err


def test_a_damaged_cache_is_tokenized_again(setup, capsys, tmp_path):
    root, (tok, _) = setup
    first, _ = token_cache.tokenized_sft(str(root / "sft.jsonl"), tok, 40, "", str(tmp_path))
    (directory,) = [d for d in tmp_path.iterdir() if d.is_dir()]  # beside it: the cache's .nanobumble-files
    tokens = directory / "tokens.safetensors"
    tokens.write_bytes(tokens.read_bytes()[:-7])  # torn
    second, _ = token_cache.tokenized_sft(str(root / "sft.jsonl"), tok, 40, "", str(tmp_path))
    captured = capsys.readouterr()
    assert "is damaged" in captured.err and captured.out.count("tokenizing 1 file(s)") == 2
    assert as_lists(second) == as_lists(first)
    assert json.loads((directory / "meta.json").read_text())["stats"]["samples"] == len(first)


def test_what_a_killed_preparation_left_in_the_cache_is_swept(setup, tmp_path):
    """A hidden temporary directory of a process that has ended is removed by the next
    writer; one of a live process (another run preparing the same cache) is kept."""
    root, (tok, _) = setup
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    cache = tmp_path / "cache"
    dead, live = cache / f".sft-0123.tmp-{ended.pid}-x", cache / f".shards-0123.tmp-{os.getpid()}-x"
    for leftover in (dead, live):
        leftover.mkdir(parents=True)
        (leftover / "tokens.safetensors").write_bytes(b"half written")
    token_cache.tokenized_sft(str(root / "sft.jsonl"), tok, 40, "", str(cache))
    assert not dead.exists() and live.exists()

    dead.mkdir()  # the pretraining shards' writer sweeps the same way
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": " ".join(WORDS)}) + "\n")
    ensure_shards(str(text), tok, str(cache), num_workers=1)
    assert not dead.exists() and live.exists()
