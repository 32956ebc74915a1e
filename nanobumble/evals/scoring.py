"""Score a model on the tasks of tasks.py (whose docstring describes the files
and the prompts): python -m nanobumble.evaluate, and training's eval steps.

Multiple choice, scored as lm-evaluation-harness scores MMLU: the answer is the
letter whose continuation " A" / " B" / " C" / " D" after the prompt has the
highest log-likelihood (acc).

Continuation (HellaSwag): the log-likelihood of " " + each ending after the
context. acc takes the highest; acc_norm the highest log-likelihood divided by
the ending's length in characters, exactly lm-evaluation-harness's acc_norm
(its acc_bytes divides by UTF-8 bytes; the two agree on ASCII text).

Multiple choice, continuation and bits per byte read the raw text (as
lm-evaluation-harness does by default); only exact match uses the chat template.
Log-likelihoods: a continuation's tokens are those of encode(context +
continuation) after the tokens of encode(context), as lm-evaluation-harness
splits them (a space ending the context moves to the continuation); a sequence
longer than the model's context loses tokens from the left.

Bits per byte, as val/bpb in pretraining: every document is
<|endoftext|> + text + <|endoftext|> (as in the token shards, where the
previous document's <|endoftext|> comes before it), cut into windows of the
model's context; bpb = the nats of the predicted tokens that stand for text,
divided by ln 2 and by the UTF-8 bytes of those tokens.

Exact match: greedy decoding (plain argmax, no repetition penalty) of at most
--max_new_tokens tokens, stopping at <|im_end|> or <|endoftext|>. In chat mode
the prompt is the user's turn of the chat template (the model answers as the
assistant); in completion mode the raw prompt, and the answer is the first line
of the output (after leading whitespace). Few-shot examples come first, as
tasks.py lays them out. --mode auto follows chat.py: chat when the adapter's or the model's
training_args.yaml says stage sft or dpo. Answer and output are compared after
NFKC normalisation, casefolding, and collapsing every run of whitespace to one
space (and stripping it at the ends).

Batches are right-padded for scoring (causal attention never lets a real token
see the padding that follows it; padded positions are not scored) and
left-padded with an attention mask for generation. Prints a table of every task
(n = questions, documents or prompts) and the overall accuracy over all
multiple-choice and continuation questions; writes the same, with each
question's log-likelihoods or output, as JSON to --output (default:
eval_results.json in the adapter's directory, else the model's).

Standard errors, as lm-evaluation-harness computes them for a mean: the sample
standard deviation of the per-item values (n - 1 in the denominator) divided by
sqrt(n); "N/A" for a single item, and for bits per byte, a ratio of sums rather
than a mean of items (lm-evaluation-harness writes "N/A" for its bits_per_byte too).

In training, evaluate_tasks() gives the same numbers as "eval/<task>/<metric>".
"""

from __future__ import annotations

import math
import sys
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from nanobumble.base.errors import DataError, UserError
from nanobumble.base.precision import autocast
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT, check_template, render
from nanobumble.evals.tasks import (
    BPB,
    CONTINUATION,
    EXACT_MATCH,
    MULTIPLE_CHOICE,
    Question,
    Task,
    build_context,
    choice_texts,
    exact_match_messages,
    exact_match_prompt,
)
from nanobumble.inference.generation import Decoder, GenerationConfig, Sequence, fit_to_context
from nanobumble.model.attention import bucket_width
from nanobumble.model.layers import IGNORE_INDEX

# --- scoring rows and answers ---------------------------------------------------------------------

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-evaluation-harness splits them: a space that
    ends the context moves to the continuation, and the continuation is what
    encode(context + continuation) has after encode(context)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)  # lm-eval's prefix token for an empty context
    context_ids = tokenizer.encode(context)
    return context_ids, tokenizer.encode(context + continuation)[len(context_ids):]


def scoring_row(context_ids: list[int], continuation_ids: list[int], max_len: int, where: str
                ) -> tuple[list[int], list[int]]:
    """(inputs, targets): the model reads context + continuation but the last token,
    and only the continuation's tokens are targets. Cut from the left to max_len."""
    if not 0 < len(continuation_ids) <= max_len:
        raise DataError(f"{where}: a continuation of {len(continuation_ids)} tokens cannot be scored in the "
                        f"model's context of {max_len}")
    sequence = (context_ids + continuation_ids)[-(max_len + 1):]
    targets = [IGNORE_INDEX] * (len(sequence) - 1 - len(continuation_ids)) + continuation_ids
    return sequence[:-1], targets


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def mean_stderr(values: list[float]) -> float | str:
    """lm-evaluation-harness's standard error of a mean (its metrics.mean_stderr):
    the sample standard deviation over sqrt(n); "N/A" (as it writes) for one item."""
    if len(values) < 2:
        return "N/A"
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (len(values) - 1)) / math.sqrt(len(values))


