"""DPO data: preference files -> (prompt, chosen, rejected) -> token rows -> batches.

Record shapes, detected per file by the keys of its first record (JSON array,
JSON Lines or Parquet: records.iter_file_records):

    explicit prompt  {"prompt": str, "chosen": str, "rejected": str}: the prompt is one user turn; or
                     {"prompt": [messages ending with a user turn], "chosen": [{"role": "assistant", ...}],
                      "rejected": [...]}            (TRL's preference format, standard and conversational)
    implicit prompt  {"chosen": [whole conversation], "rejected": [whole conversation]}: the prompt is what
                     the two share, everything before their last (assistant) messages, which are the answers
                     (TRL's conversational implicit-prompt preference). Taken, as TRL does, whenever chosen or
                     rejected is a list of messages and "prompt" is not: UltraFeedback's rows also hold a string
                     "prompt" and "messages", which are not read.
    ShareGPT         {"conversations": [... ending with a "human" turn], "chosen": {"from": "gpt", "value": ...},
                      "rejected": {...}}
    Alpaca           {"instruction", "input"?, "system"?, "history"?, "chosen": str, "rejected": str}
    messages         {"messages": [... ending with a "user" turn], "chosen": ..., "rejected": ...}

A chosen / rejected answer that is not a whole conversation may be a string
or one assistant message ({"from": "gpt", "value"} or {"role": "assistant",
"content"}); with "prompt", also a list of one such message. Every shape becomes
the same pair: {"prompt": messages ending with a user turn, "chosen": str,
"rejected": str}. TRL's standard implicit prompt (two plain strings, no
"prompt") is not read: with no turns there is no prompt to render.

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
    plain_messages,
    read_records,
    sharegpt_messages,
)
from nanobumble.data.sft_data import check_rows, check_token_ids
from nanobumble.data.tokenizer import EOT_ID, Tokenizer
from nanobumble.model.layers import IGNORE_INDEX

# ---------------------------------------------------------------------------
# Loading


def _response(record: dict, key: str, where: str, listed: bool = False) -> str:
    """chosen / rejected: a string, or one assistant message in ShareGPT or role/content form;
    listed: or a list of one such message (TRL's conversational preference format)."""
    if key not in record:
        raise DataError(f'{where}: missing "{key}"')
    value = record[key]
    if listed and isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if value.get("from") in ("gpt", "assistant") and isinstance(value.get("value"), str):
            return value["value"]
        if value.get("role") == "assistant" and isinstance(value.get("content"), str):
            return value["content"]
    raise DataError(f'{where}: "{key}" must be a string or an assistant message '
                    '({"from": "gpt", "value": ...} or {"role": "assistant", "content": ...})'
                    + (", or a list of one" if listed else ""))


def _pair(prompt: list[dict], record: dict, where: str, listed: bool = False) -> dict:
    validate_messages(prompt, where)
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user turn")
    return {"prompt": prompt, "chosen": _response(record, "chosen", where, listed),
            "rejected": _response(record, "rejected", where, listed), "where": where}


def _sharegpt(record: dict, where: str) -> dict:
    return _pair(sharegpt_messages(record, where), record, where)


def _alpaca(record: dict, where: str) -> dict:
    return _pair(alpaca_prompt(record, where), record, where)


def _messages(record: dict, where: str) -> dict:
    return _pair(openai_messages(record, where), record, where)


def _explicit_prompt(record: dict, where: str) -> dict:
    """TRL's preference format: "prompt" is a string (one user turn) or a list of messages."""
    if "prompt" not in record:
        raise DataError(f'{where}: missing "prompt"')
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return _pair([{"role": "user", "content": prompt}], record, where, listed=True)
    if not isinstance(prompt, list):
        raise DataError(f'{where}: "prompt" must be a string or a list of messages, got {type(prompt).__name__}')
    return _pair(plain_messages(prompt, f'{where}: "prompt"'), record, where, listed=True)


def _implicit_prompt(record: dict, where: str) -> dict:
    """TRL's conversational implicit prompt: chosen and rejected are whole conversations, the same up to
    their last messages, which are the two assistant answers."""
    chosen, rejected = (_whole_conversation(record, key, where) for key in ("chosen", "rejected"))
    if chosen[:-1] != rejected[:-1]:
        raise DataError(f'{where}: "chosen" and "rejected" do not share a prompt: without a "prompt" they must be '
                        "the same conversation up to their last (assistant) message")
    return _pair(chosen[:-1], {"chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}, where)


def _whole_conversation(record: dict, key: str, where: str) -> list[dict]:
    if key not in record:
        raise DataError(f'{where}: missing "{key}"')
    messages = record[key]
    if not isinstance(messages, list):
        raise DataError(f'{where}: "{key}" must be a list of messages (the whole conversation, when there is no '
                        f'"prompt"), got {type(messages).__name__}')
    messages = plain_messages(messages, f'{where}: "{key}"')
    if messages[-1]["role"] != "assistant":
        raise DataError(f'{where}: "{key}" must end with an assistant turn (the answer)')
    return messages


PREFERENCE_SHAPES = ("chosen and rejected with prompt (TRL), conversations (ShareGPT), instruction (Alpaca) or "
                     "messages, or chosen and rejected as whole conversations (TRL's implicit prompt)")


def _is_conversation(value: object) -> bool:
    """A list of messages, as TRL tells one (trl.data_utils.is_conversational): its first item has a role."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _detect_pair_format(record: object, where: str) -> Callable:
    # "chosen" or "rejected" marks preference data; a record missing the other one
    # is then skipped as a bad record (by _response), not taken for an unknown shape.
    shape = None
    if isinstance(record, dict) and ("chosen" in record or "rejected" in record):
        # As TRL (maybe_extract_prompt): answers that are conversations beside no prompt, or beside a prompt that
        # is not one, hold the prompt themselves. UltraFeedback's rows also carry a string "prompt" and "messages".
        if any(_is_conversation(record.get(key)) for key in ("chosen", "rejected")) \
                and not isinstance(record.get("prompt"), list):
            shape = "implicit_prompt"
        else:
            shape = conversation_shape(record) or ("explicit_prompt" if "prompt" in record else None)
    # TRL's standard implicit prompt (two strings, no "prompt") stays an unknown shape.
    if shape is None:
        raise DataError(f"{where}: unknown preference record shape ({describe_keys(record)}); expected "
                        f"{PREFERENCE_SHAPES}")
    return {"sharegpt": _sharegpt, "messages": _messages, "alpaca": _alpaca, "explicit_prompt": _explicit_prompt,
            "implicit_prompt": _implicit_prompt}[shape]


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
        for ids in (prompt, chosen, rejected):
            check_token_ids(ids, tokenizer.vocab_size, pair.get("where", "a preference pair"))
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

    def __init__(self, pairs: Sequence[dict], pad_id: int = EOT_ID, vocab_size: int | None = None):
        """vocab_size: the model's; every pair's ids are checked against it (without it,
        only that none is negative) and a bad one is a DataError. The LM loss does not
        check its targets (model/lm_loss.py): they are checked here, where rows are made."""
        self.pairs = list(pairs)
        for key in ("chosen_ids", "rejected_ids"):
            check_rows([sequence_targets(pair["prompt_ids"], pair[key]) for pair in self.pairs], vocab_size,
                       f"preference pair ({key})")
        check_token_ids([pad_id], vocab_size, "DPO padding (pad_id)")
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
