"""DPO data: preference files -> (prompt, chosen, rejected) -> token rows -> batches.

Record shapes, detected per file from its first record (JSON array or JSON Lines):

    ShareGPT  {"conversations": [... ending with a "human" turn], "chosen": {"from": "gpt", "value": ...},
               "rejected": {...}}            (chosen / rejected may also be plain strings)
    Alpaca    {"instruction", "input"?, "system"?, "history"?, "chosen": str, "rejected": str}
    messages  {"messages": [... ending with a "user" turn], "chosen": str or {"role": "assistant",
               "content": ...}, "rejected": ...}

A pair is tokenized as one prompt (rendered by the chat template, ending with
the assistant header) followed by each response and its closing <|im_end|>.
Only the response tokens are targets: the DPO loss compares how likely the
policy and the reference model find the chosen versus the rejected answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from nanobumble.base.errors import DataError
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT, generation_prompt, render, validate_messages
from nanobumble.data.records import (
    EpochOrder,
    alpaca_prompt,
    conversation_shape,
    describe_keys,
    openai_messages,
    read_records,
    sharegpt_messages,
)
from nanobumble.data.tokenizer import EOT_ID, Tokenizer
from nanobumble.model.layers import IGNORE_INDEX

# ---------------------------------------------------------------------------
# Loading


def _response(record: dict, key: str, where: str) -> str:
    """chosen / rejected: a string, or one assistant message in ShareGPT or role/content form."""
    if key not in record:
        raise DataError(f'{where}: missing "{key}"')
    value = record[key]
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if value.get("from") in ("gpt", "assistant") and isinstance(value.get("value"), str):
            return value["value"]
        if value.get("role") == "assistant" and isinstance(value.get("content"), str):
            return value["content"]
    raise DataError(f'{where}: "{key}" must be a string or an assistant message '
                    '({"from": "gpt", "value": ...} or {"role": "assistant", "content": ...})')


def _pair(prompt: list[dict], record: dict, where: str) -> dict:
    validate_messages(prompt, where)
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user turn")
    return {"prompt": prompt, "chosen": _response(record, "chosen", where),
            "rejected": _response(record, "rejected", where), "where": where}


def _sharegpt(record: dict, where: str) -> dict:
    return _pair(sharegpt_messages(record, where), record, where)


def _alpaca(record: dict, where: str) -> dict:
    return _pair(alpaca_prompt(record, where), record, where)


def _messages(record: dict, where: str) -> dict:
    return _pair(openai_messages(record, where), record, where)


def _detect_pair_format(record: object, where: str) -> Callable:
    # "chosen" or "rejected" marks preference data; a record missing the other one
    # is then skipped as a bad record (by _response), not taken for an unknown shape.
    shape = conversation_shape(record) if isinstance(record, dict) and ("chosen" in record or "rejected" in record) \
        else None
    if shape is None:
        raise DataError(f"{where}: unknown preference record shape ({describe_keys(record)}); expected "
                        "chosen and rejected with conversations (ShareGPT), instruction (Alpaca) or messages")
    return {"sharegpt": _sharegpt, "messages": _messages, "alpaca": _alpaca}[shape]


def load_preference_pairs(dataset_path: str | list[str], strict: bool = False, quiet: bool = False,
                          stats: dict | None = None) -> list[dict]:
    """Every pair in dataset_path (a file, a directory, or a comma-separated list) as
    {"prompt": messages ending with a user turn, "chosen": str, "rejected": str, "where": "file:line"}.
    stats, when given, receives the counts of files, formats and skipped records."""
    return read_records(dataset_path, _detect_pair_format, strict, quiet, "preference pairs", "dpo", stats)


# ---------------------------------------------------------------------------
# Tokenizing


def tokenize_pairs(pairs: Sequence[dict], tokenizer: Tokenizer, cutoff_len: int,
                   system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, quiet: bool = False
                   ) -> tuple[list[dict], dict]:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} per pair, each prompt + response
    at most cutoff_len + 1 tokens.

    prompt_ids = the rendered prompt with the assistant header; a response is
    encode(text) + <|im_end|>. Too long: the prompt loses tokens from its LEFT
    first (down to the assistant header, which always stays), then the responses
    from their right. A pair is dropped when a response has no token left or
    when chosen and rejected are the same tokens.
    """
    limit = cutoff_len + 1
    header_len = len(generation_prompt(tokenizer))  # the prompt never loses these
    stats = {"loaded": len(pairs), "truncated": 0, "dropped_empty": 0, "dropped_identical": 0, "pairs": 0}
    out = []
    for pair in pairs:
        prompt, _ = render(pair["prompt"], tokenizer, system_prompt, add_generation_prompt=True)
        chosen = tokenizer.encode(pair["chosen"]) + [tokenizer.im_end_id]
        rejected = tokenizer.encode(pair["rejected"]) + [tokenizer.im_end_id]
        longest = max(len(chosen), len(rejected))
        if len(prompt) + longest > limit:
            stats["truncated"] += 1
            keep = max(limit - longest, header_len)
            prompt = prompt[len(prompt) - keep:] if keep < len(prompt) else prompt
            room = limit - len(prompt)
            chosen, rejected = chosen[:max(room, 0)], rejected[:max(room, 0)]
        if not chosen or not rejected:
            stats["dropped_empty"] += 1
            continue
        if chosen == rejected:
            stats["dropped_identical"] += 1
            continue
        out.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
        stats["pairs"] += 1
    if not quiet:
        print(pairs_summary(stats, cutoff_len))
    return out, stats


