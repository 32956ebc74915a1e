"""Pretraining data: raw JSON/JSONL text -> token shards -> deterministic batches.

Raw data is `{"text": ...}` records, as JSONL (one object a line) or as one
JSON array (read by records.py). `prepare_shards` tokenizes it once into
binary shards:

    shard file = 256 little-endian int32 header values
                 [MAGIC, VERSION, token itemsize, token count, 0, ...]
                 followed by the raw tokens (uint16, or uint32 for vocabularies
                 above 65536)

A shard directory holds train_000000.bin, ..., val_000000.bin, ..., the
tokenizer.model that made them, and meta.json describing the lot.

`TokenShards.batch` gives the training windows of a run in epochs: each epoch
visits every window once, in an order shuffled by (seed, epoch), the same
records.EpochOrder that SFT and DPO rows follow. A window is named by its draw
number in the run alone, so a batch does not depend on how many processes
share it, and a resumed run draws exactly the batches it would have drawn.
"""

import hashlib
import itertools
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from nanobumble.base.errors import DataError
from nanobumble.base.files import atomic_directory
from nanobumble.base.output_guard import record, sweep_leftovers
from nanobumble.base.reading import read_json
from nanobumble.data.records import (
    EpochOrder,
    files_fingerprint,
    is_validation_document,
    iter_text_records,
    list_data_files,
)
from nanobumble.data.tokenizer import Tokenizer, load_tokenizer, map_in_workers

MAGIC = int.from_bytes(b"nbsh", "little")  # reads "nbsh" in a hex dump
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
META_VERSION = 1
CHUNK_CHARS = 1 << 20  # documents are sent to workers in chunks of about this much text


# ---------------------------------------------------------------------------
# Shard files


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class _ShardFile:
    """One shard written as its tokens arrive: header and tokens go to a temporary
    file in the same directory, the token count is filled in and the file renamed
    at finish(), so a shard is complete or absent and memory stays at one piece."""

    def __init__(self, path: str, vocab_size: int):
        self.path, self.vocab_size = path, vocab_size
        self.dtype = token_dtype(vocab_size)
        self.count = 0
        fd, self.tmp_path = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                                             suffix=".bin")
        os.chmod(self.tmp_path, 0o644)  # mkstemp makes the file private; shards are ordinary files
        self.file = os.fdopen(fd, "wb")
        self.file.write(self._header())

    def _header(self) -> bytes:
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:4] = [MAGIC, VERSION, self.dtype.itemsize, self.count]
        return header.tobytes()

    def append(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if self.count + len(tokens) >= 2**31:
            raise ValueError(f"{self.path}: too many tokens for one shard ({self.count + len(tokens)})")
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"{self.path}: token ids outside [0, {self.vocab_size})")
        self.file.write(tokens.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self.count += len(tokens)

    def finish(self) -> None:
        try:
            self.file.seek(0)
            self.file.write(self._header())
            self.file.close()
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)


