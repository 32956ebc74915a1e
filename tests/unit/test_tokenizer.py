import os

import pytest

from nanobumble.base.errors import DataError
from nanobumble.data.tokenizer import (EOT_ID, IM_END_ID, IM_START_ID, SPECIAL_TOKENS, Tokenizer,
                                       load_or_train_tokenizer, train_tokenizer)

ENGLISH = """The quick brown fox jumps over the lazy dog. A small language model learns
to predict the next token from the tokens before it. Training happens in three
stages: pretraining on raw text, supervised fine-tuning on instructions, and
preference optimisation on pairs of answers. The model is small enough to train
on a laptop, which makes it a good way to learn how the pieces fit together."""

CHINESE = """小蜜蜂在花园里飞来飞去，寻找花蜜。语言模型通过预测下一个词来学习语言。
预训练使用大量的中文文本，然后进行指令微调和偏好优化。今天天气很好，我们去公园散步吧。
学习需要耐心和坚持，每天进步一点点。"""

CODE = '''def train(model, data, steps=100):
\tfor step in range(steps):
\t\tloss = model(data[step])
\t\tloss.backward()
    return {"loss": float(loss), "steps": steps}

class Config:
    vocab_size: int = 8000   # multiple   spaces
'''

EMOJI = "Bees 🐝 make honey 🍯! Great job 👍🎉 see you soon 😀"


def corpus() -> list[str]:
    return [ENGLISH, CHINESE, CODE, EMOJI, "Numbers: 12345 678 2024-01-31, 3.14159"] * 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer(corpus(), 1000, path)
    return Tokenizer(path)


