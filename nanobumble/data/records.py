"""Dataset files and their records, shared by pretraining, SFT and DPO.

    list_data_files       dataset_path: a file, a directory (every *.json / *.jsonl / *.parquet below it), or a
                          comma-separated list
    iter_file_records     one file's records (JSON Lines, one JSON array, or the rows of a Parquet file), each with
                          its file:line (file:record N in an array, file:row N in Parquet)
    iter_text_records     pretraining's {"text": ...} records
    read_records          SFT / DPO records, each converted by the shape its file's first record shows
    alpaca_prompt, ...    the conversation shapes SFT and DPO both read (Alpaca, ShareGPT, messages)

A bad record is reported as `file:line: reason` and skipped, or raises
DataError when strict. The readers also hash what they read (the data's
identity, iter_file_records). Also here: the fingerprint that says whether data
changed, the rule that holds out validation items, and the shuffled order of
items over epochs that every stage's batches follow.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from nanobumble.base.errors import DataError
from nanobumble.base.output_guard import RECORD
from nanobumble.base.reading import TOO_DEEP, cut, depth_problem
from nanobumble.data.chat_template import validate_messages

DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
PARQUET_BATCH_ROWS = 1024  # Parquet rows turned into Python records at a time: a large file never loads whole
MAX_REPORTED_PROBLEMS = 20  # per call of iter_text_records or read_records; the rest are only counted
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


# ---------------------------------------------------------------------------
# Files and their records


def list_data_files(dataset_path: str | list[str]) -> list[str]:
    """A file, a directory (every *.json / *.jsonl / *.parquet below it), or a comma-separated list.

    In a directory, hidden names and every directory nanobumble wrote (a run's
    output_dir, a model, prepared shards, a cache: they hold a .nanobumble-files
    record) are passed over: what nanobumble writes is never read back as data."""
    paths = dataset_path.split(",") if isinstance(dataset_path, str) else list(dataset_path)
    paths = [p.strip() for p in paths if p.strip()]
    if not paths:
        raise DataError("no dataset_path given")
    files: list[str] = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            if _written_by_nanobumble(path):
                raise DataError(f"dataset path {path} is a directory nanobumble wrote (it holds {RECORD}): "
                                f"a run, a model or a cache, not data")
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs
                           if not d.startswith(".") and not _written_by_nanobumble(os.path.join(root, d))]
                found += [os.path.join(root, n) for n in names if n.endswith(DATA_SUFFIXES) and n[0] != "."]
            files += sorted(found)
        else:
            raise DataError(f"dataset path not found: {path}")
    if not files:
        raise DataError(f"no .json, .jsonl or .parquet files found in {dataset_path}")
    return files


def _written_by_nanobumble(directory: str) -> bool:
    return os.path.lexists(os.path.join(directory, RECORD))


def _record_text(record: object) -> str:
    """The record's text, or raise ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "text" not in record:
        raise ValueError('record has no "text" field')
    if not isinstance(record["text"], str):
        raise ValueError(f'"text" must be a string, got {type(record["text"]).__name__}')
    return record["text"]


# JSON Lines are streamed record by record; a JSON array is parsed whole, so it is
# refused above this size (memory stays bounded whatever the corpus).
MAX_JSON_ARRAY_BYTES = 256 * 2**20


def _starts_with_bracket(path: str) -> bool:
    """Whether the first byte of the file that is not JSON whitespace (after a
    byte order mark) is "[": then it is one JSON array."""
    with open(path, "rb") as f:
        start = f.read(3)
        chunk = start[3:] if start == b"\xef\xbb\xbf" else start
        while True:
            chunk = chunk.lstrip(b" \t\r\n")
            if chunk:
                return chunk.startswith(b"[")
            chunk = f.read(4096)
            if not chunk:
                return False


class _Hashing(io.RawIOBase):
    """A binary file that feeds every byte read from it into a digest: the data's
    content hash comes from the one pass that parses it."""

    def __init__(self, raw, digest):
        self.raw, self.digest = raw, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self.digest.update(memoryview(buffer)[:n])
        return n