def read_shard(path: str) -> np.ndarray:
    """Memory-map one shard's tokens after checking its header and size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    except OSError as e:
        raise DataError(f"{path}: cannot read shard: {e}") from e
    if len(header) < HEADER_INTS:
        raise DataError(f"{path}: truncated shard (shorter than its {HEADER_BYTES}-byte header)")
    magic, version, itemsize, count = (int(v) for v in header[:4])
    if magic != MAGIC:
        raise DataError(f"{path}: not a nanobumble token shard (bad magic number)")
    if version != VERSION:
        raise DataError(f"{path}: shard version {version}, expected {VERSION}")
    if itemsize not in (2, 4):
        raise DataError(f"{path}: bad token itemsize {itemsize}")
    expected_size = HEADER_BYTES + count * itemsize
    if size != expected_size:
        raise DataError(f"{path}: file is {size} bytes but its header says {expected_size} "
                        "(truncated or corrupted)")
    dtype = np.dtype("<u2") if itemsize == 2 else np.dtype("<u4")
    if count == 0:
        return np.zeros(0, dtype=dtype)  # numpy cannot memory-map zero bytes
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


class _ShardWriter:
    """Streams tokens into {prefix}_000000.bin, ... of shard_tokens tokens each."""

    def __init__(self, out_dir: str, prefix: str, vocab_size: int, shard_tokens: int):
        self.out_dir, self.prefix = out_dir, prefix
        self.vocab_size, self.shard_tokens = vocab_size, shard_tokens
        self.current: _ShardFile | None = None
        self.total_tokens = 0
        self.shards: list[str] = []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.current is None:
                name = f"{self.prefix}_{len(self.shards):06d}.bin"
                self.current = _ShardFile(os.path.join(self.out_dir, name), self.vocab_size)
                self.shards.append(name)
            room = self.shard_tokens - self.current.count
            part, tokens = tokens[:room], tokens[room:]
            self.current.append(part)
            self.total_tokens += len(part)
            if self.current.count == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self.current is not None:
            self.current.finish()
            self.current = None


# ---------------------------------------------------------------------------
# Tokenizing raw data into shards

_worker_tokenizer: Tokenizer | None = None


def _init_worker(model_file: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(model_file)


def _tokenize_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents; return all tokens (each document followed by EOT) and their lengths."""
    assert _worker_tokenizer is not None
    encoded = _worker_tokenizer.encode_batch(texts)
    for ids in encoded:
        ids.append(_worker_tokenizer.eot_id)
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
    tokens = np.array(list(itertools.chain.from_iterable(encoded)), dtype=np.int32)
    return tokens, lengths


