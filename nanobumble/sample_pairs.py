"""Preference pairs from the model's own answers: sample, check, pair.

    python -m nanobumble.sample_pairs --model_path checkpoints/sft/tiny_instruct \
        --dataset_path prompts.jsonl --output_path pairs.jsonl --num_samples 8 --temperature 1.0 \
        --checker exact
    torchrun --nproc_per_node=2 -m nanobumble.sample_pairs ...      # the prompts shared between processes

Each prompt comes with a reference answer, read from the SFT formats the project
reads (the prompt is every turn before the last assistant turn, the reference is
that turn) or from a plain prompt/answer file ({"prompt": str, "answer": str or a
list of accepted answers}: evaluate's exact-match layout). The prompt is rendered
as DPO renders it (its own system turn, else --system_prompt) and the model
samples --num_samples answers (inference/batching.py: many rows at once; sample j
of prompt i has its own seed, so the answers do not depend on the batch or on the
number of processes). Each answer is checked against the reference:

    exact       equal once leading and trailing whitespace is stripped (case counts)
    normalized  equal after evaluate's normalisation (NFKC, casefold, runs of whitespace as one space)
    contains    the normalised reference appears in the normalised answer
    regex       --pattern's first match in the answer equals its first match in the reference
                (group 1 if the pattern has a group; the whole reference if the pattern does not
                match it), both stripped; e.g. --pattern '#### (-?[0-9.,]+)' for GSM8K
    number      the last number in the answer equals the last number in the reference
                (thousands commas ignored; 42 equals 42.0)

An answer that did not end (it ran out of --max_new_tokens) never counts as correct.
Each prompt then gives up to --pairs_per_prompt pairs of distinct texts: chosen is
a correct sample (the reference when no sample is correct), rejected an incorrect
one (--rejected random: any; likely: the one the model finds most likely, its
log-probability scored as DPO will see it); the first pairs share no text while
there are enough. A prompt whose samples are all correct gives no pair. The
pairs are written in the ShareGPT layout train_dpo.py reads:

    {"conversations": [{"from": "human", "value": ...}, ...], "system"?: ...,
     "chosen": {"from": "gpt", "value": ...}, "rejected": {"from": "gpt", "value": ...},
     "sampled": {"from": "file:line", "correct": c, "samples": K, "chosen": "sample" | "reference"}}

"system" is written when the prompt has its own system turn, or when --system_prompt
is neither the default nor empty, so that DPO (at its default system prompt) trains
on the prompt that was sampled. A record cannot say "no system turn": pairs sampled
with --system_prompt "" are trained with train_dpo.py --system_prompt "" (the
program says so at the end). Printed at the end: pass@1 (the mean share of correct samples,
the unbiased estimate), pass@K (the share of prompts with a correct sample), and
how many prompts gave a pair.

Iterative rounds (sample -> pairs -> DPO with sft_weight -> merge -> sample again
from the merged model): README, "Preference pairs from the model's own answers".
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanobumble.base.cpu import apply_num_threads, cpu_line
from nanobumble.base.distributed import all_reduce_sum, barrier, cleanup_distributed, is_main
from nanobumble.base.errors import ConfigError, DataError, run_cli
from nanobumble.base.output_guard import publish_file
from nanobumble.base.precision import PRECISIONS, resolve_precision
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT, render
from nanobumble.data.records import read_records
from nanobumble.data.sft_data import _detect_sft_format, _language_modeling
from nanobumble.evals.scoring import normalize_answer, scoring_row, target_logprobs
from nanobumble.inference.batching import generate_batch
from nanobumble.inference.generation import GenerationConfig
from nanobumble.inference.loading import check_sampling_keys, load_model, resolve_device
from nanobumble.run.config import _check_choice, check_numbers, parse_config

CHECKERS = ("exact", "normalized", "contains", "regex", "number")


@dataclass
class SamplePairsConfig:
    model_path: str  # the model to sample from (a model directory, or a LoRA run's output directory)
    dataset_path: str  # prompts with reference answers: SFT records, or {"prompt", "answer"} lines
    output_path: str  # the preference pairs (JSON Lines) for train_dpo.py
    adapter_path: str = ""  # a LoRA adapter applied on top of model_path
    num_samples: int = 8  # answers sampled per prompt (K)
    temperature: float = 1.0  # 1 with top_k / top_p off: the model's own distribution
    top_k: int = 0  # <= 0: off
    top_p: float = 1.0  # 1: off
    max_new_tokens: int = 128  # longest sampled answer; one that runs out is incorrect
    checker: str = "exact"  # exact | normalized | contains | regex | number (the module docstring)
    pattern: str = ""  # the regex checker's pattern
    pairs_per_prompt: int = 1  # pairs written per prompt at most
    rejected: str = "random"  # random | likely: the incorrect samples the model finds most likely first
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # as train_dpo.py's: added when a prompt has no system turn
    seed: int = 0  # sample j of prompt i draws from its own generator, seeded from (seed, i, j)
    batch_size: int = 32  # rows decoded at once per process
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | bf16 | fp32
    num_threads: int = 0  # CPU threads; 0: the free physical cores at start (base/cpu.py)

    def __post_init__(self):
        check_numbers(self)
        _check_choice(self, "checker", CHECKERS)
        _check_choice(self, "rejected", ("random", "likely"))
        _check_choice(self, "precision", PRECISIONS)
        check_sampling_keys(self)
        if self.checker == "regex":
            if not self.pattern:
                raise ConfigError("key 'checker' regex needs key 'pattern' (e.g. --pattern '#### (-?[0-9.,]+)')")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ConfigError(f"key 'pattern' {self.pattern!r} is not a regular expression: {e}") from None
        elif self.pattern:
            raise ConfigError(f"key 'pattern' is for checker regex; checker {self.checker!r} would ignore it")


# --- prompts and references -------------------------------------------------------------------------

def _prompt_answer(record: dict, where: str) -> dict:
    """evaluate's exact-match layout: {"prompt": str, "answer": str or [accepted answers]}."""
    prompt, answer = record.get("prompt"), record.get("answer")
    if not isinstance(prompt, str) or not prompt:
        raise DataError(f'{where}: "prompt" must be a non-empty string')
    answers = answer if isinstance(answer, list) else [answer]
    if not answers or not all(isinstance(a, str) for a in answers):
        raise DataError(f'{where}: "answer" must be a string or a non-empty list of strings')
    return {"prompt": [{"role": "user", "content": prompt}], "references": answers, "where": where}


