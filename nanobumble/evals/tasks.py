"""Benchmark task files: multiple choice (C-Eval, CMMLU, MMLU), sentence
continuation (HellaSwag), bits per byte, and exact match of answers; how they
are read, and the prompts built from them (scoring.py runs the model on them).

    python -m nanobumble.evaluate --model_path checkpoints/sft/tiny_instruct \
        --tasks datasets/eval/ceval/val datasets/eval/mmlu/test --num_fewshot 5
    python -m nanobumble.evaluate --model_path checkpoints/pretrain/tiny_base \
        --tasks datasets/eval/text_bpb.jsonl --output /tmp/results.json

--tasks takes files, or directories: every .csv / .jsonl directly inside but
the dev splits (*_dev.*). A task is named by its file's stem. The type comes
from the file:

  .csv    multiple choice. C-Eval (header id,question,A,B,C,D,answer[,explanation]),
          CMMLU (header ,Question,A,B,C,D,Answer) and MMLU (no header:
          question,A,B,C,D,answer): a first row naming question, A-D and answer
          (any case) is a header, otherwise the columns are MMLU's.
  .jsonl  (JSON Lines, also as .json) the first record's keys decide:
          question + A, B, C, D (or + a "choices" list of 4)   multiple choice
          ctx + endings (or query + choices), label (or gold)   continuation
          prompt + answer (a string, or a list of accepted ones) exact match
          text                                                 bits per byte

Multiple choice, as lm-evaluation-harness's MMLU: the prompt is

    The following are multiple choice questions (with answers) about {subject}.

    {question}
    A. {A}
    B. {B}
    C. {C}
    D. {D}
    Answer:

followed by each continuation " A" / " B" / " C" / " D". {subject} is the file
stem without a _test, _val, _validation or _dev suffix, underscores as spaces.

Continuation (HellaSwag): the context, followed by " " + each ending. The text is
used as it is: lm-evaluation-harness's own HellaSwag task first cleans the
WikiHow markup and prefixes the activity label (its "query" and "choices").

Exact match: the prompt as it is (in chat mode, the user's turn).

Few-shot (--num_fewshot K): the first K records of the task's dev split, each
with its answer, before the question: separated by blank lines, or in chat mode
(exact match) as K earlier user and assistant turns. An exact-match example is
"{prompt} {first answer}". Bits per byte scores its texts as they are, 0-shot
whatever K (the results say so per task). The dev split of
DIR/SUBJECT[_SPLIT].EXT (SPLIT one of test, val, validation) is the first of
these that exists (none is an error, not a silent 0-shot):
    DIR/SUBJECT_dev.EXT          a sibling file
    DIR/../dev/SUBJECT_dev.EXT   C-Eval and MMLU (dev/ beside val/ or test/)
    DIR/../dev/SUBJECT.EXT       CMMLU

A task with nothing to score (no records; bits per byte whose texts are all
empty) is refused, naming its file.

--limit N keeps the first N items of each task (questions, documents or
prompts), and 0 < N < 1 that fraction of each task rounded up, as
lm-evaluation-harness's --limit; the results say so (n-samples: original and
effective), as such numbers are not the benchmark's.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from nanobumble.base.errors import DataError, UserError

MULTIPLE_CHOICE, CONTINUATION, BPB, EXACT_MATCH = "multiple_choice", "continuation", "bpb", "exact_match"
LETTERS = ("A", "B", "C", "D")
CSV_COLUMNS = ("question", "a", "b", "c", "d", "answer")
SPLIT_SUFFIXES = ("_test", "_val", "_validation", "_dev")
DESCRIPTION = "The following are multiple choice questions (with answers) about {}.\n\n"
SHOT_SEPARATOR = "\n\n"


# --- task files -----------------------------------------------------------------------------------

@dataclass
class Question:
    """One item with choices: a lettered question (context = its text, options = the
    four answers) or a continuation (context = the start, options = the endings)."""
    context: str
    options: list[str]
    gold: int
    where: str  # file:line


@dataclass
class Task:
    name: str  # the file stem
    path: str
    kind: str  # MULTIPLE_CHOICE | CONTINUATION | BPB | EXACT_MATCH
    records: list  # Question (the two choice kinds), str (bpb), (prompt, [answers]) (exact match)
    total: int = 0  # the file's records when --limit kept fewer (0: all of them are here)


def read_text(path: str) -> str:
    """The file as text; bytes that are not UTF-8 are named by file:line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from None
    return text