def _chunks(texts: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def prepare_shards(
    files: Sequence[str],
    tokenizer: Tokenizer,
    out_dir: str,
    val_ratio: float = 0.01,
    shard_tokens: int = 100_000_000,
    num_workers: int | None = None,
    strict: bool = False,
) -> dict:
    """Tokenize raw JSON/JSONL files into a new shard directory out_dir; return its meta.

    Everything is written into a temporary directory beside out_dir and renamed
    at the end, so out_dir either does not exist or is complete.
    """
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise DataError(f"output directory {out_dir} already exists and is not empty")
    num_workers = num_workers or os.cpu_count() or 1
    sweep_leftovers(os.path.dirname(os.path.abspath(out_dir)), locked=False)  # what a killed preparation left
    try:
        with atomic_directory(out_dir) as tmp_dir:
            meta = _write_shards(files, tokenizer, tmp_dir, val_ratio, shard_tokens, num_workers, strict)
    except FileExistsError as e:
        raise DataError(f"output directory {out_dir} appeared while preparing: {e}") from e
    return meta


def _write_shards(files: Sequence[str], tokenizer: Tokenizer, out_dir: str, val_ratio: float,
                  shard_tokens: int, num_workers: int, strict: bool) -> dict:
    stats: dict = {}
    texts = iter_text_records(files, strict=strict, stats=stats)
    train = _ShardWriter(out_dir, "train", tokenizer.vocab_size, shard_tokens)
    val = _ShardWriter(out_dir, "val", tokenizer.vocab_size, shard_tokens)
    start = last_print = time.time()
    index = 0
    val_documents = 0
    for tokens, lengths in map_in_workers(_tokenize_chunk, _chunks(texts), num_workers, _init_worker,
                                          (tokenizer.model_file,)):
        is_val = np.array([is_validation_document(index + i, val_ratio) for i in range(len(lengths))])
        token_is_val = np.repeat(is_val, lengths)
        train.add(tokens[~token_is_val])
        val.add(tokens[token_is_val])
        index += len(lengths)
        val_documents += int(is_val.sum())
        if time.time() - last_print > 0.5:
            last_print = time.time()
            _print_progress(stats, time.time() - start)
    train.close()
    val.close()
    _print_progress(stats, time.time() - start)
    print()

    for name, data in tokenizer.files.items():  # tokenizer.model, or a Hugging Face tokenizer's files
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
    meta = {
        "format_version": META_VERSION,
        "tokenizer_checksum": tokenizer.checksum,
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "train_tokens": train.total_tokens,
        "val_tokens": val.total_tokens,
        "train_shards": train.shards,
        "val_shards": val.shards,
        "documents": stats["documents"],
        "val_documents": val_documents,
        "skipped": stats["skipped"],
        "empty": stats["empty"],
        "text_bytes": stats["bytes"],
        "data_sha256": stats["data_sha256"],  # the source files' content (records.iter_file_records)
        "val_ratio": val_ratio,
        "source_files": [os.path.abspath(f) for f in files],
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(f"shards: {meta['documents']:,} documents ({val_documents:,} for validation), "
          f"{meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
          f"{len(train.shards)} + {len(val.shards)} shards, "
          f"{meta['skipped']:,} bad records and {meta['empty']:,} empty texts skipped, "
          f"{time.time() - start:.1f}s")
    return meta


def _print_progress(stats: dict, seconds: float) -> None:
    mb = stats["bytes"] / 1e6
    print(f"\rtokenizing: {stats['documents']:,} docs, {mb:,.1f} MB, {mb / max(seconds, 1e-9):,.1f} MB/s",
          end="", flush=True)


def read_meta(shard_dir: str) -> dict:
    path = os.path.join(shard_dir, "meta.json")
    if not os.path.lexists(path):
        raise DataError(f"{shard_dir} is not a shard directory (no meta.json)")
    meta = read_json(path, error=DataError)
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def ensure_shards(
    dataset_path: str | list[str],
    tokenizer: Tokenizer,
    cache_dir: str,
    val_ratio: float = 0.01,
    strict: bool = False,
    num_workers: int | None = None,
) -> str:
    """Return a shard directory for dataset_path, preparing (and caching) it if needed.

    dataset_path is either a prepared shard directory (has meta.json) or raw
    JSON/JSONL data; raw data is tokenized once into {cache_dir}/shards-{key}.
    """
    if isinstance(dataset_path, str) and os.path.isfile(os.path.join(dataset_path, "meta.json")):
        meta = read_meta(dataset_path)
        check_tokenizer_matches(meta, tokenizer, dataset_path)
        return dataset_path

    files = list_data_files(dataset_path)
    # "data_sha256": made since meta.json records the data's content (older ones are tokenized again)
    key = f"{files_fingerprint(files)}\0{tokenizer.checksum}\0{val_ratio}\0{META_VERSION}\0data_sha256"
    shard_dir = os.path.join(cache_dir, f"shards-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
    if os.path.isfile(os.path.join(shard_dir, "meta.json")):
        print(f"shards: reusing cached {shard_dir}")
        return shard_dir
    print(f"shards: preparing {len(files)} file(s) into {shard_dir}")
    os.makedirs(cache_dir, exist_ok=True)
    record(cache_dir, os.path.basename(shard_dir))  # the record also keeps the cache from being read as data
    try:
        prepare_shards(files, tokenizer, shard_dir, val_ratio=val_ratio, num_workers=num_workers, strict=strict)
    except DataError:
        # Another process (e.g. another rank) may have prepared the same shards meanwhile.
        if not os.path.isfile(os.path.join(shard_dir, "meta.json")):
            raise
        print(f"shards: another process prepared {shard_dir}; using it")
    return shard_dir


def check_tokenizer_matches(meta: dict, tokenizer: Tokenizer, shard_dir: str) -> None:
    if meta.get("tokenizer_checksum") != tokenizer.checksum or meta.get("vocab_size") != tokenizer.vocab_size:
        raise DataError(
            f"tokenizer/shard mismatch: {shard_dir} was tokenized with another tokenizer "
            f"(vocab_size {meta.get('vocab_size')}, checksum {str(meta.get('tokenizer_checksum'))[:12]}) "
            f"than {tokenizer.model_file} (vocab_size {tokenizer.vocab_size}, "
            f"checksum {tokenizer.checksum[:12]}); use the tokenizer.model stored in {shard_dir}")


# ---------------------------------------------------------------------------
# Reading batches


class TokenShards:
    """All shards of one split, memory-mapped, with deterministic window sampling."""

    def __init__(self, shard_dir: str, split: str = "train"):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.shard_dir = shard_dir
        self.split = split
        self.meta = read_meta(shard_dir)
        if self.meta.get("format_version") != META_VERSION:
            raise DataError(f"{shard_dir}/meta.json: format_version {self.meta.get('format_version')}, "
                            f"expected {META_VERSION}")
        self.vocab_size: int = self.meta["vocab_size"]
        self.shards = [read_shard(os.path.join(shard_dir, name)) for name in self.meta[f"{split}_shards"]]
        for name, tokens in zip(self.meta[f"{split}_shards"], self.shards):
            # an id beyond the embedding is an IndexError on the CPU and a device-side assert on CUDA
            top = max((int(tokens[i:i + (1 << 24)].max()) for i in range(0, len(tokens), 1 << 24)), default=-1)
            if top >= self.vocab_size:
                raise DataError(f"{os.path.join(shard_dir, name)}: token id {top} is beyond the vocabulary "
                                f"(meta.json: vocab_size {self.vocab_size}); the shards are damaged or were made "
                                f"with another tokenizer")
        self.num_tokens = sum(len(s) for s in self.shards)
        self._order: EpochOrder | None = None  # of the windows, for the cutoff_len last asked
        if self.num_tokens != self.meta[f"{split}_tokens"]:
            raise DataError(f"{shard_dir}: {split} shards hold {self.num_tokens} tokens "
                            f"but meta.json says {self.meta[f'{split}_tokens']}")

    def _check_fits(self, cutoff_len: int) -> None:
        if not any(len(s) >= cutoff_len + 1 for s in self.shards):
            raise DataError(
                f"dataset too small for cutoff_len={cutoff_len}: the {self.split} split of "
                f"{self.shard_dir} has no shard with {cutoff_len + 1} tokens "
                f"({self.num_tokens} tokens in all); use a smaller cutoff_len or more data")

    def _windows_per_shard(self, cutoff_len: int) -> np.ndarray:
        # Windows of cutoff_len + 1 tokens at offsets 0, L, 2L, ...: consecutive ones share
        # one token (the last target of one is the first input of the next), so every token
        # but a shard's first is a target exactly once per epoch.
        return np.array([(len(s) - 1) // cutoff_len if len(s) > cutoff_len else 0 for s in self.shards],
                        dtype=np.int64)

    def num_windows(self, cutoff_len: int) -> int:
        """Windows in one epoch."""
        return int(self._windows_per_shard(cutoff_len).sum())

    def batch(self, seed: int, draws: Sequence[int], cutoff_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs x and targets y (x shifted by one), each [len(draws), cutoff_len].

        Draw d (0, 1, 2, ... over the whole run) is window d % N of epoch d // N,
        N being the windows in an epoch, taken in the epoch's shuffled order. A
        step whose rows run past the end of an epoch takes the rest from the
        next one: nothing is dropped or repeated within an epoch.
        """
        self._check_fits(cutoff_len)
        counts = self._windows_per_shard(cutoff_len)
        first = np.cumsum(counts) - counts  # the number of each shard's first window
        total = int(counts.sum())
        if self._order is None or self._order.n != total:
            self._order = EpochOrder(total)
        rows = np.empty((len(draws), cutoff_len + 1), dtype=np.int64)
        for row, draw in enumerate(draws):
            window = self._order(seed, draw)
            shard = int(np.searchsorted(first, window, side="right")) - 1
            offset = (window - int(first[shard])) * cutoff_len
            rows[row] = self.shards[shard][offset:offset + cutoff_len + 1]
        batch = torch.from_numpy(rows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def val_batches(self, cutoff_len: int, batch_size: int, max_rows: int | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first max_rows (None: all) consecutive windows of the split, in batches
        of batch_size (the last may be smaller). Inputs do not overlap; every token
        after the first of a shard is a target once. The same windows whatever the
        batch size."""
        self._check_fits(cutoff_len)
        windows = (shard[offset:offset + cutoff_len + 1]
                   for shard in self.shards for offset in range(0, len(shard) - cutoff_len, cutoff_len))
        windows = itertools.islice(windows, max_rows)
        while rows := list(itertools.islice(windows, batch_size)):
            yield _rows_to_batch(rows)


def _rows_to_batch(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.from_numpy(np.array(rows, dtype=np.int64))
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
