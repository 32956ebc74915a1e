"""SFT data: instruction / chat files -> conversations -> masked token rows -> batches.

Three record shapes are read, detected per file from its first record, from
JSON arrays or JSON Lines:

    Alpaca    {"instruction", "input", "output", "system"?, "history"?: [[user, assistant], ...]}
    ShareGPT  {"conversations": [{"from": "system" | "human" | "gpt", "value": ...}, ...], "system"?}
    messages  {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}

Every conversation becomes token ids plus a mask of the assistant tokens
(nanobumble/chat_template.py). The model learns only where the mask is True:
targets y = ids[1:], with y[i] = -100 where mask[i + 1] is False.

SFTDataset serves rows either one conversation per row (right-padded to the
longest in the batch) or packed: conversations laid end to end in rows of
exactly cutoff_len tokens, with position ids restarting at 0 for each one so
that attention stays inside each conversation. Like pretraining, a batch is a
function of (seed, sample index) alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import numpy as np
import torch

from nanobumble.chat_template import DEFAULT_SYSTEM_PROMPT, render_turn, validate_messages, with_system_prompt
from nanobumble.data import MAX_REPORTED_PROBLEMS, DataError, _iter_file_records, list_data_files
from nanobumble.tokenizer import EOT_ID, Tokenizer

IGNORE_INDEX = -100
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


# ---------------------------------------------------------------------------
# Record shapes -> messages (shared with dpo_data.py)


def _string(record: dict, key: str, where: str, optional: bool = False) -> str:
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
    instruction = _string(record, "instruction", where)
    extra = _string(record, "input", where, optional=True)
    system = _string(record, "system", where, optional=True)
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
        if speaker not in SHAREGPT_ROLES:
            raise DataError(f'{where}: conversations[{i}] has "from": {speaker!r}, expected one of '
                            f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": _string(turn, "value", f"{where}: turn {i}")})
    system = _string(record, "system", where, optional=True)
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def openai_messages(record: dict, where: str) -> list[dict]:
    """{"messages": [{"role", "content"}]}, keeping only those two keys."""
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise DataError(f'{where}: "messages" must be a list')
    validate_messages(messages, where)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_records(dataset_path: str | list[str], detect: Callable[[object, str], Callable],
                 strict: bool, quiet: bool, what: str) -> tuple[list, dict]:
    """Convert every record of every file with the converter that detect() picks
    from the file's first record. A bad record is reported as `file:line: reason`
    and skipped (raised when strict); an unknown shape always raises.
    Returns (items, {"files": n, "skipped": n, "formats": {format name: records}})."""
    stats: dict = {"files": 0, "skipped": 0, "formats": {}}
    items = []
    for path in list_data_files(dataset_path):
        stats["files"] += 1
        convert = None
        try:
            for where, record in _iter_file_records(path):
                try:
                    if isinstance(record, ValueError):  # malformed JSON or invalid Unicode
                        raise DataError(f"{where}: {record}")
                    if convert is None:
                        convert = detect(record, where)
                    items.append(convert(record, where))
                    name = convert.__name__.lstrip("_")
                    stats["formats"][name] = stats["formats"].get(name, 0) + 1
                except DataError as e:
                    unknown_shape = convert is None and not isinstance(record, ValueError)
                    if strict or unknown_shape:
                        raise
                    stats["skipped"] += 1
                    if quiet:
                        continue
                    if stats["skipped"] <= MAX_REPORTED_PROBLEMS:
                        print(f"{e} (skipped)", file=sys.stderr)
                    elif stats["skipped"] == MAX_REPORTED_PROBLEMS + 1:
                        print("... more bad records are skipped without a message", file=sys.stderr)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text: {e}") from e
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e}") from e
    if not items:
        raise DataError(f"no usable {what} in {dataset_path} ({stats['skipped']} bad records skipped)")
    return items, stats


def describe_keys(record: object) -> str:
    if isinstance(record, dict):
        return f"keys {sorted(record)}"
    return f"a JSON {type(record).__name__}, not an object"


# ---------------------------------------------------------------------------
# Loading conversations


def _alpaca(record: dict, where: str) -> dict:
    messages = alpaca_prompt(record, where)
    messages.append({"role": "assistant", "content": _string(record, "output", where)})
    return _conversation(messages, where)


def _sharegpt(record: dict, where: str) -> dict:
    return _conversation(sharegpt_messages(record, where), where)


def _messages(record: dict, where: str) -> dict:
    return _conversation(openai_messages(record, where), where)


def _conversation(messages: list[dict], where: str) -> dict:
    validate_messages(messages, where)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn")
    return {"messages": messages, "where": where}


def _detect_sft_format(record: object, where: str) -> Callable:
    if isinstance(record, dict):
        if "chosen" in record or "rejected" in record:
            raise DataError(f"{where}: this is preference data (chosen/rejected); use it for DPO, not SFT")
        if "conversations" in record:
            return _sharegpt
        if "messages" in record:
            return _messages
        if "instruction" in record:
            return _alpaca
    raise DataError(f"{where}: unknown record shape ({describe_keys(record)}); expected Alpaca "
                    "(instruction, input, output), ShareGPT (conversations) or messages (role, content)")


def load_conversations(dataset_path: str | list[str], strict: bool = False, quiet: bool = False,
                       stats: dict | None = None) -> list[dict]:
    """Every conversation in dataset_path (a file, a directory, or a comma-separated
    list) as {"messages": [{"role", "content"}, ...], "where": "file:line"}.
    stats, when given, receives the counts of files, formats and skipped records."""
    conversations, found = read_records(dataset_path, _detect_sft_format, strict, quiet, "conversations")
    if stats is not None:
        stats.update(found)
    if not quiet:
        formats = ", ".join(f"{name} {count}" for name, count in found["formats"].items())
        print(f"sft data: {len(conversations)} conversations from {found['files']} files ({formats}), "
              f"{found['skipped']} bad records skipped")
    return conversations


# ---------------------------------------------------------------------------
# Tokenizing


def tokenize_sft(conversations: Sequence[dict], tokenizer: Tokenizer, cutoff_len: int,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, quiet: bool = False
                 ) -> tuple[list[tuple[list[int], list[bool]]], dict]:
    """(ids, mask) per conversation, at most cutoff_len + 1 tokens (a row of
    cutoff_len inputs predicting cutoff_len targets).

    A conversation that is too long loses whole user + assistant exchanges from
    the end first; if even the first exchange does not fit, its tokens are cut
    at cutoff_len + 1. The start (system prompt, first question) always stays.
    A sample left with no trained token among its targets is dropped.
    """
    limit = cutoff_len + 1
    stats = {"loaded": len(conversations), "truncated": 0, "dropped": 0, "samples": 0,
             "tokens": 0, "target_tokens": 0}
    samples = []
    for conversation in conversations:
        messages = with_system_prompt(conversation["messages"], system_prompt)
        turns = [render_turn(m["role"], m["content"], tokenizer) for m in messages]
        head = 1 if messages[0]["role"] == "system" else 0
        end = len(turns)
        length = sum(len(ids) for ids, _ in turns)
        while length > limit and end - head > 2:
            drop = 2 if (end - head) % 2 == 0 else 1  # a whole exchange (or a lone trailing turn)
            length -= sum(len(ids) for ids, _ in turns[end - drop:end])
            end -= drop
        ids = [t for turn_ids, _ in turns[:end] for t in turn_ids][:limit]
        mask = [m for _, turn_mask in turns[:end] for m in turn_mask][:limit]
        if end < len(turns) or length > limit:
            stats["truncated"] += 1
        trained = sum(mask[1:])
        if trained == 0:
            stats["dropped"] += 1
            continue
        samples.append((ids, mask))
        stats["samples"] += 1
        stats["tokens"] += len(ids)
        stats["target_tokens"] += trained
    if not quiet:
        print(sft_summary(stats, cutoff_len))
    return samples, stats


def sft_summary(stats: dict, cutoff_len: int) -> str:
    return (f"sft data: {stats['samples']} samples from {stats['loaded']} conversations, "
            f"{stats['truncated']} truncated to cutoff_len={cutoff_len}, "
            f"{stats['dropped']} dropped (no trained token left), "
            f"{stats['tokens']:,} tokens of which {stats['target_tokens']:,} trained")


def sample_targets(ids: Sequence[int], mask: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ids[:-1] and targets ids[1:], a target ignored (-100) where not trained."""
    ids_arr = np.asarray(ids, dtype=np.int64)
    y = ids_arr[1:].copy()
    y[~np.asarray(mask[1:], dtype=bool)] = IGNORE_INDEX
    return ids_arr[:-1], y