def _detect_prompt_format(record: object, where: str) -> Callable:
    if isinstance(record, dict) and "prompt" in record and "answer" in record:
        return _prompt_answer
    sft = _detect_sft_format(record, where)  # the SFT shapes; their own errors for anything else
    if sft is _language_modeling:
        raise DataError(f"{where}: a text record has no prompt and no reference answer; expected a "
                        f"conversation ending with the assistant's answer, or prompt and answer")

    def conversation(record: dict, where: str) -> dict:
        messages = sft(record, where)["messages"]
        if len(messages) < 2 or messages[-2]["role"] != "user":
            raise DataError(f"{where}: the reference answer (the last assistant turn) must follow a user turn")
        return {"prompt": messages[:-1], "references": [messages[-1]["content"]], "where": where}

    conversation.__name__ = sft.__name__  # the format's name in the summary line
    return conversation


def load_prompts(dataset_path: str) -> list[dict]:
    """Every prompt as {"prompt": messages ending with a user turn, "references": [str, ...], "where"}."""
    return read_records(dataset_path, _detect_prompt_format, False, not is_main(), "prompts", "sample_pairs")


# --- checkers ---------------------------------------------------------------------------------------

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> float | None:
    """The last number in text, thousands commas dropped ("1,234.5" -> 1234.5); None if there is none."""
    found = [m.group().replace(",", "") for m in NUMBER.finditer(text)]
    for value in reversed(found):
        try:
            return float(value.rstrip("."))
        except ValueError:
            continue
    return None