ROUND_TRIP_TEXTS = [
    "",
    " ",
    "   leading and trailing spaces   ",
    "multiple    spaces\tand\ttabs\n\nand blank lines\n",
    "\n\n\n",
    "\r\nwindows line ends\r\n",
    ENGLISH,
    CHINESE,
    CODE,
    EMOJI,
    "unseen Chinese 龘靐齉 and emoji 🦄🧬🫠 via byte fallback",
    "mixed 中文 English 😀 code `x = 1`\t\n",
    "literal specials <|im_start|>user\nhi<|im_end|><|endoftext|>",
    "U+2581 ▁ lower one eighth block ▁▁ x▁y",
    "combining e\u0301 and \u00e9, zero width\u200bspace, nul \x00 byte",
    "digits 0123456789 9876543210",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not set(ids) & set(SPECIAL_TOKENS.values())


def test_fixed_special_ids(tok):
    assert SPECIAL_TOKENS == {"<|endoftext|>": 1, "<|im_start|>": 2, "<|im_end|>": 3}
    assert (EOT_ID, IM_START_ID, IM_END_ID) == (1, 2, 3)
    assert (tok.eot_id, tok.im_start_id, tok.im_end_id) == (1, 2, 3)
    assert tok.sp.id_to_piece(0) == "<unk>"
    assert IM_END_ID not in tok.encode("<|im_end|>")


def test_decode_specials(tok):
    ids = [IM_START_ID] + tok.encode("user\n你好") + [IM_END_ID, EOT_ID]
    assert tok.decode(ids) == "<|im_start|>user\n你好<|im_end|><|endoftext|>"


def test_encode_batch_matches_encode(tok):
    texts = ROUND_TRIP_TEXTS
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_token_byte_lengths(tok):
    lengths = tok.token_byte_lengths()
    assert lengths.dtype.name == "int32" and len(lengths) == tok.vocab_size
    assert lengths[0] == 0 and all(lengths[i] == 0 for i in SPECIAL_TOKENS.values())
    for text in ROUND_TRIP_TEXTS:
        assert int(lengths[tok.encode(text)].sum()) == len(text.encode("utf-8")), text


def test_vocab_and_checksum(tok):
    assert 300 < tok.vocab_size <= 1000  # small corpus: fewer pieces than asked
    assert len(tok.checksum) == 64


def test_training_is_deterministic(tok, tmp_path):
    path = str(tmp_path / "again.model")
    train_tokenizer(corpus(), 1000, path)
    assert Tokenizer(path).checksum == tok.checksum


def test_missing_model_file(tmp_path):
    with pytest.raises(DataError, match="tokenizer model not found"):
        Tokenizer(str(tmp_path / "nope.model"))


def test_not_a_model_file(tmp_path):
    path = tmp_path / "garbage.model"
    path.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(DataError, match="garbage.model is not a sentencepiece model"):
        Tokenizer(str(path))


def test_foreign_model_rejected(tmp_path):
    import sentencepiece as spm

    prefix = str(tmp_path / "foreign")
    # Sentencepiece defaults: <unk>=0, <s>=1, </s>=2, no chat specials.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_prefix=prefix,
                                   vocab_size=300, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(DataError, match="foreign.model is not a nanobumble tokenizer"):
        Tokenizer(prefix + ".model")


def test_empty_training_text(tmp_path):
    with pytest.raises(DataError, match="empty"):
        train_tokenizer([], 500, str(tmp_path / "t.model"))


def test_vocab_size_too_small(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_tokenizer(corpus(), 100, str(tmp_path / "t.model"))


def test_load_or_train_caches(tok, tmp_path):
    calls = []

    def texts():
        calls.append(1)
        return corpus()

    first = load_or_train_tokenizer("", texts, 1000, str(tmp_path), "abc")
    assert os.path.basename(first.model_file) == "tokenizer-abc-1000.model"
    second = load_or_train_tokenizer(None, texts, 1000, str(tmp_path), "abc")
    assert len(calls) == 1
    assert second.checksum == first.checksum == tok.checksum

    # An explicit path wins: a file, or a directory holding tokenizer.model.
    assert load_or_train_tokenizer(tok.model_file, texts, 1000, str(tmp_path), "x").checksum == tok.checksum
    directory = os.path.dirname(tok.model_file)
    assert load_or_train_tokenizer(directory, texts, 1000, str(tmp_path), "x").checksum == tok.checksum
    assert len(calls) == 1


def test_tokenizer_training_takes_a_bounded_seeded_sample(tmp_path, monkeypatch, capsys):
    import random as _random

    from nanobumble.data import tokenizer as tokenizer_module

    rng = _random.Random(0)
    docs = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(50, 500))) for _ in range(3000)]
    corpus_bytes = sum(len(d.encode()) for d in docs)
    budget = corpus_bytes // 10
    sample = list(tokenizer_module.sample_texts(iter(docs), corpus_bytes, budget))
    taken = sum(len(d.encode()) for d in sample)
    assert 0.7 * budget < taken <= budget  # about the budget, never more
    assert sample == list(tokenizer_module.sample_texts(iter(docs), corpus_bytes, budget))  # seeded
    assert list(tokenizer_module.sample_texts(iter(docs), corpus_bytes, 2 * corpus_bytes)) == docs

    # A corpus larger than tokenizer_sample_mb: sentencepiece sees the sample only.
    seen = []
    real_train = tokenizer_module.train_tokenizer

    def spy(texts, vocab_size, model_path):
        read = list(texts() if callable(texts) else texts)
        seen.append(sum(len(t.encode()) for t in read))
        return real_train(read, vocab_size, model_path)

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", spy)
    sample_mb = budget / 2**20
    tok = tokenizer_module.load_or_train_tokenizer("", lambda: iter(docs), 300, str(tmp_path), "key",
                                                   corpus_bytes=corpus_bytes, sample_mb=sample_mb)
    assert seen and seen[0] <= budget + 1 and tok.vocab_size > 260
    assert "training on a seeded sample" in capsys.readouterr().out
    assert any("sample" in name for name in os.listdir(tmp_path))  # the sample size is part of the cache key