def pairs_summary(stats: dict, cutoff_len: int) -> str:
    return (f"dpo data: {stats['pairs']} pairs from {stats['loaded']}, {stats['truncated']} truncated to "
            f"cutoff_len={cutoff_len}, dropped {stats['dropped_empty']} with an empty response and "
            f"{stats['dropped_identical']} with identical chosen and rejected")


def sequence_targets(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (prompt + response)[:-1] and targets [1:], -100 except on response tokens."""
    ids = np.concatenate([np.asarray(prompt_ids, dtype=np.int64), np.asarray(response_ids, dtype=np.int64)])
    y = ids[1:].copy()
    y[:len(prompt_ids) - 1] = IGNORE_INDEX  # targets before the first response token
    return ids[:-1], y


# ---------------------------------------------------------------------------
# Dataset


class PreferenceDataset:
    """Batches of pairs: the n chosen rows, then the n rejected rows, in one tensor
    (one forward pass scores both). Order by (seed, sample index), as SFTDataset."""

    def __init__(self, pairs: Sequence[dict], pad_id: int = EOT_ID):
        self.pairs = list(pairs)
        self.pad_id = pad_id
        self.num_pairs = len(self.pairs)
        self.order = EpochOrder(self.num_pairs)

    def batch(self, seed: int, sample_indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The pairs at these positions of the (seed)-shuffled stream of epochs."""
        return self.batch_of_pairs([self.order(seed, index) for index in sample_indices])

    def batch_of_pairs(self, pair_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """{"input_ids": [2n, L], "labels": [2n, L], "pair_ids": [n]}: row i is pair i's
        chosen answer, row n + i its rejected one; right-padded with pad_id inputs and
        -100 labels to the longest row."""
        chosen, rejected = [], []
        for pair_id in pair_ids:
            pair = self.pairs[pair_id]
            chosen.append(sequence_targets(pair["prompt_ids"], pair["chosen_ids"]))
            rejected.append(sequence_targets(pair["prompt_ids"], pair["rejected_ids"]))
        rows = chosen + rejected
        length = max(len(x) for x, _ in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            input_ids[i, :len(x)] = torch.from_numpy(x)
            labels[i, :len(y)] = torch.from_numpy(y)
        return {"input_ids": input_ids, "labels": labels, "pair_ids": torch.tensor(list(pair_ids), dtype=torch.long)}