def _lone_surrogate(value: object) -> str | None:
    """The first lone surrogate (e.g. from the JSON escape "\\ud800") in a record's
    strings, or None. Such a string is not Unicode text: it cannot be encoded as UTF-8,
    so sentencepiece and every file writer would fail on it later."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return e.object[e.start]
        return None
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list):
        return next((found for found in map(_lone_surrogate, value) if found), None)
    return None


def _checked(record: object) -> object:
    """The record, or a ValueError when it nests too deep or one of its strings is not valid Unicode."""
    too_deep = depth_problem(record)  # first: the walks below and after recurse
    if too_deep:
        return ValueError(too_deep)
    surrogate = _lone_surrogate(record)
    if surrogate:
        return ValueError(f"invalid Unicode: lone surrogate \\u{ord(surrogate):04x}")
    return record


def iter_file_records(path: str, digest=None) -> Iterator[tuple[str, object]]:
    """Yield (location, record or ValueError) for every record of one file.

    digest (a hashlib object), when given, is fed the file's size in decimal, a NUL
    byte, then every byte of the file. Fed file after file, sha256 gives the data's
    identity (data_sha256), which checkpoints record and a resumed run compares: it
    comes from the one pass that parses the files.

    A file whose name ends in .parquet is read as Parquet (_parquet_records);
    otherwise the first character that is not whitespace decides: "[" is one
    JSON array, anything else JSON Lines."""
    if path.endswith(".parquet"):
        yield from _parquet_records(path, digest)
        return
    is_array = _starts_with_bracket(path)
    with open(path, "rb", buffering=0) as raw:
        if digest is not None:
            digest.update(f"{os.fstat(raw.fileno()).st_size}\0".encode())  # where one file ends and the next starts
            raw = _Hashing(raw, digest)
        f = io.TextIOWrapper(io.BufferedReader(raw, 1 << 20), encoding="utf-8-sig")  # -sig: a byte order mark
        if is_array:
            size = os.path.getsize(path)
            if size > MAX_JSON_ARRAY_BYTES:
                raise DataError(f"{path}: a JSON array is read into memory whole, and this one is "
                                f"{size / 2**20:,.0f} MB (the limit is {MAX_JSON_ARRAY_BYTES / 2**20:,.0f} MB): "
                                f"convert it to JSON Lines, one record per line, e.g. "
                                f"jq -c '.[]' {path} > {os.path.splitext(path)[0]}.jsonl")
            try:
                records = json.load(f)
            except UnicodeDecodeError:
                raise  # named by the caller: not UTF-8 text
            except ValueError as e:
                raise DataError(f"{path}: not valid JSON: {cut(str(e))}") from None
            except RecursionError:  # so deep that the parser gave up: no record of the file can be read
                raise DataError(f"{path}: not valid JSON: {TOO_DEEP}") from None
            for i, record in enumerate(records):
                yield f"{path}:record {i}", _checked(record)
            return
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # not JSON, or an integer of more digits than Python converts
                record = ValueError(f"malformed JSON: {cut(str(e))}")
            except RecursionError:  # the parser gave up hundreds of levels down
                record = ValueError(TOO_DEEP)
            yield f"{path}:{line_number}", record if isinstance(record, ValueError) else _checked(record)


def _parquet_records(path: str, digest=None) -> Iterator[tuple[str, object]]:
    """(f"{path}:row N", record) for every row of a Parquet file, N counted from 1.

    Each row is a dict of its columns (nested lists and structs as Python lists
    and dicts), converted PARQUET_BATCH_ROWS rows at a time as pyarrow reads the
    row groups. Parquet is read from its footer, not front to back, so the digest
    (as iter_file_records) is fed the whole file in one pass before parsing.
    A file pyarrow cannot read is one DataError naming it."""
    try:
        import pyarrow.parquet as pq  # only needed for Parquet data
    except ImportError:
        raise DataError(f"{path}: reading Parquet files needs pyarrow (pip install pyarrow)") from None
    with open(path, "rb") as f:
        if digest is not None:
            digest.update(f"{os.fstat(f.fileno()).st_size}\0".encode())
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
            f.seek(0)
        row = 0
        try:
            batches = pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        except Exception as e:  # whatever pyarrow raises on a damaged file: the file's fault, one line
            raise _unreadable_parquet(path, e) from None
        while True:
            try:
                batch = next(batches, None)
            except Exception as e:  # a damaged page
                raise _unreadable_parquet(path, e) from None
            if batch is None:
                return
            try:
                records = batch.to_pylist()
            except UnicodeDecodeError as e:  # a string column's bytes; the batch cannot be turned into records
                raise DataError(f"{path}: not UTF-8 text in a string column, in rows {row + 1} to "
                                f"{row + batch.num_rows}: {e.reason}") from None
            except Exception as e:
                raise _unreadable_parquet(path, e) from None
            for record in records:
                row += 1
                yield f"{path}:row {row}", _checked(record)


def _unreadable_parquet(path: str, error: Exception) -> DataError:
    message = (str(error).strip().splitlines() or [type(error).__name__])[0]  # pyarrow adds lines of C++ source
    return DataError(f"{path}: not a readable Parquet file: {cut(message)}")


def report_skipped(problem: str, count: int) -> None:
    """On stderr: the first MAX_REPORTED_PROBLEMS skipped records of a call, then
    one line saying the rest are skipped silently (count: this one's number)."""
    if count <= MAX_REPORTED_PROBLEMS:
        print(f"{problem} (skipped)", file=sys.stderr)
    elif count == MAX_REPORTED_PROBLEMS + 1:
        print("... more bad records are skipped without a message", file=sys.stderr)


def iter_text_records(files: Sequence[str], strict: bool = False, stats: dict | None = None,
                      quiet: bool = False) -> Iterator[str]:
    """Yield the text of every `{"text": ...}` record in files.

    A bad record is reported on stderr as `file:line: reason` (unless quiet) and
    skipped, or raises DataError when strict. stats (if given) counts documents,
    skipped, empty and bytes (UTF-8 bytes of the yielded texts), and once every
    file is read, data_sha256 (the data's identity: iter_file_records). Files
    without a single non-empty text raise DataError once they are read.
    """
    if stats is None:
        stats = {}
    for key in ("documents", "skipped", "empty", "bytes"):
        stats.setdefault(key, 0)
    reported = 0
    documents = 0
    digest = hashlib.sha256()
    for path in files:
        try:
            for location, record in iter_file_records(path, digest):
                try:
                    if isinstance(record, ValueError):
                        raise record
                    text = _record_text(record)
                except ValueError as e:
                    if strict:
                        raise DataError(f"{location}: {e}") from None
                    stats["skipped"] += 1
                    reported += 1
                    if not quiet:
                        report_skipped(f"{location}: {e}", reported)
                    continue
                if not text:
                    stats["empty"] += 1
                    continue
                documents += 1
                stats["documents"] += 1
                stats["bytes"] += len(text.encode("utf-8"))
                yield text
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text: {e}") from e
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e}") from e
    if documents == 0:
        raise DataError(f"no documents with text in {', '.join(files)} "
                        f"({stats['skipped']} bad records, {stats['empty']} empty texts)")
    stats["data_sha256"] = digest.hexdigest()


