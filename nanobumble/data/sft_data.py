"""SFT data: instruction / chat files -> conversations -> masked token rows -> batches.

These record shapes are read, detected per file by the keys of its first
record, from JSON arrays, JSON Lines or Parquet (records.iter_file_records):

    messages           {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}
                       (TRL's conversational language modelling)
    prompt-completion  {"prompt": str, "completion": str}: the same as messages [user: prompt, assistant:
                       completion]; or {"prompt": [messages], "completion": [assistant message, ...]}:
                       prompt + completion as one messages list (TRL's prompt-completion, standard and
                       conversational)
    text               {"text": str}: plain text, no chat template, every token trained, like pretraining
                       (the text's tokens, then <|endoftext|>; TRL's standard language modelling)
    ShareGPT           {"conversations": [{"from": "system" | "human" | "gpt", "value": ...}, ...], "system"?}
    Alpaca             {"instruction", "input", "output", "system"?, "history"?: [[user, assistant], ...]}

Every conversation becomes token ids plus a mask of the assistant tokens
(nanobumble/chat_template.py), on every assistant turn, a prompt-completion
record's prompt included (TRL trains only on the completion). The model learns
only where the mask is True: targets y = ids[1:], with y[i] = -100 where
mask[i + 1] is False. A text record is its tokens then <|endoftext|>, all of
them targets (the first token has nothing before it to be predicted from); one
longer than cutoff_len + 1 tokens keeps its start.

SFTDataset serves rows either one conversation per row (right-padded to the
longest in the batch) or packed: conversations laid end to end in rows of
exactly cutoff_len tokens, with position ids restarting at 0 for each one so
that attention stays inside each conversation. Like pretraining, a batch is a
function of (seed, sample index) alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from nanobumble.base.errors import DataError
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT, render, validate_messages
from nanobumble.data.records import (
    EpochOrder,
    alpaca_prompt,
    conversation_shape,
    describe_keys,
    openai_messages,
    plain_messages,
    read_records,
    sharegpt_messages,
    string_field,
)
from nanobumble.data.tokenizer import EOT_ID, Tokenizer
from nanobumble.model.layers import IGNORE_INDEX

# ---------------------------------------------------------------------------
# Loading conversations


def _alpaca(record: dict, where: str) -> dict:
    messages = alpaca_prompt(record, where)
    messages.append({"role": "assistant", "content": string_field(record, "output", where)})
    return _conversation(messages, where)


def _sharegpt(record: dict, where: str) -> dict:
    return _conversation(sharegpt_messages(record, where), where)


def _messages(record: dict, where: str) -> dict:
    return _conversation(openai_messages(record, where), where)


def _prompt_completion(record: dict, where: str) -> dict:
    """TRL's prompt-completion: two strings (a user turn and its answer), or two lists of messages."""
    for key in ("prompt", "completion"):
        if key not in record:
            raise DataError(f'{where}: missing "{key}"')
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return _conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                             where)
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise DataError(f'{where}: "prompt" and "completion" must be two strings or two lists of messages, '
                        f"got {type(prompt).__name__} and {type(completion).__name__}")
    if not (completion and isinstance(completion[0], dict) and completion[0].get("role") == "assistant"):
        raise DataError(f'{where}: "completion" must start with an assistant message')
    return _conversation(plain_messages(prompt + completion, where), where)


def _language_modeling(record: dict, where: str) -> dict:
    """TRL's standard language modelling: {"text": ...}, trained on every token."""
    return {"text": string_field(record, "text", where), "where": where}


def _conversation(messages: list[dict], where: str) -> dict:
    validate_messages(messages, where)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn")
    return {"messages": messages, "where": where}


SFT_SHAPES = ("messages (role, content), prompt and completion, text, ShareGPT (conversations) or "
              "Alpaca (instruction, input, output)")


def _detect_sft_format(record: object, where: str) -> Callable:
    if isinstance(record, dict) and ("chosen" in record or "rejected" in record):
        raise DataError(f"{where}: this is preference data (chosen/rejected); use it for DPO, not SFT")
    shape = conversation_shape(record)
    if shape is None and isinstance(record, dict):  # TRL's formats, after the shapes read before them
        shape = "prompt_completion" if "prompt" in record or "completion" in record else \
            "text" if "text" in record else None
    if shape is None:
        raise DataError(f"{where}: unknown record shape ({describe_keys(record)}); expected {SFT_SHAPES}")
    return {"sharegpt": _sharegpt, "messages": _messages, "alpaca": _alpaca, "prompt_completion": _prompt_completion,
            "text": _language_modeling}[shape]


def load_conversations(dataset_path: str | list[str], strict: bool = False, quiet: bool = False,
                       stats: dict | None = None) -> list[dict]:
    """Every conversation in dataset_path (a file, a directory, or a comma-separated
    list) as {"messages": [{"role", "content"}, ...], "where": "file:line"}, or a text
    record as {"text": str, "where": "file:line"}.
    stats, when given, receives the counts of files, formats and skipped records."""
    return read_records(dataset_path, _detect_sft_format, strict, quiet, "conversations", "sft", stats)


# ---------------------------------------------------------------------------
# Tokenizing