# ---------------------------------------------------------------------------
# Deterministic order over endless epochs (shared with dpo_data.py)


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


# ---------------------------------------------------------------------------
# Dataset


class SFTDataset:
    """Training rows from tokenized samples, one per row (padding) or packed."""

    def __init__(self, samples: Sequence[tuple[list[int], list[bool]]], cutoff_len: int,
                 packing: bool = False, pad_id: int = EOT_ID):
        self.cutoff_len = cutoff_len
        self.packing = packing
        self.pad_id = pad_id
        pieces = []
        for i, (ids, mask) in enumerate(samples):
            if not 2 <= len(ids) <= cutoff_len + 1 or len(mask) != len(ids):
                raise ValueError(f"sample {i}: {len(ids)} ids / {len(mask)} mask values, "
                                 f"expected equal lengths between 2 and cutoff_len + 1 = {cutoff_len + 1}")
            pieces.append(sample_targets(ids, mask))
        if packing:
            self.rows = self._pack(pieces)
        else:
            self.rows = [(x, y, None) for x, y in pieces]
        self.num_rows = len(self.rows)
        self.num_target_tokens = int(sum((y != IGNORE_INDEX).sum() for _, y, _ in self.rows))
        self.order = EpochOrder(self.num_rows)

    def _pack(self, pieces: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Greedy, in order: a sample that does not fit in the current row starts the
        next one; samples are never split. Each sample and the row's end padding get
        positions starting at 0, so each is its own document to attention."""
        rows = []
        current: list[tuple[np.ndarray, np.ndarray]] = []
        used = 0
        for x, y in pieces:
            if used + len(x) > self.cutoff_len:
                rows.append(self._packed_row(current))
                current, used = [], 0
            current.append((x, y))
            used += len(x)
        if current:
            rows.append(self._packed_row(current))
        return rows

    def _packed_row(self, pieces: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pad = self.cutoff_len - sum(len(x) for x, _ in pieces)
        xs = [x for x, _ in pieces] + [np.full(pad, self.pad_id, dtype=np.int64)]
        ys = [y for _, y in pieces] + [np.full(pad, IGNORE_INDEX, dtype=np.int64)]
        positions = [np.arange(len(x), dtype=np.int64) for x, _ in pieces] + [np.arange(pad, dtype=np.int64)]
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(positions)

    def row(self, seed: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(inputs, targets, positions or None) of global sample index `index`."""
        return self.rows[self.order(seed, index)]

    def batch(self, seed: int, sample_indices: Sequence[int]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x, y [n, L] (and position_ids [n, L] when packing, else None).
        Padding mode: L is the longest row in the batch, padded with pad_id inputs and
        -100 targets. Packing: L = cutoff_len."""
        rows = [self.row(seed, i) for i in sample_indices]
        if self.packing:
            x, y, pos = (torch.from_numpy(np.stack([r[k] for r in rows])) for k in range(3))
            return x, y, pos
        length = max(len(r[0]) for r in rows)
        x = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, (xi, yi, _) in enumerate(rows):
            x[i, :len(xi)] = torch.from_numpy(xi)
            y[i, :len(yi)] = torch.from_numpy(yi)
        return x, y, None