def read_records(dataset_path: str | list[str], detect: Callable[[object, str], Callable],
                 strict: bool, quiet: bool, what: str, stage: str, stats: dict | None = None) -> list:
    """Convert every record of every file with the converter that detect() picks
    from the file's first record. A bad record is reported as `file:line: reason`
    and skipped (raised when strict); an unknown shape always raises. Unless
    quiet, prints one summary line ("<stage> data: N <what> from ...").
    stats, when given, receives {"files": n, "skipped": n, "formats": {format name: records},
    "data_sha256": the data's identity (iter_file_records)}."""
    stats = {} if stats is None else stats
    stats.update({"files": 0, "skipped": 0, "formats": {}})
    items = []
    digest = hashlib.sha256()
    for path in list_data_files(dataset_path):
        stats["files"] += 1
        convert = None
        try:
            for where, record in iter_file_records(path, digest):
                try:
                    if isinstance(record, ValueError):  # malformed JSON or invalid Unicode
                        raise DataError(f"{where}: {record}")
                    if convert is None:
                        convert = detect(record, where)
                    if not isinstance(record, dict):  # the converters read keys
                        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
                    items.append(convert(record, where))
                    name = convert.__name__.lstrip("_")
                    stats["formats"][name] = stats["formats"].get(name, 0) + 1
                except DataError as e:
                    unknown_shape = convert is None and not isinstance(record, ValueError)
                    if strict or unknown_shape:
                        raise
                    stats["skipped"] += 1
                    if not quiet:
                        report_skipped(str(e), stats["skipped"])
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text: {e}") from e
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e}") from e
    if not items:
        raise DataError(f"no usable {what} in {dataset_path} ({stats['skipped']} bad records skipped)")
    stats["data_sha256"] = digest.hexdigest()
    if not quiet:
        formats = ", ".join(f"{name} {count}" for name, count in stats["formats"].items())
        print(f"{stage} data: {len(items)} {what} from {stats['files']} files ({formats}), "
              f"{stats['skipped']} bad records skipped")
    return items


def describe_keys(record: object) -> str:
    if isinstance(record, dict):
        return f"keys {cut(repr(sorted(record)))}"
    return f"a JSON {type(record).__name__}, not an object"


