"""A Hugging Face tokenizer (tokenizer.json, byte-level BPE as Qwen2 ships it)
behind the same interface as tokenizer.Tokenizer, so that SFT, DPO, chat and the
bits-per-byte metric use either without knowing which.

The special tokens are found by name (<|endoftext|>, <|im_start|>, <|im_end|>),
not by nanobumble's fixed ids. Ordinary text never becomes a special token (a
conversation cannot forge a turn by typing "<|im_start|>"). tokenizer_config.json,
when present, brings the model's chat template (see chat_template.py).

Needs the `tokenizers` library (requirements.txt), imported only here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import numpy as np

from nanobumble.base.errors import DataError
from nanobumble.base.reading import MB, cut, decode, parse_json, read_bytes

# What a model directory keeps, stage after stage (newer transformers write the
# chat template to its own file, older ones into tokenizer_config.json), and the
# most each may hold: tokenizer.json is the whole vocabulary and merges (7 to 11 MB
# for Qwen's 151k tokens), tokenizer_config.json lists the added tokens.
FILES = {"tokenizer.json": 64 * MB, "tokenizer_config.json": 16 * MB, "chat_template.jinja": 1 * MB}
# The Hugging Face model's own config.json travels with its tokenizer, stage after stage,
# as hf_config.json (nanobumble's config.json has other keys): the export writes its
# values back (eos/bos ids and the like), so a model comes out as it went in.
HF_CONFIG = "hf_config.json"


def hf_source_config(directory: str) -> bytes | None:
    """The Hugging Face config.json a model came with: hf_config.json in a directory
    nanobumble wrote, or config.json itself in a Hugging Face model directory."""
    for name in (HF_CONFIG, "config.json"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            data = read_bytes(path, 1 * MB, DataError)
            config = parse_json(decode(data, path, DataError), path, DataError)
            if isinstance(config, dict) and "model_type" in config:
                return data
    return None


def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character: the printable
    ASCII and Latin-1 bytes as themselves, the others shifted to 256 and up.
    Returns character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + shifted)] = byte
            shifted += 1
    return alphabet


class HFTokenizer:
    def __init__(self, directory: str):
        from tokenizers import Tokenizer as FastTokenizer

        self.model_file = os.path.join(directory, "tokenizer.json")
        self.files: dict[str, bytes] = {}
        texts: dict[str, str] = {}
        for name, max_bytes in FILES.items():
            path = os.path.join(directory, name)
            if os.path.lexists(path):
                self.files[name] = read_bytes(path, max_bytes, DataError)  # the checksum is of the bytes
                texts[name] = decode(self.files[name], path, DataError)
        if "tokenizer.json" not in self.files:
            raise DataError(f"tokenizer model not found: {self.model_file}")
        source_config = hf_source_config(directory)
        if source_config is not None:
            self.files[HF_CONFIG] = source_config
        config_file = os.path.join(directory, "tokenizer_config.json")
        config = parse_json(texts.get("tokenizer_config.json", "{}"), config_file, DataError)
        try:
            self.tk = FastTokenizer.from_str(texts["tokenizer.json"])
        except Exception as e:  # the library raises plain Exceptions for a malformed file
            raise DataError(f"{self.model_file}: not a Hugging Face tokenizer ({cut(str(e))})") from None
        self.tk.encode_special_tokens = True  # text stays text: specials enter only as ids
        template = config.get("chat_template") if isinstance(config, dict) else None
        self.chat_template = texts.get("chat_template.jinja", template if isinstance(template, str) else None)
        # the ids' identity (token caches and shards compare it): the tokenizer's files, not the model's config
        self.checksum = hashlib.sha256(b"".join(self.files[name] for name in sorted(self.files)
                                                if name != HF_CONFIG)).hexdigest()
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        ids = {name: self.tk.token_to_id(name) for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
        missing = [name for name, token_id in ids.items() if token_id is None]
        if missing:
            raise DataError(f"{self.model_file}: no {', '.join(missing)} token (a ChatML tokenizer is needed)")
        self.eot_id, self.im_start_id, self.im_end_id = ids.values()
        self.added_ids = frozenset(self.tk.get_added_tokens_decoder())  # specials and other added tokens

    def encode(self, text: str) -> list[int]:
        """Text -> token ids. Never returns the special ids."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Text in which "<|im_start|>" and the like are the special tokens (a chat
        template's output) -> ids and each token's character span in text."""
        self.tk.encode_special_tokens = False
        try:
            encoding = self.tk.encode(text, add_special_tokens=False)
        finally:
            self.tk.encode_special_tokens = True
        return encoding.ids, encoding.offsets

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids -> text. Special ids come back as their literal strings."""
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token stands for in decoded text (0 for added tokens)."""
        alphabet = byte_level_alphabet()
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for piece, token_id in self.tk.get_vocab(with_added_tokens=False).items():
            if token_id not in self.added_ids and token_id < self.vocab_size:
                lengths[token_id] = sum(1 for char in piece if char in alphabet) or len(piece.encode("utf-8"))
        return lengths

    def __repr__(self) -> str:
        return f"HFTokenizer({self.model_file!r}, vocab_size={self.vocab_size})"