def normalize_answer(text: str) -> str:
    """NFKC (full-width letters and digits become ASCII), casefold, whitespace runs -> one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


# --- the model ------------------------------------------------------------------------------------

@torch.no_grad()
def target_logprobs(model, rows: list[tuple[list[int], list[int]]], device: torch.device, dtype: torch.dtype,
                    batch_size: int, progress: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """The log-probability of every target of each (inputs, targets) row (0 where the
    target is IGNORE_INDEX), float64 on the CPU. Rows go in batches, longest first: a fixed
    order, so every rank of a sharded model runs the same forwards. Batches are
    right-padded without an attention mask: a causal model never lets a real token
    see padding that comes after it, and padded positions have no target. A compiled
    model (Transformer.compiled) gets batch_size rows every batch, padded to
    attention.bucket_width: a few shapes, so its blocks do not compile again per batch."""
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), i))
    logprobs: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    compiled = getattr(model, "compiled", False)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width, height = len(rows[batch[0]][0]), len(batch)
        if compiled:
            width, height = bucket_width(width, model.config.max_position_embeddings), batch_size
        inputs = torch.zeros(height, width, dtype=torch.long)
        targets = torch.full((height, width), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(batch):
            ids, wanted = rows[i]
            inputs[row, :len(ids)] = torch.tensor(ids)
            targets[row, :len(wanted)] = torch.tensor(wanted)
        with autocast(device, dtype):
            # The model's fused loss: per-token losses without the [tokens x vocab] logits.
            losses, _ = model(inputs.to(device), targets.to(device), reduction="none")
        losses = losses.double().cpu()
        for row, i in enumerate(batch):
            logprobs[i] = -losses[row, :len(rows[i][0])]
        if progress:
            progress(len(batch))
    return logprobs


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """flag, but True only when it is True on every rank (so all stop together)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, device: torch.device, dtype: torch.dtype,
                    batch_size: int, vocab_size: int, finished: Callable[[list[int]], bool],
                    progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy continuations of each prompt, in batches (longest prompts first), on the
    batched KV-cache Decoder (inference/generation.py): a batch's prompts go through the
    model once, right-padded, then each step is one forward of one new token per row at
    that row's own position. Every row of a batch takes the same steps, at most
    max_new_tokens and the context left after the batch's longest prompt; a batch stops
    when every row is finished(new_ids) on every rank (so all ranks run the same forwards)."""
    context_len = model.config.max_position_embeddings
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    outputs: list[list[int]] = [[] for _ in prompts]
    decoder = None
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        steps = min(max_new_tokens, context_len - len(prompts[batch[0]]))
        if steps > 0:
            if decoder is None:  # one cache for every batch, as long as the longest prompt needs
                room = min(context_len, len(prompts[order[0]]) + max_new_tokens)
                decoder = Decoder(model, batch_size, room, dtype=dtype)
            cfg = GenerationConfig(max_new_tokens=steps, do_sample=False, repetition_penalty=1.0)
            seqs = [Sequence(prompts[i], cfg, (), vocab_size, device=device) for i in batch]
            decoder.add(seqs)
            while not all_ranks_agree(all(finished(seq.tokens) for seq in seqs), device) and decoder.active:
                decoder.step()
            for row, i in enumerate(batch):
                decoder.remove(seqs[row])  # finished early: its row frees for the next batch
                outputs[i] = seqs[row].tokens
        if progress:
            progress(len(batch))
    return outputs


# --- tasks ----------------------------------------------------------------------------------------

class ProgressLine:
    """One line on stderr, rewritten as batches finish (a terminal), or one line a task."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()

    def start(self, label: str, total: int) -> Callable[[int], None]:
        self.label, self.total, self.done, self.started = label, total, 0, time.time()
        return self.advance

    def advance(self, count: int) -> None:
        self.done += count
        if self.tty:
            print(f"\r{self.label}: {self.done}/{self.total}", end="", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.enabled:
            print(f"{chr(13) if self.tty else ''}{self.label}: {self.done}/{self.total} in "
                  f"{time.time() - self.started:.1f}s", file=sys.stderr, flush=True)


@dataclass
class TaskResult:
    name: str
    path: str
    kind: str
    n: int
    metrics: dict[str, float]
    details: list[dict] = field(default_factory=list)  # per question / prompt, with its value of each metric
    num_fewshot: int = 0  # the solved examples before each question (bits per byte: none)
    total: int = 0  # the task file's items when --limit scored only n of them (0: n is all)

    @property
    def stderrs(self) -> dict[str, float | str]:
        """Each metric's standard error, from the per-item values in details ("N/A": none)."""
        return {metric: mean_stderr([d[metric] for d in self.details]) if self.details else "N/A"
                for metric in self.metrics}


def choice_task(model, tokenizer, task: Task, shots: list[Question], device, dtype, batch_size,
                line: ProgressLine) -> TaskResult:
    max_len = model.config.max_position_embeddings
    rows, spans = [], []  # spans[q]: the rows of question q's options
    for question in task.records:
        context = build_context(task, question, shots)
        first = len(rows)
        for option in choice_texts(question, task.kind):
            rows.append(scoring_row(*encode_pair(tokenizer, context, " " + option), max_len, question.where))
        spans.append(range(first, len(rows)))
    logprobs = target_logprobs(model, rows, device, dtype, batch_size, line.start(f"{task.name}: choices", len(rows)))
    details = []
    for doc_id, (question, span) in enumerate(zip(task.records, spans)):
        loglikelihoods = np.array([logprobs[r].sum().item() for r in span])
        lengths = np.array([len(text) for text in choice_texts(question, task.kind)], dtype=np.float64)
        predicted = int(np.argmax(loglikelihoods))  # the first of equal maxima
        predicted_norm = int(np.argmax(loglikelihoods / np.maximum(lengths, 1)))
        detail = {"doc_id": doc_id, "where": question.where, "gold": question.gold, "predicted": predicted,
                  "loglikelihoods": loglikelihoods.tolist(), "acc": float(predicted == question.gold)}
        if task.kind == CONTINUATION:
            detail["acc_norm"] = float(predicted_norm == question.gold)
        details.append(detail)
    # means of the per-item 1.0 / 0.0, summed in order as lm-evaluation-harness does
    metrics = {metric: mean([d[metric] for d in details]) for metric in ("acc", "acc_norm") if metric in details[0]}
    return TaskResult(task.name, task.path, task.kind, len(task.records), metrics, details)


def bpb_task(model, tokenizer, task: Task, device, dtype, batch_size, line: ProgressLine) -> TaskResult:
    max_len = model.config.max_position_embeddings
    rows = []
    for text in task.records:
        sequence = [tokenizer.eot_id] + tokenizer.encode(text) + [tokenizer.eot_id]
        for start in range(0, len(sequence) - 1, max_len):  # non-overlapping windows, as val_batches
            window = sequence[start:start + max_len + 1]
            rows.append((window[:-1], window[1:]))
    logprobs = target_logprobs(model, rows, device, dtype, batch_size, line.start(f"{task.name}: windows", len(rows)))
    token_bytes = torch.from_numpy(tokenizer.token_byte_lengths()).double()
    nats = text_bytes = 0.0
    for (_, targets), logprob in zip(rows, logprobs):
        nbytes = token_bytes[torch.tensor(targets)]
        nats -= logprob[nbytes > 0].sum().item()  # special tokens stand for no text: no bytes, no bits
        text_bytes += nbytes.sum().item()
    if not text_bytes:  # (read_task refuses empty texts; a tokenizer could still make no bytes of them)
        raise DataError(f"{task.path}: no bytes of text to score bits per byte on")
    return TaskResult(task.name, task.path, task.kind, len(task.records), {"bpb": nats / math.log(2) / text_bytes})


def exact_match_task(model, tokenizer, task: Task, chat: bool, system_prompt: str, max_new_tokens: int, device,
                     dtype, batch_size, line: ProgressLine, shots: list | None = None) -> TaskResult:
    context_len = model.config.max_position_embeddings
    prompts = []
    for prompt, _ in task.records:
        if chat:
            ids, _ = render(exact_match_messages(prompt, shots or []), tokenizer, system_prompt=system_prompt,
                            add_generation_prompt=True, context_len=context_len)
        else:
            ids = tokenizer.encode(exact_match_prompt(prompt, shots or [])) or [tokenizer.eot_id]
        prompts.append(fit_to_context(ids, context_len, max_new_tokens)[0])
    stop_ids = (tokenizer.im_end_id, tokenizer.eot_id)

    def answer_text(ids: list[int]) -> tuple[str, bool]:
        """The answer in the new ids, and whether it is complete."""
        stop = next((k for k, token in enumerate(ids) if token in stop_ids), None)
        text = tokenizer.decode(ids[:stop])
        if not chat:  # a base model goes on past its answer: the answer is its first line
            text = text.lstrip()
            if "\n" in text:
                return text[:text.index("\n")], True
        return text, stop is not None

    outputs = greedy_generate(model, prompts, max_new_tokens, device, dtype, batch_size, tokenizer.vocab_size,
                              lambda ids: answer_text(ids)[1], line.start(f"{task.name}: prompts", len(prompts)))
    details = []
    for doc_id, ((prompt, answers), ids) in enumerate(zip(task.records, outputs)):
        output = answer_text(ids)[0]
        hit = normalize_answer(output) in {normalize_answer(answer) for answer in answers}
        details.append({"doc_id": doc_id, "prompt": prompt, "answers": answers, "output": output,
                        "exact_match": float(hit)})
    return TaskResult(task.name, task.path, task.kind, len(task.records),
                      {"exact_match": mean([d["exact_match"] for d in details])}, details)


def run_tasks(model, tokenizer, tasks: list[tuple[Task, list]], device: torch.device, dtype: torch.dtype,
              batch_size: int = 8, chat: bool = True, max_new_tokens: int = 32,
              system_prompt: str = DEFAULT_SYSTEM_PROMPT, progress: bool = False) -> list[TaskResult]:
    """Each task's result, with per-question details (see evaluate_tasks)."""
    if batch_size < 1 or max_new_tokens < 1:
        raise UserError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    if chat and any(task.kind == EXACT_MATCH for task, _ in tasks):
        check_template(tokenizer)  # a broken one fails before any task runs
    line = ProgressLine(progress)
    was_training = model.training
    model.eval()
    results = []
    try:
        for task, shots in tasks:
            if task.kind in (MULTIPLE_CHOICE, CONTINUATION):
                result = choice_task(model, tokenizer, task, shots, device, dtype, batch_size, line)
            elif task.kind == BPB:
                result = bpb_task(model, tokenizer, task, device, dtype, batch_size, line)
            else:
                result = exact_match_task(model, tokenizer, task, chat, system_prompt, max_new_tokens, device, dtype,
                                          batch_size, line, shots)
            result.num_fewshot, result.total = len(shots), task.total
            line.finish()
            results.append(result)
    finally:
        model.train(was_training)
    return results


def flat_metrics(results: list[TaskResult]) -> dict[str, float]:
    return {f"eval/{r.name}/{metric}": value for r in results for metric, value in r.metrics.items()}


def evaluate_tasks(model, tokenizer, tasks: list[tuple[Task, list]], device: torch.device,
                   dtype: torch.dtype, batch_size: int = 8, chat: bool = True, max_new_tokens: int = 32,
                   system_prompt: str = DEFAULT_SYSTEM_PROMPT, progress: bool = False) -> dict[str, float]:
    """{"eval/<task>/<metric>": value} for tasks from load_tasks(): acc (multiple choice),
    acc + acc_norm (continuation), bpb, exact_match.

    For a training script at eval_steps (the tasks loaded once, at the start):
    dtype is the autocast dtype. Every rank must call it (a sharded model's
    forwards are collectives); each rank then runs the same forwards on the same
    batches and gets the same numbers. chat: exact match prompts go through the
    chat template (False: the raw prompt). The model's train/eval mode is restored."""
    return flat_metrics(run_tasks(model, tokenizer, tasks, device, dtype, batch_size, chat, max_new_tokens,
                                  system_prompt, progress))


# --- command line ---------------------------------------------------------------------------------

def overall_accuracy(results: list[TaskResult]) -> dict | None:
    """acc over the questions of every multiple-choice and continuation task together,
    with its standard error over those questions."""
    scored = [r for r in results if "acc" in r.metrics]
    if not scored:
        return None
    values = [d["acc"] for r in scored for d in r.details]
    return {"n": len(values), "acc": mean(values), "acc_stderr": mean_stderr(values),
            "tasks": [r.name for r in scored]}


def value_cell(value: float, stderr: float | str | None) -> str:
    """0.3000 ± 0.1528 (a mean), 0.3000 ± N/A (one item), 2.1234 (bits per byte)."""
    if stderr is None:
        return f"{value:.4f}"
    return f"{value:.4f} ± {stderr:.4f}" if isinstance(stderr, float) else f"{value:.4f} ± {stderr}"


def format_table(results: list[TaskResult], limit: float = 0) -> str:
    """One row per task, each mean metric with its standard error; a limit is said above
    the table, and n reads "scored/in the file" for the tasks it cut."""
    metrics = [m for m in ("acc", "acc_norm", "bpb", "exact_match") if any(m in r.metrics for r in results)]
    rows = []
    for r in results:
        stderrs = r.stderrs
        rows.append([r.name, r.kind, f"{r.n}/{r.total}" if r.total else str(r.n)] +
                    [value_cell(r.metrics[m], None if m == BPB else stderrs[m]) if m in r.metrics else ""
                     for m in metrics])
    overall = overall_accuracy(results)
    if overall:
        rows.append(["overall", "all questions", str(overall["n"])] +
                    [value_cell(overall["acc"], overall["acc_stderr"]) if m == "acc" else "" for m in metrics])
    header = ["task", "type", "n"] + metrics
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             .rstrip() for row in [header] + rows]
    first = f"{int(limit)} items" if limit >= 1 else f"{limit:.0%} (rounded up)"
    title = [f"limit: {limit:g} (the first {first} of each task: not the full benchmark)"] if limit else []
    return "\n".join(title + lines[:1] + ["-" * len(lines[0])] + lines[1:])