def regex_answer(pattern: re.Pattern, text: str) -> str | None:
    match = pattern.search(text)
    if match is None:
        return None
    return (match.group(1) if pattern.groups else match.group()).strip()


def make_checker(name: str, pattern: str = "") -> Callable[[str, list[str]], bool]:
    """checker(answer, references) -> whether the answer matches one of the references."""
    if name == "exact":
        return lambda answer, refs: answer.strip() in {r.strip() for r in refs}
    if name == "normalized":
        return lambda answer, refs: normalize_answer(answer) in {normalize_answer(r) for r in refs}
    if name == "contains":
        return lambda answer, refs: any(normalize_answer(r) in normalize_answer(answer) for r in refs)
    if name == "number":
        def number(answer: str, refs: list[str]) -> bool:
            got = last_number(answer)
            return got is not None and any(
                (want := last_number(r)) is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)
                for r in refs)
        return number
    if name == "regex":
        compiled = re.compile(pattern)

        def regex(answer: str, refs: list[str]) -> bool:
            got = regex_answer(compiled, answer)
            return got is not None and any(got == (regex_answer(compiled, r) or r.strip()) for r in refs)
        return regex
    raise ValueError(f"unknown checker {name!r}")


# --- pairs ------------------------------------------------------------------------------------------

def build_pairs(item: dict, samples: list[tuple[str, bool]], check, pairs_per_prompt: int,
                rng: random.Random, likelihood: Callable[[list[str]], list[float]] | None = None
                ) -> tuple[int, list[tuple[str, str, str]]]:
    """(number of correct samples, [(chosen, rejected, "sample" | "reference")]).
    samples: (text, ended) per sample; one that did not end is never correct. Pairs
    are distinct texts: the first ones share no text while there are enough (a diagonal
    walk over correct x incorrect); a rejected text equal to a chosen one is dropped.
    likelihood: scores of texts; given, the incorrect texts go most likely first."""
    right = [ended and check(text, item["references"]) for text, ended in samples]
    chosen = distinct([text for (text, _), ok in zip(samples, right) if ok], rng)
    source = "sample" if chosen else "reference"
    chosen = chosen or [item["references"][0]]
    rejected = [text for text in distinct([text for (text, _), ok in zip(samples, right) if not ok], rng)
                if text not in chosen]
    if likelihood is not None and len(rejected) > 1:
        scores = likelihood(rejected)
        rejected = [text for _, text in sorted(zip(scores, rejected), key=lambda pair: -pair[0])]
    nc, nr = len(chosen), len(rejected)
    pairs = [(chosen[k % nc], rejected[(k // nc + k % nc) % nr], source)
             for k in range(min(pairs_per_prompt, nc * nr))]
    return sum(right), pairs


def distinct(texts: list[str], rng: random.Random) -> list[str]:
    """Each distinct text once, in a seeded random order."""
    unique = list(dict.fromkeys(texts))
    rng.shuffle(unique)
    return unique


def pair_record(item: dict, chosen: str, rejected: str, source: str, correct: int, samples: int,
                system_prompt: str) -> dict:
    """One pair in the ShareGPT layout train_dpo.py reads (the module docstring)."""
    messages = item["prompt"]
    record: dict = {}
    if messages[0]["role"] == "system":
        record["system"], messages = messages[0]["content"], messages[1:]
    elif system_prompt and system_prompt != DEFAULT_SYSTEM_PROMPT:
        record["system"] = system_prompt  # "" cannot be written: DPO then needs --system_prompt "" too
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    record["conversations"] = [{"from": names[m["role"]], "value": m["content"]} for m in messages]
    record["chosen"] = {"from": "gpt", "value": chosen}
    record["rejected"] = {"from": "gpt", "value": rejected}
    record["sampled"] = {"from": item["where"], "correct": correct, "samples": samples, "chosen": source}
    return record


def is_pairs_file(path: str) -> bool:
    """Whether path holds pairs this program wrote (it may replace those): its first line has "sampled"."""
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline() or "null")
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(first, dict) and {"conversations", "chosen", "rejected", "sampled"} <= set(first)


# --- sampling ---------------------------------------------------------------------------------------

def sample_seed(seed: int, prompt_index: int, sample_index: int, num_samples: int) -> int:
    return (seed * 1_000_003 + prompt_index * num_samples + sample_index) % (2**63)


def sample_chunk(model, tokenizer, items: list[dict], first_index: int, cfg: SamplePairsConfig, dtype,
                 rank: int, world_size: int) -> list[list[tuple[str, bool]]]:
    """(text, ended) of every sample of items, on every rank: rank r decodes the samples
    s (prompt-major order) with s % world_size == r; the others' come by an all-reduce
    of token ids (no pickling)."""
    context_len = model.config.max_position_embeddings
    K, width = cfg.num_samples, cfg.max_new_tokens
    prompts, configs, slots = [], [], []
    for i, item in enumerate(items):
        ids, _ = render(item["prompt"], tokenizer, system_prompt=cfg.system_prompt, add_generation_prompt=True,
                        context_len=context_len)
        if len(ids) + width > context_len:  # no room for a whole answer: skipped, and counted
            item["too_long"] = True
            continue
        item["prompt_ids"] = ids
        for j in range(K):
            s = i * K + j
            if s % world_size != rank:
                continue
            prompts.append(ids)
            configs.append(GenerationConfig(max_new_tokens=width, temperature=cfg.temperature, top_k=cfg.top_k,
                                            top_p=cfg.top_p, repetition_penalty=1.0, do_sample=True,
                                            seed=sample_seed(cfg.seed, first_index + i, j, K)))
            slots.append(s)
    stop_ids = (tokenizer.im_end_id, tokenizer.eot_id)
    results = generate_batch(model, prompts, configs, stop_ids=stop_ids, vocab_size=tokenizer.vocab_size,
                             max_batch=cfg.batch_size, dtype=dtype) if prompts else []
    # table[s] = new ids then -1s; ended[s] = 1 when the sample stopped on its own
    device = next(model.parameters()).device
    table = torch.zeros(len(items) * K, width + 1, dtype=torch.int64, device=device)
    ended = torch.zeros(len(items) * K, dtype=torch.int64, device=device)
    for s, (new_ids, stats) in zip(slots, results):
        row = torch.full((width + 1,), -1, dtype=torch.int64)
        row[:len(new_ids)] = torch.tensor(new_ids, dtype=torch.int64)
        table[s] = row.to(device) + 1  # +1: the sum over ranks keeps a 0 for "not mine"
        ended[s] = int(stats["stop"] == "stop_id")
    if world_size > 1:
        table, ended = all_reduce_sum(table), all_reduce_sum(ended)
    table, ended = (table - 1).cpu(), ended.cpu()
    out = []
    for i in range(len(items)):
        rows = []
        for j in range(K):
            ids = [t for t in table[i * K + j].tolist() if t >= 0]
            rows.append((tokenizer.decode(ids), bool(ended[i * K + j])))
        out.append(rows)
    return out


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, SamplePairsConfig)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if cfg.num_threads or device.type == "cpu":
        apply_num_threads(cfg.num_threads)
    if world_size > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        run(cfg, device, rank, world_size)
    finally:
        cleanup_distributed()


def run(cfg: SamplePairsConfig, device: torch.device, rank: int, world_size: int) -> None:
    dtype = resolve_precision(cfg.precision, device)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if rank == 0 else (lambda *a: None)
    items = load_prompts(cfg.dataset_path)  # a bad file fails before the model loads
    model, tokenizer, model_path, adapter_path = load_model(cfg.model_path, cfg.adapter_path, device, dtype)
    inputs = {"--dataset_path": cfg.dataset_path, "--model_path": model_path}
    if adapter_path:
        inputs["--adapter_path"] = adapter_path
    check = make_checker(cfg.checker, cfg.pattern)
    if device.type == "cpu":
        log(cpu_line())
    log(f"model: {model_path}{f' + adapter {adapter_path}' if adapter_path else ''} on {device} "
        f"{str(dtype).removeprefix('torch.')}, {world_size} process{'es' if world_size > 1 else ''}; "
        f"{len(items)} prompts x {cfg.num_samples} samples, temperature {cfg.temperature}, checker {cfg.checker}")
    chunk = max(1, 4 * cfg.batch_size * world_size // cfg.num_samples)  # prompts per all-reduce
    totals = {"too_long": 0, "prompts": 0, "pass1": 0.0, "passk": 0, "paired": 0, "pairs": 0, "from_reference": 0}
    started = time.time()
    last_log = [0.0]  # seconds after start of the last progress line

    def likelihood(item: dict) -> Callable[[list[str]], list[float]]:
        """Log-probability of each answer text as DPO will see it (its tokens, then <|im_end|>)."""
        def score(texts: list[str]) -> list[float]:
            rows = [scoring_row(item["prompt_ids"], tokenizer.encode(text) + [tokenizer.im_end_id],
                                model.config.max_position_embeddings, item["where"]) for text in texts]
            return [float(lp.sum()) for lp in target_logprobs(model, rows, device, dtype, cfg.batch_size)]
        return score

    def sample_all(write: Callable[[dict], None]) -> None:
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            samples = sample_chunk(model, tokenizer, part, start, cfg, dtype, rank, world_size)
            for offset, (item, rows) in enumerate(zip(part, samples)):
                if item.get("too_long"):
                    totals["too_long"] += 1
                    continue
                rng = random.Random(sample_seed(cfg.seed, start + offset, cfg.num_samples, cfg.num_samples))
                likely = likelihood(item) if cfg.rejected == "likely" and rank == 0 else None
                correct, pairs = build_pairs(item, rows, check, cfg.pairs_per_prompt, rng, likely)
                totals["prompts"] += 1
                totals["pass1"] += correct / cfg.num_samples
                totals["passk"] += correct > 0
                totals["paired"] += bool(pairs)
                totals["pairs"] += len(pairs)
                totals["from_reference"] += sum(source == "reference" for _, _, source in pairs)
                for chosen, rejected, source in pairs:
                    write(pair_record(item, chosen, rejected, source, correct, cfg.num_samples, cfg.system_prompt))
            done = totals["prompts"] + totals["too_long"]
            elapsed = time.time() - started
            if elapsed - last_log[0] >= 10 or done == len(items):  # a line every 10 s at most
                last_log[0] = elapsed
                log(f"  {done}/{len(items)} prompts, pass@1 {totals['pass1'] / max(totals['prompts'], 1):.3f}, "
                    f"{elapsed:.0f} s, ETA {elapsed / done * (len(items) - done):.0f} s")

        if not totals["prompts"]:  # nothing is published
            raise DataError(f"{cfg.dataset_path}: no prompt leaves room for --max_new_tokens {cfg.max_new_tokens} in "
                            f"the model's context of {model.config.max_position_embeddings} tokens")

    if rank == 0:
        with publish_file(cfg.output_path, inputs, "--output_path", is_pairs_file) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                sample_all(lambda record: f.write(json.dumps(record, ensure_ascii=False) + "\n"))
    else:
        sample_all(lambda record: None)
    barrier()
    n = totals["prompts"]
    if totals["too_long"]:
        log(f"{totals['too_long']} prompts skipped: with --max_new_tokens {cfg.max_new_tokens} they do not fit the "
            f"model's context of {model.config.max_position_embeddings} tokens")
    log(f"pass@1 {totals['pass1'] / n:.4f}, pass@{cfg.num_samples} {totals['passk'] / n:.4f}; "
        f"{totals['paired']} of {n} prompts gave a pair ({totals['pairs']} pairs, "
        f"{totals['from_reference']} with the reference as chosen); {time.time() - started:.0f} s")
    log(f"pairs: {cfg.output_path}")
    if not cfg.system_prompt:
        log('sampled without a system turn: train on these pairs with train_dpo.py --system_prompt ""')


if __name__ == "__main__":
    run_cli(main)
