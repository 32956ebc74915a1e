"""Shared by the chat-template, SFT-data and DPO-data tests: message builders and
a small tokenizer trained in-process on a test's own text."""

from nanobumble.tokenizer import Tokenizer, train_tokenizer


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def small_tokenizer(tmp_path_factory, text: str) -> Tokenizer:
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer(text.split("\n"), 500, path)
    return Tokenizer(path)
