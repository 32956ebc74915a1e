"""Bad input ends a run with one line naming the file, line or key, and exit code 2
(or, for a bad record, is skipped and counted): lone surrogates in records, a
corpus with more characters than the vocabulary holds, a vocab_size that cannot
work, JSON arrays behind long whitespace, DPO records missing an answer, broken
model directories and tokenizers, and bad chat.py input."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from nanobumble.base.errors import ConfigError, DataError
from nanobumble.data.dpo_data import load_preference_pairs
from nanobumble.data.records import iter_text_records
from nanobumble.data.sft_data import load_conversations
from nanobumble.data.tokenizer import Tokenizer, train_tokenizer
from nanobumble.model.transformer import ModelConfig, Transformer, pad_vocab_size
from nanobumble.store.model_dir import load_model_config, save_model_dir

BEES = "where do bees live? bees live in a hive and make honey from flowers. "
LONE_SURROGATE = '{"text": "bad \\ud800 text"}'  # the JSON escape: json.loads gives a str no UTF-8 can hold


def run_script(script: str, *args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """Run a script as a user does; args may be bytes (an argument that is not UTF-8)."""
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *args], input=stdin,
                            cwd=REPO_ROOT, capture_output=True, timeout=120,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    result.stdout, result.stderr = (result.stdout.decode("utf-8", "replace"),
                                    result.stderr.decode("utf-8", "replace"))
    return result


def assert_refused(result: subprocess.CompletedProcess, *names: str) -> None:
    """Exit code 2, no traceback, and an `error:` line naming every one of names."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, result.stderr[-3000:]
    for name in names:
        assert name in error[0], error[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny SFT-stage model directory, as training writes it."""
    root = tmp_path_factory.mktemp("bad_input")
    tok_file = train_tokenizer([BEES * 20], 300, str(root / "tokenizer.model"))
    cfg = ModelConfig(vocab_size=pad_vocab_size(Tokenizer(tok_file).vocab_size), hidden_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    save_model_dir(str(root / "model"), Transformer(cfg), tok_file, "model_name_or_path: tiny\nstage: sft\n")
    return root / "model"


def damaged_copy(model_dir, tmp_path, damage: str):
    """A copy of model_dir with one thing wrong with it."""
    path = tmp_path / damage
    shutil.copytree(model_dir, path)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    if damage == "no_config":
        config_file.unlink()
    elif damage == "not_json":
        config_file.write_text('{"vocab_size": 320,')
    elif damage == "extra_key":
        config_file.write_text(json.dumps({**config, "num_expert": 8}))
    elif damage == "impossible":
        config_file.write_text(json.dumps({**config, "num_heads": 3}))  # hidden_size 32 is not divisible by 3
    elif damage == "garbage_tokenizer":
        (path / "tokenizer.model").write_bytes(random.Random(0).randbytes(3000))
    else:
        raise ValueError(damage)
    return path


# ---------------------------------------------------------------------------
# Records with a lone surrogate


def test_lone_surrogate_is_a_bad_record_in_every_reader(tmp_path, capsys):
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "good"}\n' + LONE_SURROGATE + '\n{"text": "also good"}\n')
    stats = {}
    assert list(iter_text_records([str(text)], stats=stats)) == ["good", "also good"]
    assert stats["skipped"] == 1
    assert f"{text}:2: invalid Unicode: lone surrogate \\ud800 (skipped)" in capsys.readouterr().err
    with pytest.raises(DataError, match=f"{text}:2: invalid Unicode"):
        list(iter_text_records([str(text)], strict=True))

    sft = tmp_path / "sft.json"  # a JSON array: the location is the record number
    sft.write_text('[{"instruction": "hi", "output": "bad \\udc00"}, {"instruction": "hello", "output": "fine"}]')
    conversations = load_conversations(str(sft))
    assert [c["where"] for c in conversations] == [f"{sft}:record 1"]
    assert f"{sft}:record 0: invalid Unicode" in capsys.readouterr().err
    with pytest.raises(DataError, match=f"{sft}:record 0: invalid Unicode"):
        load_conversations(str(sft), strict=True)

    dpo = tmp_path / "dpo.jsonl"  # the surrogate in a key counts too
    dpo.write_text('{"instruction": "a", "chosen": "x", "rejected": "y", "\\ud83d": 1}\n'
                   '{"instruction": "b", "chosen": "x", "rejected": "y"}\n')
    assert [p["where"] for p in load_preference_pairs(str(dpo))] == [f"{dpo}:2"]
    assert f"{dpo}:1: invalid Unicode: lone surrogate \\ud83d (skipped)" in capsys.readouterr().err
    # A surrogate pair is one valid character, not a bad record.
    pair = tmp_path / "pair.jsonl"
    pair.write_text('{"text": "bee \\ud83d\\udc1d"}\n')
    assert list(iter_text_records([str(pair)])) == ["bee \U0001F41D"]


def test_pretraining_skips_a_lone_surrogate_and_strict_names_its_line(tmp_path):
    data = tmp_path / "pretrain.jsonl"
    lines = [json.dumps({"text": f"document {i}: {BEES}"}) for i in range(40)]
    lines.insert(3, LONE_SURROGATE)
    data.write_text("\n".join(lines) + "\n")
    common = ["--dataset_path", str(data), "--max_steps", "1", "--cutoff_len", "16",
              "--train_micro_batch_size_per_gpu", "2", "--eval_rows", "2", "--use_tensorboard", "false", "--plot", "false"]
    result = run_script("train_pretrain.py", *common, "--output_dir", str(tmp_path / "run"),
                        "--cache_dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{data}:4: invalid Unicode: lone surrogate \\ud800 (skipped)" in result.stderr
    assert "1 bad records" in result.stdout
    strict = run_script("train_pretrain.py", *common, "--strict", "true", "--output_dir", str(tmp_path / "strict"),
                        "--cache_dir", str(tmp_path / "strict_cache"))  # a fresh cache: the data is read again
    assert_refused(strict, f"{data}:4", "lone surrogate")


# ---------------------------------------------------------------------------
# Tokenizer training


def test_thousands_of_rare_cjk_characters_fit_by_byte_fallback(tmp_path, capsys):
    # 6,500 distinct characters, every one at least once, most of them rare (Zipf):
    # far more than a 4096-token vocabulary holds at sentencepiece's character coverage.
    rng = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(6500)]
    weights = [1 / (i + 1) for i in range(len(chars))]
    documents = ["".join(chars)] + ["".join(rng.choices(chars, weights, k=200)) for _ in range(500)]
    path = train_tokenizer(documents, 4096, str(tmp_path / "zh.model"))
    out = capsys.readouterr().out
    assert "6,500 distinct characters do not fit in vocab_size=4096; character coverage" in out
    tokenizer = Tokenizer(path)
    assert tokenizer.vocab_size == 4096
    for text in documents[:3] + ["蜜蜂龘\U0001F41D"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    frequent, rare = chars[0], chars[-1]
    assert len(tokenizer.encode(frequent)) == 1 and len(tokenizer.encode(rare)) == 3  # 3 UTF-8 bytes


@pytest.mark.parametrize("vocab_size", ["5", "275"])
def test_vocab_size_below_the_minimum_is_refused(tmp_path, vocab_size):
    result = run_script("train_pretrain.py", "--vocab_size", vocab_size, "--output_dir", str(tmp_path / "run"),
                        "--cache_dir", str(tmp_path / "cache"))
    assert_refused(result, f"vocab_size={vocab_size}", "at least 276")


def test_vocab_size_sentencepiece_rejects_names_the_key(tmp_path, monkeypatch):
    import sentencepiece as spm

    def reject(**kwargs):
        raise RuntimeError("INTERNAL: some check on the trainer spec failed")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", reject)
    with pytest.raises(ConfigError, match="vocab_size=1000: INTERNAL: some check"):
        train_tokenizer([BEES], 1000, str(tmp_path / "t.model"))


# ---------------------------------------------------------------------------
# Format detection, DPO records


def test_json_array_after_more_than_4kb_of_whitespace(tmp_path):
    path = tmp_path / "spaced.json"
    path.write_text(" \n\t" * 3000 + '[{"text": "one"}, {"text": "two"}]\n')
    assert list(iter_text_records([str(path)])) == ["one", "two"]
    sft = tmp_path / "sft.json"
    sft.write_text("\n" * 5000 + '[{"instruction": "hi", "output": "hello"}]')
    assert [c["where"] for c in load_conversations(str(sft))] == [f"{sft}:record 0"]


def test_dpo_first_record_without_rejected_is_skipped(tmp_path, capsys):
    path = tmp_path / "pref.jsonl"
    path.write_text(json.dumps({"instruction": "a", "chosen": "x"}) + "\n" +
                    json.dumps({"instruction": "b", "chosen": "x", "rejected": "y"}) + "\n" +
                    json.dumps({"instruction": "c", "rejected": "y"}) + "\n")
    pairs = load_preference_pairs(str(path))
    assert [(p["where"], p["prompt"][-1]["content"]) for p in pairs] == [(f"{path}:2", "b")]
    captured = capsys.readouterr()
    assert f'{path}:1: missing "rejected" (skipped)' in captured.err
    assert f'{path}:3: missing "chosen" (skipped)' in captured.err
    assert "1 preference pairs from 1 files (alpaca 1), 2 bad records skipped" in captured.out
    with pytest.raises(DataError, match=f'{path}:1: missing "rejected"'):
        load_preference_pairs(str(path), strict=True)


# ---------------------------------------------------------------------------
# Model directories: config.json and tokenizer.model


@pytest.mark.parametrize("damage, names", [
    ("not_json", ["config.json", "not valid JSON"]),
    ("extra_key", ["config.json", "unknown model keys ['num_expert']"]),
    ("impossible", ["config.json", "num_heads"]),
])
def test_model_config_problems_name_the_file_and_key(model_dir, tmp_path, damage, names):
    path = damaged_copy(model_dir, tmp_path, damage)
    with pytest.raises(ConfigError) as error:
        load_model_config(str(path / "config.json"))
    for name in names:
        assert name in str(error.value)


@pytest.mark.parametrize("values, key", [
    ({"num_heads": 0}, "num_heads"), ({"hidden_size": "128"}, "hidden_size"), ({"num_layers": -1}, "num_layers"),
    ({"rope_theta": float("nan")}, "rope_theta"), ({"qkv_bias": "yes"}, "qkv_bias"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
])
def test_impossible_model_shapes_name_the_key(values, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig(**values)


def test_unknown_preset_names_model_name_or_path(tmp_path, model_dir):
    result = run_script("train_pretrain.py", "--model_name_or_path", "tinyy", "--tokenizer_path", str(model_dir),
                        "--output_dir", str(tmp_path / "run"), "--cache_dir", str(tmp_path / "cache"))
    assert_refused(result, "model_name_or_path", "tinyy", "tiny, bumblebee-1.5b")


@pytest.mark.parametrize("script, key, damage, names", [
    ("train_pretrain.py", "--model_name_or_path", "extra_key", ["config.json", "num_expert"]),
    ("train_sft.py", "--model_name_or_path", "not_json", ["config.json", "not valid JSON"]),
    ("train_sft.py", "--model_name_or_path", "impossible", ["config.json", "num_heads"]),
    ("train_sft.py", "--model_name_or_path", "no_config", ["model_name_or_path", "config.json"]),
    ("chat.py", "--model_path", "extra_key", ["config.json", "num_expert"]),
    ("chat.py", "--model_path", "no_config", ["model_path", "config.json"]),
    ("train_sft.py", "--model_name_or_path", "garbage_tokenizer", ["tokenizer.model", "not a sentencepiece model"]),
    ("train_dpo.py", "--model_name_or_path", "garbage_tokenizer", ["tokenizer.model", "not a sentencepiece model"]),
    ("chat.py", "--model_path", "garbage_tokenizer", ["tokenizer.model", "not a sentencepiece model"]),
])
def test_broken_model_directory_is_one_line(model_dir, tmp_path, script, key, damage, names):
    path = damaged_copy(model_dir, tmp_path, damage)
    args = [key, str(path)]
    if script == "chat.py":
        args += ["--prompt", "hi", "--max_new_tokens", "2"]
    else:
        args += ["--output_dir", str(tmp_path / "run")]
    if script == "train_pretrain.py":
        args += ["--cache_dir", str(tmp_path / "cache")]
    assert_refused(run_script(script, *args), str(path), *names)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------
# chat.py input


def test_chat_refuses_an_unknown_device(model_dir):
    result = run_script("chat.py", "--model_path", str(model_dir), "--device", "tpu", "--prompt", "hi")
    assert_refused(result, "'device'", "tpu")


def test_chat_refuses_a_prompt_that_is_not_utf8(model_dir):
    result = run_script("chat.py", "--model_path", str(model_dir), "--prompt", b"\xff\xfe hello")
    assert_refused(result, "'prompt'", "UTF-8")


def test_chat_names_the_stdin_line_that_is_not_utf8(model_dir):
    result = run_script("chat.py", "--model_path", str(model_dir), "--max_new_tokens", "2",
                        stdin=b"hello bees\n\xff\xfe hello\nnever read\n")
    assert_refused(result, "stdin line 2", "UTF-8")
    assert result.stderr.count("tokens/s") == 1  # the first line was answered, then the run stopped
