"""SFT and DPO data tokenized once, cached on disk, read by every rank.

Tokenizing tens of thousands of conversations takes minutes on one core, and
every rank of every run used to do it again. Now the first process that needs
the data (rank 0, under main_process_first) tokenizes it with a pool of
processes into

    {cache_dir}/sft-{key}/   or   {cache_dir}/dpo-{key}/
        tokens.safetensors   flat token arrays and per-sample lengths (no pickle)
        meta.json            what the key was made of, and the counts

and every later process, and every later run with the same inputs, reads the
arrays back. The key covers everything the tokens depend on: the data files
(path, size, modification time), the tokenizer, the chat template, the system
prompt, cutoff_len and strict. Change any of them and the data is tokenized
again into a new directory; the counts of loaded, truncated and dropped
samples are printed either way.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from nanobumble.base.errors import DataError
from nanobumble.base.files import atomic_directory, usual_permissions
from nanobumble.base.output_guard import record, sweep_leftovers
from nanobumble.base.reading import read_json
from nanobumble.data.chat_template import CHATML_RENDERER
from nanobumble.data.dpo_data import load_preference_pairs, pairs_summary, tokenize_pairs
from nanobumble.data.records import files_fingerprint, list_data_files
from nanobumble.data.sft_data import load_conversations, sft_summary, tokenize_sft
from nanobumble.data.tokenizer import load_tokenizer, map_in_workers

CACHE_VERSION = 3  # 2: stats record data_sha256; 3: TRL's formats read (a file once skipped now reads)
CHUNK_ITEMS = 512  # conversations or pairs per task sent to a worker process



class CacheKind(NamedTuple):
    load: Callable  # dataset_path -> raw records
    tokenize: Callable  # records -> (tokenized items, counts)
    fields: tuple[str, ...]  # the token fields of one tokenized item
    summary: Callable  # counts -> one line


KINDS = {
    "sft": CacheKind(load_conversations, tokenize_sft, ("ids", "mask"), sft_summary),
    "dpo": CacheKind(load_preference_pairs, tokenize_pairs, ("prompt_ids", "chosen_ids", "rejected_ids"),
                     pairs_summary),
}


def template_identity(tokenizer) -> str:
    """The chat template a conversation is rendered with: the model's own Jinja
    template, or nanobumble's ChatML renderer."""
    return tokenizer.chat_template or CHATML_RENDERER