def tokenize_sft(conversations: Sequence[dict], tokenizer: Tokenizer, cutoff_len: int,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, quiet: bool = False
                 ) -> tuple[list[tuple[list[int], list[bool]]], dict]:
    """(ids, mask) per conversation, at most cutoff_len + 1 tokens (a row of
    cutoff_len inputs predicting cutoff_len targets), rendered by
    chat_template.render: the model's own chat template when it has one, as DPO,
    chat and serve render it.

    A conversation that is too long loses whole user + assistant exchanges from
    the end first; if even the first exchange does not fit, its tokens are cut
    at cutoff_len + 1. The start (system prompt, first question) always stays.
    A text record ({"text"}) is encode(text) + <|endoftext|> with every token
    trained and no chat template, cut at cutoff_len + 1 when longer.
    A sample left with no trained token among its targets is dropped.
    """
    limit = cutoff_len + 1
    stats = {"loaded": len(conversations), "truncated": 0, "dropped": 0, "samples": 0,
             "tokens": 0, "target_tokens": 0}
    samples = []
    for conversation in conversations:
        if "text" in conversation:  # plain text, as pretraining reads it
            ids = tokenizer.encode(conversation["text"]) + [tokenizer.eot_id]
            mask = [True] * len(ids)
            stats["truncated"] += int(len(ids) > limit)
        else:
            ids, mask = _render_fitting(conversation, tokenizer, system_prompt, limit, stats)
        ids, mask = ids[:limit], mask[:limit]
        check_token_ids(ids, tokenizer.vocab_size, conversation.get("where", "a conversation"))
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


def _render_fitting(conversation: dict, tokenizer: Tokenizer, system_prompt: str | None, limit: int,
                    stats: dict) -> tuple[list[int], list[bool]]:
    """The rendered conversation less whole exchanges from the end until it fits limit (or only one is left)."""
    messages = conversation["messages"]
    head = 1 if messages[0]["role"] == "system" else 0
    end = len(messages)
    try:
        ids, mask = render(messages, tokenizer, system_prompt)
        while len(ids) > limit and end - head > 2:
            end -= 2 if (end - head) % 2 == 0 else 1  # a whole exchange (or a lone trailing turn)
            ids, mask = render(messages[:end], tokenizer, system_prompt)
    except DataError as e:  # the model's template refused this conversation
        raise DataError(f"{conversation.get('where', 'a conversation')}: {e}") from None
    if end < len(messages) or len(ids) > limit:
        stats["truncated"] += 1
    return ids, mask


def check_token_ids(ids: Sequence[int] | np.ndarray, vocab_size: int | None, where: str) -> None:
    """Refuse (DataError naming where) a token id below 0 or, with vocab_size, not below it.

    The LM loss does not check its targets (that would cost a host sync every step:
    model/lm_loss.py), so the rows are checked where they are made. The tokenizer
    cannot make such an id; a damaged token cache or a mismatched tokenizer could."""
    if len(ids) == 0:
        return
    low, high = (int(ids.min()), int(ids.max())) if isinstance(ids, np.ndarray) else (min(ids), max(ids))
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        limit = f"[0, {vocab_size})" if vocab_size is not None else "[0, vocabulary size)"
        raise DataError(f"{where}: token id {low if low < 0 else high} is outside the vocabulary {limit}")


def check_rows(rows: Sequence[tuple[np.ndarray, np.ndarray]], vocab_size: int | None, what: str) -> None:
    """Inputs x are token ids, targets y token ids or IGNORE_INDEX, for every (x, y) row: checked
    all at once, then row by row only to name the first bad one ("{what} {i}")."""
    if not rows:
        return
    xs, ys = np.concatenate([x for x, _ in rows]), np.concatenate([y for _, y in rows])
    try:
        check_token_ids(xs, vocab_size, what)
        check_token_ids(ys[ys != IGNORE_INDEX], vocab_size, what)
    except DataError:
        for i, (x, y) in enumerate(rows):
            check_token_ids(x, vocab_size, f"{what} {i} (tokenized data), an input")
            check_token_ids(y[y != IGNORE_INDEX], vocab_size, f"{what} {i} (tokenized data), a target")
        raise


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
# Dataset


class SFTDataset:
    """Training rows from tokenized samples, one per row (padding) or packed."""

    def __init__(self, samples: Sequence[tuple[list[int], list[bool]]], cutoff_len: int,
                 packing: bool = False, pad_id: int = EOT_ID, vocab_size: int | None = None):
        """vocab_size: the model's; every row's ids and targets are checked against it
        (without it, only that none is negative) and a bad one is a DataError."""
        self.cutoff_len = cutoff_len
        self.packing = packing
        self.pad_id = pad_id
        pieces = []
        for i, (ids, mask) in enumerate(samples):
            if not 2 <= len(ids) <= cutoff_len + 1 or len(mask) != len(ids):
                raise ValueError(f"sample {i}: {len(ids)} ids / {len(mask)} mask values, "
                                 f"expected equal lengths between 2 and cutoff_len + 1 = {cutoff_len + 1}")
            pieces.append(sample_targets(ids, mask))
        check_rows(pieces, vocab_size, "SFT sample")
        check_token_ids([pad_id], vocab_size, "SFT padding (pad_id)")
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
