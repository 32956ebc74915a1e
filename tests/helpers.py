"""Conveniences the tests use over the package's own interfaces (the package
itself needs none of them): all of a generation at once, text pieces from
token ids, the adapter weights of a model, the logged metrics of a run, a
benchmark table, and a token shard written from an array."""

import json
import os

import numpy as np
import torch

from nanobumble.data.shards import _ShardFile
from nanobumble.inference.generation import GenerationConfig, TextStreamer, generate_stream
from nanobumble.model.lora import is_lora_param
from nanobumble.store.model_dir import gather_full_on_main


def generate(model, prompt_ids: list[int], cfg: GenerationConfig, **kwargs) -> list[int]:
    """All new token ids at once (stop id excluded)."""
    return list(generate_stream(model, prompt_ids, cfg, **kwargs))


def stream_text(tokenizer, token_ids):
    """Whole-character text pieces for a stream of token ids (see TextStreamer)."""
    streamer = TextStreamer(tokenizer)
    for token_id in token_ids:
        piece = streamer.put(token_id)
        if piece:
            yield piece
    tail = streamer.flush()
    if tail:
        yield tail


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, as full CPU tensors on rank 0, {} on other ranks
    (every rank must call this: sharded tensors are gathered one at a time)."""
    return gather_full_on_main((name, param) for name, param in model.named_parameters() if is_lora_param(name))


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def format_table(title: str, header: list, rows: list[list]) -> str:
    """A plain right-aligned text table, for the benchmarks."""
    cells = [[str(c) for c in row] for row in [header] + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([title, lines[0], "-+-".join("-" * w for w in widths)] + lines[1:])


def write_shard(path: str, tokens: np.ndarray, vocab_size: int) -> None:
    """Write one shard from an array, atomically."""
    shard = _ShardFile(path, vocab_size)
    try:
        shard.append(tokens)
    except BaseException:
        shard.abort()
        raise
    shard.finish()