# ---------------------------------------------------------------------------
# Conversation shapes (SFT and DPO)

def conversation_shape(record: object) -> str | None:
    """Which shape a record has, by its keys: "sharegpt", "messages", "alpaca", or None.
    SFT and DPO records share the shapes (a preference record adds chosen/rejected)."""
    if isinstance(record, dict):
        for key, shape in (("conversations", "sharegpt"), ("messages", "messages"), ("instruction", "alpaca")):
            if key in record:
                return shape
    return None


def string_field(record: dict, key: str, where: str, optional: bool = False) -> str:
    """record[key] as a string; a missing optional key (or null) is ""."""
    value = record.get(key)
    if value is None and optional:
        return ""
    if key not in record:
        raise DataError(f'{where}: missing "{key}"')
    if not isinstance(value, str):
        raise DataError(f'{where}: "{key}" must be a string, got {type(value).__name__}')
    return value


def alpaca_prompt(record: dict, where: str) -> list[dict]:
    """System (if any), history turns, then the user turn: instruction + "\\n" + input."""
    instruction = string_field(record, "instruction", where)
    extra = string_field(record, "input", where, optional=True)
    system = string_field(record, "system", where, optional=True)
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(f'{where}: "history" must be a list of [user, assistant] pairs')
    messages = [{"role": "system", "content": system}] if system else []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(f'{where}: history[{i}] must be a [user, assistant] pair of strings')
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages.append({"role": "user", "content": instruction + ("\n" + extra if extra else "")})
    return messages


def sharegpt_messages(record: dict, where: str) -> list[dict]:
    """ShareGPT turns ({"from", "value"}) as messages; a top-level "system" comes first."""
    turns = record.get("conversations")
    if not isinstance(turns, list):
        raise DataError(f'{where}: "conversations" must be a list of turns')
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: conversations[{i}] must be an object")
        speaker = turn.get("from")
        if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
            raise DataError(f'{where}: conversations[{i}] has "from": {cut(repr(speaker))}, expected one of '
                            f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": string_field(turn, "value", f"{where}: turn {i}")})
    system = string_field(record, "system", where, optional=True)
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def openai_messages(record: dict, where: str) -> list[dict]:
    """{"messages": [{"role", "content"}]}, keeping only those two keys."""
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise DataError(f'{where}: "messages" must be a list')
    return plain_messages(messages, where)


def plain_messages(messages: object, where: str) -> list[dict]:
    """messages, checked (chat_template.validate_messages), as {"role", "content"} only:
    other keys (a Parquet struct's unused fields, "name", ...) are dropped."""
    validate_messages(messages, where)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ---------------------------------------------------------------------------
# Has the data changed?


def files_fingerprint(files: Sequence[str]) -> str:
    """sha256 hex of each file's absolute path, size and modification time:
    changes when the data changes, without reading it."""
    digest = hashlib.sha256()
    for path in files:
        info = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{info.st_size}\0{info.st_mtime_ns}\0".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Held-out items, and the order of items over epochs


def is_validation_document(index: int, val_ratio: float) -> bool:
    """Route document number `index` to validation: a fixed hash of the index, so
    the split depends on neither worker count nor chunking. Document 1 always goes
    to validation, so any dataset of two or more documents has some."""
    if val_ratio <= 0:
        return False
    if index == 1:
        return True
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_ratio * 2**64


def split_held_out(items: list, val_ratio: float) -> tuple[list, list]:
    """(training items, held-out items): item i is held out by is_validation_document(i),
    so the split depends only on the items' order and val_ratio."""
    held_out = [is_validation_document(i, val_ratio) for i in range(len(items))]
    return ([x for x, out in zip(items, held_out) if not out], [x for x, out in zip(items, held_out) if out])


class EpochOrder:
    """Global sample index i -> item: epoch i // n, then a shuffle of the n items
    drawn from (seed, epoch) alone. The same index gives the same item whatever
    the batch size or number of processes, which makes resuming exact."""

    def __init__(self, n: int):
        if n <= 0:
            raise DataError("the data set is empty")
        self.n = n
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def permutation(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._cache:
            if len(self._cache) >= 4:  # a batch spans at most two epochs; keep a few
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = np.random.default_rng([seed, epoch]).permutation(self.n)
        return self._cache[key]

    def __call__(self, seed: int, index: int) -> int:
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        epoch, offset = divmod(int(index), self.n)
        return int(self.permutation(seed, epoch)[offset])