def cache_key(kind: str, files: Sequence[str], tokenizer, system_prompt: str | None, cutoff_len: int,
              strict: bool) -> str:
    parts = [kind, str(CACHE_VERSION), files_fingerprint(files), tokenizer.checksum, template_identity(tokenizer),
             system_prompt or "", str(cutoff_len), str(strict)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def tokenized_sft(dataset_path: str | list[str], tokenizer, cutoff_len: int, system_prompt: str | None,
                  cache_dir: str, strict: bool = False, num_workers: int | None = None, quiet: bool = False
                  ) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """SFT samples [(ids, mask)] as tokenize_sft makes them, from the cache when it has them."""
    items, stats = _cached("sft", dataset_path, tokenizer, cutoff_len, system_prompt, cache_dir, strict,
                           num_workers, quiet)
    return [(item["ids"], item["mask"].astype(bool)) for item in items], stats


def tokenized_pairs(dataset_path: str | list[str], tokenizer, cutoff_len: int, system_prompt: str | None,
                    cache_dir: str, strict: bool = False, num_workers: int | None = None, quiet: bool = False
                    ) -> tuple[list[dict], dict]:
    """DPO pairs [{"prompt_ids", "chosen_ids", "rejected_ids"}] as tokenize_pairs makes them, cached."""
    return _cached("dpo", dataset_path, tokenizer, cutoff_len, system_prompt, cache_dir, strict, num_workers, quiet)


def _cached(kind: str, dataset_path, tokenizer, cutoff_len: int, system_prompt: str | None, cache_dir: str,
            strict: bool, num_workers: int | None, quiet: bool) -> tuple[list[dict], dict]:
    load, tokenize, fields, summary = KINDS[kind]
    files = list_data_files(dataset_path)
    directory = os.path.join(cache_dir, f"{kind}-{cache_key(kind, files, tokenizer, system_prompt, cutoff_len, strict)}")
    cached = _read(directory, fields)
    if cached is not None:
        items, stats = cached
        if not quiet:
            print(f"{kind} data: reusing {directory} ({stats['skipped']} bad records were skipped)")
            print(summary(stats, cutoff_len))
        return items, stats

    if not quiet:
        print(f"{kind} data: tokenizing {len(files)} file(s) into {directory}")
    stats: dict = {}
    records = load(dataset_path, strict=strict, quiet=quiet, stats=stats)
    start = time.time()
    items, counts = _tokenize_in_parallel(kind, records, tokenizer, cutoff_len, system_prompt, num_workers, quiet)
    del records
    stats = {"files": stats["files"], "skipped": stats["skipped"], "data_sha256": stats["data_sha256"], **counts}
    if not quiet:
        print(f"{summary(stats, cutoff_len)}; {time.time() - start:.1f}s")
    meta = {"format_version": CACHE_VERSION, "kind": kind, "files": [os.path.abspath(f) for f in files],
            "tokenizer_checksum": tokenizer.checksum,
            "chat_template_sha256": hashlib.sha256(template_identity(tokenizer).encode()).hexdigest(),
            "system_prompt": system_prompt or "", "cutoff_len": cutoff_len, "strict": strict, "stats": stats}
    _write(directory, _pack(items, fields), meta)
    return items, stats


# ---------------------------------------------------------------------------
# Tokenizing in worker processes

_worker: dict = {}


def _init_worker(kind: str, model_file: str, chat_template: str | None, cutoff_len: int,
                 system_prompt: str | None) -> None:
    tokenizer = load_tokenizer(model_file)
    tokenizer.chat_template = chat_template  # the template of the caller's tokenizer object
    _worker.update(kind=kind, tokenizer=tokenizer, cutoff_len=cutoff_len, system_prompt=system_prompt)


def _tokenize_chunk(records: list[dict]) -> tuple[list[dict], dict]:
    """One chunk of records -> tokenized items (fields as numpy arrays) and counts."""
    kind = _worker["kind"]
    items, counts = KINDS[kind].tokenize(records, _worker["tokenizer"], _worker["cutoff_len"],
                                         _worker["system_prompt"], quiet=True)
    if kind == "sft":
        items = [{"ids": ids, "mask": mask} for ids, mask in items]
    return _unpack(_pack(items, KINDS[kind].fields), KINDS[kind].fields), counts


def _tokenize_in_parallel(kind: str, records: list[dict], tokenizer, cutoff_len: int, system_prompt: str | None,
                          num_workers: int | None, quiet: bool) -> tuple[list[dict], dict]:
    """Chunks of records tokenized by num_workers processes (default: all CPUs),
    in order; one chunk's worth of data is tokenized in this process."""
    chunks = [records[i:i + CHUNK_ITEMS] for i in range(0, len(records), CHUNK_ITEMS)]
    num_workers = min(num_workers or os.cpu_count() or 1, len(chunks))
    initargs = (kind, tokenizer.model_file, tokenizer.chat_template, cutoff_len, system_prompt)
    items: list[dict] = []
    counts: dict = {}
    start = time.time()

    def add(result: tuple[list[dict], dict], done: int) -> None:
        items.extend(result[0])
        for name, value in result[1].items():
            counts[name] = counts.get(name, 0) + value
        if not quiet and len(chunks) > 1:
            rate = done / max(time.time() - start, 1e-9)
            print(f"\rtokenizing: {done:,}/{len(records):,} records, {rate:,.0f}/s", end="", flush=True,
                  file=sys.stderr)

    for i, result in enumerate(map_in_workers(_tokenize_chunk, chunks, num_workers, _init_worker, initargs)):
        add(result, min((i + 1) * CHUNK_ITEMS, len(records)))
    if not quiet and len(chunks) > 1:
        print(file=sys.stderr)
    return items, counts


# ---------------------------------------------------------------------------
# The files: ragged token lists as flat arrays plus lengths


def _pack(items: list[dict], fields: Sequence[str]) -> dict[str, np.ndarray]:
    arrays = {}
    for field in fields:
        values = [item[field] for item in items]
        arrays[f"{field}.lengths"] = np.array([len(v) for v in values], dtype=np.int64)
        dtype = np.uint8 if field == "mask" else np.int32
        arrays[field] = np.fromiter(itertools.chain.from_iterable(values), dtype=dtype,
                                    count=int(arrays[f"{field}.lengths"].sum()))
    return arrays


def _unpack(arrays: dict[str, np.ndarray], fields: Sequence[str]) -> list[dict]:
    columns = {field: np.split(arrays[field], np.cumsum(arrays[f"{field}.lengths"])[:-1]) for field in fields}
    count = len(arrays[f"{fields[0]}.lengths"])
    if count == 0:
        return []
    return [{field: columns[field][i] for field in fields} for i in range(count)]


def _read(directory: str, fields: Sequence[str]) -> tuple[list[dict], dict] | None:
    """The cached items and counts, or None when absent or unreadable (then rebuilt)."""
    from safetensors.numpy import load_file

    if not os.path.isfile(os.path.join(directory, "meta.json")):
        return None
    try:
        stats = read_json(os.path.join(directory, "meta.json"))["stats"]
        if not isinstance(stats.get("data_sha256"), str):
            raise ValueError("meta.json: stats has no data_sha256")
        arrays = load_file(os.path.join(directory, "tokens.safetensors"))
        for field in fields:
            if arrays[f"{field}.lengths"].sum() != len(arrays[field]):
                raise ValueError(f"{field}: lengths do not add up")
        return _unpack(arrays, fields), stats
    except Exception as e:  # a torn or foreign file: the data is simply tokenized again
        print(f"warning: {directory} is damaged ({e}); tokenizing again", file=sys.stderr)
        shutil.rmtree(directory, ignore_errors=True)
        return None


def _write(directory: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write into a temporary directory and rename it: a cache directory is complete or absent."""
    from safetensors.numpy import save_file

    cache_dir = os.path.dirname(os.path.abspath(directory))
    sweep_leftovers(cache_dir, locked=False)  # what a killed run left
    os.makedirs(cache_dir, exist_ok=True)
    record(cache_dir, os.path.basename(directory))  # the record also keeps the cache from being read as data
    try:
        with atomic_directory(directory) as tmp:
            save_file(arrays, os.path.join(tmp, "tokens.safetensors"))
            usual_permissions(os.path.join(tmp, "tokens.safetensors"))
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=2, ensure_ascii=False)
    except FileExistsError:
        if not os.path.isfile(os.path.join(directory, "meta.json")):
            raise DataError(f"cannot write the cache directory {directory}") from None
        # another process wrote the same data meanwhile