def answer_index(value: object, count: int, where: str) -> int:
    """A letter (A, b, ...) or a 0-based index (3, "3") -> the index of the right option."""
    if isinstance(value, str) and value.strip().upper() in LETTERS[:count]:
        return LETTERS.index(value.strip().upper())
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count:
        return value
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: no answer (C-Eval's test split hides its answers: evaluate val)")
    raise DataError(f"{where}: answer {value!r} is not one of {', '.join(LETTERS[:count])} (or 0-{count - 1})")


def read_csv(path: str) -> list[Question]:
    """C-Eval, CMMLU or MMLU multiple-choice rows (see the module docstring)."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    columns, width, questions = None, 0, []
    next_line = 1
    try:
        for row in reader:
            where, next_line = f"{path}:{next_line}", reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if columns is None:
                names = [cell.strip().lower() for cell in row]
                width = len(row)
                if set(CSV_COLUMNS) <= set(names):  # a header: C-Eval, CMMLU
                    columns = [names.index(name) for name in CSV_COLUMNS]
                    continue
                if width != len(CSV_COLUMNS):
                    raise DataError(f"{where}: expected a header naming question, A, B, C, D, answer (C-Eval, "
                                    f"CMMLU) or the 6 columns question,A,B,C,D,answer (MMLU); got {width} columns")
                columns = list(range(len(CSV_COLUMNS)))  # MMLU: no header
            if len(row) != width:
                raise DataError(f"{where}: {len(row)} columns, expected {width}")
            question, *options, answer = (row[i] for i in columns)
            questions.append(Question(question, options, answer_index(answer, 4, where), where))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV: {e}") from None
    return questions


def jsonl_kind(record: dict) -> str | None:
    if "question" in record and ("choices" in record or all(letter in record for letter in LETTERS)):
        return MULTIPLE_CHOICE
    if ("ctx" in record or "query" in record) and ("endings" in record or "choices" in record):
        return CONTINUATION
    if "prompt" in record and "answer" in record:
        return EXACT_MATCH
    if "text" in record:
        return BPB
    return None


def text_field(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a numeric option of a multiple-choice question
    if not isinstance(value, str):
        raise DataError(f"{where}: \"{key}\" must be a string, got {type(value).__name__}")
    return value


def text_list(record: dict, key: str, where: str, count: int | None = None) -> list[str]:
    value = record.get(key)
    if not isinstance(value, list) or not value or (count is not None and len(value) != count):
        size = f"{count} " if count else "non-empty "
        raise DataError(f"{where}: \"{key}\" must be a {size}list of strings")
    return [text_field({key: item}, key, where) for item in value]


def parse_record(kind: str, record: dict, where: str):
    if kind == MULTIPLE_CHOICE:
        if "choices" in record:
            options = text_list(record, "choices", where, 4)
        else:
            options = [text_field(record, letter, where) for letter in LETTERS]
        return Question(text_field(record, "question", where), options, answer_index(record.get("answer"), 4, where),
                        where)
    if kind == CONTINUATION:
        context = text_field(record, "query" if "query" in record else "ctx", where)
        endings = text_list(record, "choices" if "choices" in record else "endings", where)
        gold_key = "gold" if "gold" in record else "label"
        if gold_key not in record:
            raise DataError(f"{where}: no \"label\" (or \"gold\"): the index of the right ending")
        return Question(context, endings, answer_index(record[gold_key], len(endings), where), where)
    if kind == EXACT_MATCH:
        answers = record.get("answer")
        answers = text_list(record, "answer", where) if isinstance(answers, list) else \
            [text_field(record, "answer", where)]
        return text_field(record, "prompt", where), answers
    return text_field(record, "text", where)


def read_jsonl(path: str) -> tuple[str, list]:
    kind, records = None, []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line separators
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg}); expected one JSON object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if kind is None:
            kind = jsonl_kind(record)
            if kind is None:
                raise DataError(f"{where}: cannot tell the task from the keys {sorted(record)}: expected question + "
                                f"A, B, C, D (multiple choice), ctx + endings (continuation), prompt + answer "
                                f"(exact match) or text (bits per byte)")
        records.append(parse_record(kind, record, where))
    if kind is None:
        raise DataError(f"{path}: no records")
    return kind, records


def read_task(path: str) -> Task:
    name, extension = os.path.splitext(os.path.basename(path))
    if not os.path.isfile(path):
        raise UserError(f"task file {path}: no such file")
    if extension == ".csv":
        kind, records = MULTIPLE_CHOICE, read_csv(path)
        if not records:
            raise DataError(f"{path}: no questions")
    elif extension in (".jsonl", ".json"):
        kind, records = read_jsonl(path)
        if kind == BPB and not any(records):  # no bytes: bits per byte would print a meaningless 0
            raise DataError(f"{path}: every text is empty: no bytes to score bits per byte on")
    else:
        raise UserError(f"task file {path}: expected a .csv or .jsonl file")
    return Task(name, path, kind, records)


def expand_task_paths(paths: str | Sequence[str]) -> list[str]:
    """Files as given, directories as their .csv / .jsonl files (sorted) but the dev
    splits, which are few-shot examples; a string may list several, separated by commas."""
    if isinstance(paths, str):
        paths = [p.strip() for p in paths.split(",") if p.strip()]
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, name) for name in os.listdir(path)
                           if name.endswith((".csv", ".jsonl")) and os.path.isfile(os.path.join(path, name))
                           and not os.path.splitext(name)[0].endswith("_dev"))
            if not found:
                raise UserError(f"task directory {path}: no .csv or .jsonl files in it")
            files += found
        else:
            files.append(path)
    if not files:
        raise UserError("no task files given")
    return files


def split_subject(path: str) -> str:
    """The file stem without its split suffix: computer_network_val -> computer_network."""
    stem = os.path.splitext(os.path.basename(path))[0]
    for suffix in SPLIT_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[:-len(suffix)]
    return stem


def dev_candidates(path: str) -> list[str]:
    """Where the dev split of a task file may be, in the order looked at (module docstring)."""
    directory, extension = os.path.dirname(os.path.abspath(path)), os.path.splitext(path)[1]
    subject = split_subject(path)
    dev_dir = os.path.join(os.path.dirname(directory), "dev")
    candidates = [os.path.join(directory, f"{subject}_dev{extension}"),
                  os.path.join(dev_dir, f"{subject}_dev{extension}"),
                  os.path.join(dev_dir, f"{subject}{extension}")]
    return [c for c in candidates if c != os.path.abspath(path)]


def fewshot_examples(task: Task, num_fewshot: int) -> list:
    """The first num_fewshot records of the task's dev split (none for bits per byte)."""
    if num_fewshot <= 0 or task.kind == BPB:
        return []
    candidates = dev_candidates(task.path)
    dev_path = next((c for c in candidates if os.path.isfile(c)), None)
    if dev_path is None:
        raise UserError(f"{task.path}: num_fewshot={num_fewshot} needs its dev split; looked for "
                        f"{', '.join(candidates)}")
    dev = read_task(dev_path)
    if dev.kind != task.kind:
        raise DataError(f"{dev_path}: a {dev.kind} file, but its task {task.path} is {task.kind}")
    if len(dev.records) < num_fewshot:
        raise DataError(f"{dev_path}: {len(dev.records)} examples, fewer than num_fewshot={num_fewshot}")
    return dev.records[:num_fewshot]


def limit_count(limit: float, total: int) -> int:
    """How many items --limit keeps, as lm-evaluation-harness counts them: 0 < limit < 1
    is a fraction of the task (rounded up), a whole number >= 1 a count; 0 keeps all."""
    if limit <= 0:
        return total
    return min(total, math.ceil(total * limit) if limit < 1 else int(limit))


def apply_limit(tasks: list[tuple[Task, list]], limit: float) -> list[tuple[Task, list]]:
    """The first limit_count() records of each task (its few-shot examples stay as they are)."""
    limited = []
    for task, shots in tasks:
        count = limit_count(limit, len(task.records))
        if count < len(task.records):
            task = replace(task, records=task.records[:count], total=len(task.records))
        limited.append((task, shots))
    return limited


def load_tasks(paths: str | Sequence[str], num_fewshot: int = 0) -> list[tuple[Task, list]]:
    """Every task file read and checked (with its few-shot examples), before any model work."""
    if num_fewshot < 0:
        raise UserError(f"num_fewshot must be >= 0, got {num_fewshot}")
    tasks = [read_task(path) for path in expand_task_paths(paths)]
    names = [task.name for task in tasks]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(f"two task files named {', '.join(twice)}: tasks are named by file stem")
    return [(task, fewshot_examples(task, num_fewshot)) for task in tasks]


# --- prompts --------------------------------------------------------------------------------------

def question_text(question: Question, kind: str) -> str:
    """What the model sees before an option: a lettered question ending in "Answer:", or the context."""
    if kind == CONTINUATION:
        return question.context
    lines = [question.context.strip()] + [f"{letter}. {option}" for letter, option in zip(LETTERS, question.options)]
    return "\n".join(lines) + "\nAnswer:"


def choice_texts(question: Question, kind: str) -> list[str]:
    """The continuations scored (each follows the context after one space)."""
    return list(LETTERS) if kind == MULTIPLE_CHOICE else question.options


def build_context(task: Task, question: Question, shots: list[Question]) -> str:
    """Description (multiple choice), solved dev examples, then the question."""
    parts = [question_text(shot, task.kind) + " " + choice_texts(shot, task.kind)[shot.gold] for shot in shots]
    parts.append(question_text(question, task.kind))
    prefix = DESCRIPTION.format(split_subject(task.path).replace("_", " ")) if task.kind == MULTIPLE_CHOICE else ""
    return prefix + SHOT_SEPARATOR.join(parts)


def exact_match_prompt(prompt: str, shots: list[tuple[str, list[str]]]) -> str:
    """Completion mode: the solved examples, then the prompt."""
    return SHOT_SEPARATOR.join([f"{shot} {answers[0]}" for shot, answers in shots] + [prompt])


def exact_match_messages(prompt: str, shots: list[tuple[str, list[str]]]) -> list[dict]:
    """Chat mode: each solved example a user turn and the assistant's answer, then the prompt."""
    turns = [[{"role": "user", "content": shot}, {"role": "assistant", "content": answers[0]}]
             for shot, answers in shots]
    return [message for turn in turns for message in turn] + [{"role": "user", "content": prompt}]
