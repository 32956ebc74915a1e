"""Property-based tests (hypothesis) of the doors in and out (issue 23, item 6).

Four kinds of input, generated with NaN, inf, 0, negative and huge numbers,
non-UTF-8 bytes, lone surrogates, deep nesting, aliases and dtype / shape lies:

    config values     parse_config of every program's config class: the command line and a --yaml_config file
    records           the pretraining, SFT and DPO readers, strict or not
    safetensors       a model directory (load_model_dir) and a checkpoint (checkpoint_problem, then
                      load_checkpoint) whose headers, config.json or JSON / YAML files lie
    server requests   /v1/chat/completions and /v1/completions of nanobumble.serve, in this process

and whole training runs (pretrain, SFT, DPO, in this process) on generated
settings and records. For every case the outcome is success, or exit code 2
with one line (a bounded one-line error of the reader's class; a 4xx in
OpenAI's error shape for the server): never a traceback, never another
exception, never a result the documented limits forbid (a NaN setting, integer
bytes loaded as weights, a checkpoint that passes its check and then fails to
load). Every file that existed before in the case's tree, the designated output
aside, is byte-identical after.

Each property runs twice: derandomized with few examples in the default run
(about 2 minutes for this file), and random with many under -m slow.
"""

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import stat
import struct
import sys
import tempfile

import pytest
import torch
import train_dpo
import train_pretrain
import train_sft
import yaml
from chat import ChatConfig
from chat_helpers import save_tiny_chat_model
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from nanobumble import serve
from nanobumble.base.errors import ConfigError, DataError, UserError, run_cli
from nanobumble.data.dpo_data import load_preference_pairs
from nanobumble.data.records import iter_text_records
from nanobumble.data.sft_data import load_conversations
from nanobumble.data.tokenizer import Tokenizer, train_tokenizer
from nanobumble.evaluate import EvalConfig
from nanobumble.export_hf import ExportConfig
from nanobumble.inference.loading import load_model
from nanobumble.merge_lora import MergeConfig
from nanobumble.model.transformer import ModelConfig, Transformer, pad_vocab_size
from nanobumble.plot import PlotConfig
from nanobumble.prepare import PrepareConfig
from nanobumble.run.config import DPOConfig, PretrainConfig, SFTConfig, parse_config
from nanobumble.run.optim import build_optimizer
from nanobumble.store.checkpoint import checkpoint_problem, load_checkpoint, save_checkpoint
from nanobumble.store.model_dir import load_model_dir, save_model_dir

try:  # the table of numeric ranges (issue 23): every accepted number is held to it
    from nanobumble.run.config import NUMBERS, number_rule
except ImportError:  # an older nanobumble: only the rules stated below
    NUMBERS, number_rule = None, None

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")  # large reprs of cases
# Hypothesis's own caches (no example database: database=None below) go to the temporary directory, not the repository
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "nanobumble-hypothesis"))

# ---------------------------------------------------------------------------
# Profiles: short and reproducible in the default run, long and random under -m slow

# No explain phase: it traces every line run, which makes a case many times slower than its time limit allows.
_COMMON = {"deadline": None, "database": None, "suppress_health_check": list(HealthCheck),
           "phases": [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]}
SHORT = settings(derandomize=True, **_COMMON)
LONG = settings(derandomize=False, **_COMMON)


def twice(short_examples: int, long_examples: int, **strategies):
    """The property as two tests: (default run, -m slow)."""
    def make(prop):
        fast = settings(SHORT, max_examples=short_examples)(given(**strategies)(prop))
        slow = settings(LONG, max_examples=long_examples)(given(**strategies)(prop))
        return fast, pytest.mark.slow(slow)
    return make


# ---------------------------------------------------------------------------
# What every case is held to

MAX_MESSAGE = 500  # characters of an error line, the case's own directory shown as <dir>
CASE_SECONDS = 20  # a case that runs longer hangs (a loop over an absurd size)


class TookTooLong(BaseException):
    """A BaseException: no `except Exception` of the code under test swallows it."""


@contextlib.contextmanager
def time_limit(seconds: float = CASE_SECONDS):
    running = [True]

    def expire(signum, frame):
        if running[0]:
            raise TookTooLong(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    # Again every second after that: raised where Python cannot pass it on (a gc callback), it is lost
    signal.setitimer(signal.ITIMER_REAL, seconds, 1)
    hung = False
    try:
        yield
    except TookTooLong:
        hung = True  # its traceback (holding whatever the code under test had built) is dropped here
    finally:
        running[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    if hung:  # out of the code under test: a failure hypothesis reports and shrinks
        raise AssertionError(f"a hang: still running after {seconds} s")


def check_line(message: str, *dirs) -> None:
    """An error message: one non-empty line, no traceback, bounded (dirs shown as <dir>)."""
    assert isinstance(message, str) and message.strip(), f"an empty error message: {message!r}"
    shown = message
    for d in dirs:
        shown = shown.replace(str(d), "<dir>")
    assert not re.search(r"[\n\r]", message), \
        f"an error message of more than one line: {shown[:1000]!r}"
    assert "Traceback" not in message, shown[:3000]
    assert len(shown) <= MAX_MESSAGE, f"an error message of {len(shown):,} characters: {shown[:400]!r} ..."


def run_program(main, argv: list[str], cwd) -> tuple[int, str, str]:
    """main(argv) under run_cli, as `python program.py argv` runs it, in this process:
    (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["program", *argv]
    os.chdir(cwd)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_cli(main)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return code, out.getvalue(), err.getvalue()


def check_exit(code: int, err: str, *dirs, only_line: bool = False) -> None:
    """Exit code 0, or 2 with one `error:` line (the only line on stderr when only_line); no traceback."""
    shown = err
    for d in dirs:
        shown = shown.replace(str(d), "<dir>")
    assert "Traceback" not in err, shown[-4000:]
    assert code in (0, 2), f"exit code {code}: {shown[-4000:]}"
    if code == 2:
        errors = [line for line in err.split("\n") if line.startswith("error: ")]  # lines as a terminal shows them
        assert len(errors) == 1, f"expected one error line, got: {shown[-4000:]}"
        if only_line:
            assert err.strip("\n") == errors[0], f"more than the error line on stderr: {shown[-4000:]}"
        check_line(errors[0], *dirs)


def snapshot(root, skip: tuple = ()) -> dict[str, str]:
    """Every entry under root (but the skipped relative paths): its bytes' hash, a
    link's target, or its kind."""
    skipped = {os.path.normpath(os.path.join(root, s)) for s in skip}
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skipped]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            if path in skipped:
                continue
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                state[os.path.relpath(path, root)] = "link to " + os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as f:
                    state[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
            else:
                state[os.path.relpath(path, root)] = f"mode {info.st_mode:o}"
    return state


def check_unchanged(before: dict, after: dict, new_allowed: bool = False) -> None:
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert not changed, f"files changed or removed: {changed[:10]}"
    if not new_allowed:
        added = sorted(set(after) - set(before))
        assert not added, f"files written by a reader: {added[:10]}"


@contextlib.contextmanager
def case_dir(parent):
    path = tempfile.mkdtemp(dir=parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("cases")


# ---------------------------------------------------------------------------
# Values

NAN, INF = float("nan"), float("inf")
EDGE_NUMBERS = [NAN, INF, -INF, 0, 0.0, -0.0, -1, -1.5, 1e-9, 5e-324, 1e308, -1e308, 0.5, 1, 2, 2**31, 2**32,
                2**63, 2**70, -2**70, 10**30, 10**400]
EDGE_STRINGS = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e400", "-1e400", "1e-400", "0x10", "1_000", "1e3",
                "3.0", "", " ", "true", "no", "null", "~", "é", "🐝", "1" * 400, "\u202e1", "٣", "-", "--", "-h"]
LONE_SURROGATES = ["\ud800", "\udfff", "\ud83d", "\udc1d"]
# Text a command line can hold: no NUL, no lone surrogate
ARGV_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)


def _bounds() -> list:
    """The ends of every range in the table, and their neighbours."""
    ends = {0, 1, 0.5, 2**16, 2**20, 2**22, 2**31, 2**32, 2**40, 65535, 1e6}
    if NUMBERS:
        ends |= {v for rule in NUMBERS.values() for v in (rule.low, rule.high) if math.isfinite(v)}
    values = set()
    for v in ends:
        values |= {v, -v, math.nextafter(v, INF), math.nextafter(v, -INF)}
        if float(v).is_integer():
            values |= {int(v), int(v) + 1, int(v) - 1}
    return sorted(values, key=lambda v: (float(v), type(v).__name__))


NUMBER_VALUES = st.one_of(st.sampled_from(EDGE_NUMBERS), st.sampled_from(_bounds()), st.sampled_from(EDGE_STRINGS),
                          st.floats(), st.integers(-2**80, 2**80), ARGV_TEXT)


def nested_text(depth: int, kind: str = "[") -> str:
    return ("[" * depth + "]" * depth) if kind == "[" else ('{"a": ' * depth + "1" + "}" * depth)


# ---------------------------------------------------------------------------
# 1. Config values: every program's config class, on the command line and in YAML

CONFIG_CLASSES = {PretrainConfig: {}, SFTConfig: {}, DPOConfig: {},
                  PrepareConfig: {"dataset_path": "d", "output_dir": "o"},
                  EvalConfig: {"model_path": "m", "tasks": ["t"]}, ExportConfig: {},
                  MergeConfig: {"base_model_path": "b", "lora_model_path": "l", "save_path": "s"},
                  PlotConfig: {"output_dir": "o"}, serve.ServeConfig: {}, ChatConfig: {}}
# Rules the issue states for keys that once took any value; the table (NUMBERS) holds them and more.
SIGNS = {"learning_rate": lambda v: v > 0, "lora_alpha": lambda v: v > 0, "pref_beta": lambda v: v > 0,
         "sft_weight": lambda v: v >= 0}


def field_kinds(cls) -> dict[str, str]:
    return {f.name: str(f.type).replace(" ", "") for f in dataclasses.fields(cls)}


def numeric_keys(cls) -> list[str]:
    return [k for k, t in field_kinds(cls).items() if t in ("int", "float", "<class'int'>", "<class'float'>")]


def argv_word(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


@st.composite
def config_cases(draw):
    cls = draw(st.sampled_from(list(CONFIG_CLASSES)), label="class")
    kinds = field_kinds(cls)
    numeric = numeric_keys(cls)
    others = [k for k in kinds if k not in numeric]
    entries = []
    for _ in range(draw(st.integers(1, 4))):
        which = draw(st.sampled_from(["number"] * 6 + ["other", "unknown"]))
        if which == "number" and numeric:
            key, value = draw(st.sampled_from(numeric)), draw(NUMBER_VALUES)
        elif which == "other" and others:
            key = draw(st.sampled_from(others))
            value = draw(st.one_of(ARGV_TEXT, st.sampled_from(EDGE_STRINGS), st.sampled_from(EDGE_NUMBERS),
                                   st.lists(ARGV_TEXT, max_size=3)))
        else:
            key, value = draw(st.one_of(ARGV_TEXT.filter(lambda s: s.strip()), st.just("x" * 300))), \
                draw(NUMBER_VALUES)
        where = draw(st.sampled_from(["argv", "argv=", "yaml"]))
        entries.append((key, value, where))
    damage = draw(st.sampled_from(["none"] * 5 + ["alias", "merge_alias", "deep", "bytes", "not_utf8", "document",
                                                  "directory", "missing", "big_int"]), label="yaml damage")
    return cls, entries, damage, draw(st.integers(0, 2**16), label="detail")


RAW_DOCUMENTS = ["---\na: 1\n---\nb: 2\n", "[1, 2]\n", "just a string\n", "", "null\n", "{\n", "key: [unclosed\n",
                 "\t: tab\n", ": : :\n", "!!python/object/apply:os.system ['true']\n", "? [a, b]\n: 1\n", "1: 2\n",
                 "learning_rate: !!binary aGk=\n", "learning_rate: 2001-12-14\n", "seed: !!set {a, b}\n",
                 "%YAML 1.1\n--- !!map\nseed: 1\n", "seed: &a 1\nport: *a\n"]


def yaml_damage(damage: str, detail: int, key: str) -> bytes:
    rnd = random.Random(detail)
    if damage in ("alias", "merge_alias"):
        width, depth = 2 + detail % 5, 1 + detail % 4
        levels = [f"&l0 [{', '.join(['lol'] * width)}]"]
        levels += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
        if damage == "merge_alias":
            return f"base: &m {{seed: 1}}\nmerged:\n  <<: *m\n{key}: 1\n".encode()
        return f"{key}: [{', '.join(levels)}, *l{depth - 1}]\n".encode()
    if damage == "deep":
        depth = [5, 99, 100, 101, 150, 500, 1000, 10000][detail % 8]
        return f"{key}: {nested_text(depth, '[' if detail % 2 else '{')}\n".encode()
    if damage == "bytes":
        return rnd.randbytes(detail % 200)
    if damage == "not_utf8":
        return f"{key}: caf".encode() + bytes([0x80 + detail % 128]) + b"\n"
    if damage == "document":
        return RAW_DOCUMENTS[detail % len(RAW_DOCUMENTS)].encode()
    if damage == "big_int":  # beyond a float; beyond the digits Python converts
        return f"{key}: 1{'0' * [400, 4000, 4299, 4300, 5000][detail % 5]}\n".encode()
    raise ValueError(damage)


def check_config(cfg) -> None:
    """An accepted config: every number finite, 64-bit, within its range."""
    cls = type(cfg)
    for key in numeric_keys(cls):
        value = getattr(cfg, key)
        if isinstance(value, float):
            assert math.isfinite(value), f"accepted {key} = {value}"
        if isinstance(value, int):
            assert -2**63 <= value < 2**63, f"accepted {key} = {value}"
        if key in SIGNS:
            assert SIGNS[key](value), f"accepted {key} = {value}"
        if number_rule is not None:
            assert number_rule(cls, key).requirement(value) is None, f"accepted {key} = {value!r}, out of its range"


def config_property(scratch, case):
    cls, entries, damage, detail = case
    with case_dir(scratch) as root:
        argv = [x for key, value in CONFIG_CLASSES[cls].items()
                for x in ([f"--{key}", *value] if isinstance(value, list) else [f"--{key}", value])]
        in_yaml = {}
        for key, value, where in entries:
            if where == "yaml":
                in_yaml[key] = value
            else:
                words = [argv_word(v) for v in value] if isinstance(value, list) else [argv_word(value)]
                argv += [f"--{key}={words[0]}"] if where == "argv=" and len(words) == 1 else [f"--{key}", *words]
        yaml_file = os.path.join(root, "config.yaml")
        key = entries[0][0] if entries[0][0] in field_kinds(cls) else (numeric_keys(cls) or ["seed"])[0]
        if damage == "directory":
            os.mkdir(yaml_file)
        elif damage == "none":
            if in_yaml:
                with open(yaml_file, "w", encoding="utf-8") as f:
                    f.write(yaml.safe_dump(in_yaml, allow_unicode=bool(detail % 2)))
        elif damage != "missing":
            with open(yaml_file, "wb") as f:
                f.write(yaml_damage(damage, detail, key))
        if in_yaml or damage != "none":
            argv += ["--yaml_config", yaml_file]
        note(f"argv: {argv}")
        if os.path.isfile(yaml_file):
            with open(yaml_file, "rb") as f:
                note(f"yaml: {f.read()[:2000]!r}")
        before = snapshot(root)
        built = []
        with time_limit():
            code, _, err = run_program(lambda args: built.append(parse_config(args, cls)), argv, root)
        check_exit(code, err, root, only_line=True)
        if code == 0 and built:  # (--help: no config)
            check_config(built[0])
        check_unchanged(before, snapshot(root))


test_config_values, test_config_values_long = twice(1500, 10000, case=config_cases())(config_property)


# ---------------------------------------------------------------------------
# 2. Records: pretraining text, SFT conversations, DPO pairs

class Raw(str):
    """JSON text put into a record as it is (nesting too deep to build, an integer of 5,000 digits, NaN)."""


RAW_VALUES = [nested_text(n, k) for n in (99, 100, 101, 600, 5000) for k in "[{"] + \
    ["1" + "0" * 5000, "1e400", "-1e400", "NaN", "-Infinity", "tru", "'single'", '"\\ud800"', '"\\u0000"',
     '"a\\udc00b"', '"\\ud83d\\udc1d"', "1.5e-400", "-0"]
ROLES = ["user", "assistant", "system", "developer", "tool", "", "USER", "human", "gpt", "function"]


def dumps(value) -> str:
    """JSON text of a generated value (Raw pieces as they are; lone surrogates as \\u escapes, NaN as NaN)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


def texts():
    return st.one_of(st.text(max_size=20), st.sampled_from(["", " ", "\n", "\x00", "\ufeff", "🐝", "x" * 5000]),
                     st.builds(lambda a, s, b: a + s + b, st.text(max_size=4), st.sampled_from(LONE_SURROGATES),
                               st.text(max_size=4)))


SCALARS = st.one_of(st.none(), st.booleans(), st.sampled_from([0, -1, 10**30, -2**70, 2**64]), st.floats(),
                    texts(), st.sampled_from([Raw(r) for r in RAW_VALUES]))
ANY_JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(texts(), inner, max_size=3)), max_leaves=8)
GOOD_TEXT = st.sampled_from(["where do bees live?", "in a hive", "bees make honey from flowers", "蜜蜂", "hi"])


def field_value():
    return st.one_of(GOOD_TEXT, GOOD_TEXT, GOOD_TEXT, ANY_JSON)


def message(role_key="role", content_key="content"):
    return st.one_of(st.fixed_dictionaries({role_key: st.one_of(st.sampled_from(ROLES), ANY_JSON),
                                            content_key: field_value()}), ANY_JSON)


def record(kind: str):
    """A record of the reader's kind, its fields good or not, or any JSON value at all."""
    if kind == "text":
        good = st.fixed_dictionaries({"text": field_value()}, optional={"id": ANY_JSON})
    else:
        alpaca = st.fixed_dictionaries({"instruction": field_value()},
                                       optional={"input": field_value(), "system": field_value(),
                                                 "history": ANY_JSON, "output": field_value()})
        sharegpt = st.fixed_dictionaries({"conversations": st.one_of(
            st.lists(message("from", "value"), max_size=4), ANY_JSON)})
        messages = st.fixed_dictionaries({"messages": st.one_of(st.lists(message(), max_size=4), ANY_JSON)})
        good = st.one_of(alpaca, sharegpt, messages)
        if kind == "dpo":
            response = st.one_of(field_value(), message(), message("from", "value"))
            good = st.builds(lambda r, extra: {**r, **extra}, good,
                             st.fixed_dictionaries({}, optional={"chosen": response, "rejected": response}))
    weird_keys = st.dictionaries(st.one_of(texts(), st.just("k" * 3000)), ANY_JSON, max_size=3)
    return st.one_of(good, good, good, st.builds(lambda r, extra: {**r, **extra} if isinstance(r, dict) else r,
                                                 good, weird_keys), ANY_JSON)


GOOD_RECORDS = {"text": {"text": "bees live in a hive and make honey from flowers"},
                "sft": {"instruction": "where do bees live?", "output": "in a hive"},
                "dpo": {"instruction": "where do bees live?", "chosen": "in a hive", "rejected": "on the moon"}}


@st.composite
def data_files(draw, kind: str, good_records: int = 0) -> tuple[bytes, str]:
    """The bytes of one data file (JSON Lines or a JSON array) and its suffix."""
    records = [dumps(draw(record(kind))) for _ in range(draw(st.integers(0, 4)))]
    good = [json.dumps(GOOD_RECORDS[kind])] * good_records
    records = good[: len(good) // 2] + records + good[len(good) // 2:]
    damage = draw(st.sampled_from(["none"] * 6 + ["bytes_line", "not_utf8", "bom", "crlf", "blank_lines",
                                                  "long_whitespace", "truncated", "empty"]))
    if draw(st.booleans()):
        text = ("[" + ", ".join(records) + "]").encode("utf-8", "surrogatepass")
        suffix = ".json"
    else:
        text = "\n".join(records).encode("utf-8", "surrogatepass") + b"\n"
        suffix = ".jsonl"
    if damage == "bytes_line":
        text += draw(st.binary(max_size=40)).replace(b"\n", b" ") + b"\n"
    elif damage == "not_utf8":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + bytes([draw(st.integers(0x80, 0xff))]) + text[at:]
    elif damage == "bom":
        text = b"\xef\xbb\xbf" + text
    elif damage == "crlf":
        text = text.replace(b"\n", b"\r\n")
    elif damage == "blank_lines":
        text = b"\n \n\t\n" + text.replace(b"\n", b"\n\n")
    elif damage == "long_whitespace":
        text = b" \n\t" * 3000 + text
    elif damage == "truncated":
        text = text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    elif damage == "empty":
        text = b""
    return text, suffix


@st.composite
def record_cases(draw):
    kind = draw(st.sampled_from(["text", "sft", "dpo"]), label="reader")
    good = draw(st.sampled_from([0, 0, 1, 2]), label="good records around them")
    return kind, draw(data_files(kind, good), label="file"), draw(st.booleans(), label="strict"), \
        draw(st.booleans(), label="as a directory")


def check_items(kind: str, items: list) -> None:
    """What a reader returns: text that is Unicode, conversations of the shapes the docs name."""
    for item in items:
        if kind == "text":
            assert isinstance(item, str) and item, f"a text record gave {item!r}"
            item.encode("utf-8")
            continue
        assert isinstance(item, dict) and isinstance(item.get("where"), str), item
        if kind == "sft" and "text" in item:  # TRL's language-modelling records: plain text
            assert isinstance(item["text"], str), item
            item["text"].encode("utf-8")
            continue
        messages = item["messages"] if kind == "sft" else item["prompt"]
        assert isinstance(messages, list) and messages, item
        for m in messages:
            assert m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str), item
            m["content"].encode("utf-8")
        if kind == "sft":
            assert messages[-1]["role"] == "assistant", item
        else:
            assert messages[-1]["role"] == "user", item
            for key in ("chosen", "rejected"):
                assert isinstance(item[key], str), item
                item[key].encode("utf-8")


def read(kind: str, path: str, strict: bool) -> list:
    if kind == "text":
        return list(iter_text_records([path], strict=strict))
    if kind == "sft":
        return load_conversations(path, strict=strict)
    return load_preference_pairs(path, strict=strict)


def records_property(scratch, case):
    kind, (content, suffix), strict, directory = case
    note(f"file: {content[:3000]!r}")
    with case_dir(scratch) as root:
        path = os.path.join(root, "data" + suffix)
        with open(path, "wb") as f:
            f.write(content)
        before = snapshot(root)
        err = io.StringIO()
        items = None
        with time_limit(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                items = read(kind, root if directory else path, strict)
            except DataError as e:
                check_line(str(e), root)
        for line in filter(None, err.getvalue().split("\n")):  # the skipped records' reports
            check_line(line, root)
        if items is not None:
            check_items(kind, items)
            if strict:
                assert "(skipped)" not in err.getvalue(), "strict, yet a record was skipped"
        check_unchanged(before, snapshot(root))


test_records, test_records_long = twice(1200, 8000, case=record_cases())(records_property)


# ---------------------------------------------------------------------------
# 3. safetensors headers, config.json and the other files of a model directory and a checkpoint

BEES = "where do bees live? bees live in a hive and make honey from flowers. "
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
         "I8": 1, "U8": 1, "BOOL": 1}
FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
              "qkv_bias", "tie_word_embeddings")
MODEL_CONFIG = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 48,
                "max_position_embeddings": 32}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A tiny model directory and a checkpoint of it, as the programs write them."""
    root = tmp_path_factory.mktemp("stored")
    tok = train_tokenizer([BEES] * 20, 300, str(root / "tokenizer.model"))
    cfg = ModelConfig(vocab_size=pad_vocab_size(Tokenizer(tok).vocab_size), **MODEL_CONFIG)
    torch.manual_seed(0)
    model = Transformer(cfg)
    save_model_dir(str(root / "model"), model, tok, "stage: pretrain\n")
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))).backward()
    optimizer.step()
    save_checkpoint(str(root / "run"), 1, model, optimizer, tok, "seed: 1\n", save_total_limit=2)
    return {"model": root / "model", "checkpoint": root / "run" / "checkpoint-1", "config": cfg}


def read_safetensors(path) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        blob = f.read()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def numel(shape) -> int | None:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        return None
    return math.prod(shape)


def lie_about_tensors(draw, header: dict, data: bytes, kind: str) -> tuple[bytes, list[str]]:
    """A safetensors file from a true header with one to three lies told in it. Returns
    the file and the lies a reader must refuse (empty: a change a reader may accept)."""
    header = json.loads(json.dumps(header))
    names = [k for k in header if k != "__metadata__"]
    original = {k: dict(header[k]) for k in names}
    truth = {k: dict(v) for k, v in original.items()}  # each name's true entry (renamed and added ones too)
    refuse, lied_offsets = [], set()
    for _ in range(draw(st.integers(1, 3))):
        lie = draw(st.sampled_from(["dtype", "dtype", "shape", "shape", "offsets", "drop", "rename", "add",
                                    "metadata"]))
        tensors = [k for k in header if k != "__metadata__"]
        if lie in ("dtype", "shape", "offsets", "drop", "rename") and not tensors:
            continue
        name = draw(st.sampled_from(tensors)) if tensors else None
        if lie == "dtype":
            header[name]["dtype"] = draw(st.sampled_from([*SIZES, "Q4", "", "f32", 7, None]))
        elif lie == "shape":
            shape = truth[name]["shape"]  # each lie starts from the truth, not from an earlier lie
            header[name]["shape"] = draw(st.sampled_from([
                shape[::-1], [d + 1 for d in shape], shape + [1], shape[:-1], [], [0], [2**40, 2**40], [2**62] * 2,
                [-1], ["a"], [1.5], [[1]], None, [math.prod(shape)]]))
        elif lie == "offsets":
            start, end = truth[name]["data_offsets"]
            header[name]["data_offsets"] = draw(st.sampled_from([
                [end, start], [start, end + 1], [start + 1, end], [0, 0], [start, 2**64], [-1, end], [start],
                [start, end, end], "x", [float(start), float(end)], [start, len(data) + 8]]))
            lied_offsets.add(name)
        elif lie == "drop":
            del header[name]
        elif lie == "rename":
            new_name = draw(st.sampled_from([name + "x", "", name.upper(), "cuda.0", "torch.1"]))
            header[new_name], truth[new_name] = header.pop(name), truth[name]
        elif lie == "add":
            new_name = draw(st.sampled_from(["extra.weight", "layers.9.mlp.up_proj.weight", "cuda.1", "x" * 300]))
            header[new_name] = {"dtype": draw(st.sampled_from(["F32", "U8", "I64"])), "shape": [4],
                                "data_offsets": [0, 4]}
            truth[new_name] = dict(header[new_name])
        else:
            header["__metadata__"] = draw(st.sampled_from([{}, {"format": "np"}, {"x": "y" * 5000}, {"a": 1},
                                                           [], "pt", {"format": "pt", "n": {"deep": [1]}}]))
    recompute = draw(st.booleans(), label="offsets recomputed")
    out = data
    if recompute:  # the offsets agree with the (lying) dtypes and shapes: only they lie
        pieces, offset = [], 0
        for key in [k for k in header if k != "__metadata__"]:
            entry = header[key]
            count = numel(entry.get("shape")) if isinstance(entry, dict) else None
            size = SIZES.get(entry.get("dtype")) if isinstance(entry, dict) and isinstance(entry.get("dtype"),
                                                                                            str) else None
            if count is None or size is None or count * size > 2**22:
                continue  # left as it is
            start, end = original[key]["data_offsets"] if key in original else (0, 0)
            piece = data[start:end] if key in original and end - start == count * size else \
                random.Random(count).randbytes(count * size)
            entry["data_offsets"] = [offset, offset + len(piece)]
            lied_offsets.discard(key)
            pieces.append(piece)
            offset += len(piece)
        out = b"".join(pieces)
    # what a reader must refuse, by comparing the lying header with the true one
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    refuse += [f"offsets of {k}" for k in lied_offsets if k in tensors]
    if kind == "rng":
        extra = [k for k in tensors if k not in original and not re.fullmatch(r"cuda\.\d+", k)]
        if extra or "torch" not in tensors:
            refuse.append("names")
    elif set(tensors) != set(original):
        refuse.append("names")
    for key, entry in tensors.items():
        if key not in original or not isinstance(entry, dict):
            continue
        if entry.get("shape") != original[key]["shape"]:
            refuse.append(f"shape of {key}")
        dtype = entry.get("dtype")
        if kind == "rng" and dtype != "U8" or kind != "rng" and dtype not in FLOATS:
            refuse.append(f"dtype {dtype} of {key}")
        offsets = entry.get("data_offsets")
        if not recompute and dtype in SIZES and numel(entry.get("shape")) is not None and \
                isinstance(offsets, list) and len(offsets) == 2 and \
                SIZES[dtype] * numel(entry["shape"]) != offsets[1] - offsets[0]:
            refuse.append(f"offsets of {key}")
    return safetensors_bytes(header, out), refuse


def damage_file(draw, blob: bytes) -> bytes:
    """Damage to the whole file: its length prefix, its header's bytes, its data."""
    (length,) = struct.unpack("<Q", blob[:8])
    header, data = blob[8:8 + length], blob[8 + length:]
    how = draw(st.sampled_from(["length", "not_json", "not_utf8", "deep", "truncated", "trailing", "empty",
                                "random", "short"]))
    if how == "length":
        return struct.pack("<Q", draw(st.sampled_from([0, 1, length - 1, length + 1, len(blob), 2**63, 2**64 - 1,
                                                       100_000_001]))) + header + data
    if how == "not_json":
        text = b"{not json at all}"
        return struct.pack("<Q", len(text)) + text + data
    if how == "not_utf8":
        text = header.replace(b'"', b'"\xff', 1)
        return struct.pack("<Q", len(text)) + text + data
    if how == "deep":  # nesting in the metadata, whose values must be strings
        depth = draw(st.sampled_from([1, 64, 127, 128, 129, 1000, 100_000]))
        rest = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
        text = b'{"__metadata__": {"a": ' + b"[" * depth + b"]" * depth + b"}, " + json.dumps(rest).encode()[1:]
        return struct.pack("<Q", len(text)) + text + data
    if how == "truncated":
        return blob[: draw(st.integers(0, len(blob) - 1))]
    if how == "trailing":
        return blob + b"\0" * draw(st.integers(1, 64))
    if how == "empty":
        return b""
    if how == "short":
        return blob[:8]
    return random.Random(draw(st.integers(0, 2**16))).randbytes(draw(st.integers(0, 300)))


JSON_LIES = [0, -1, 1, 2, 1.5, "32", None, True, [], {}, Raw("NaN"), Raw("1e400"), Raw("1" + "0" * 5000),
             Raw(nested_text(1000)), 2**40, 2**62, 10**6]


def lie_in_config(draw, config: dict) -> tuple[bytes, list[str]]:
    config = dict(config)
    refuse = []
    how = draw(st.sampled_from(["keys"] * 4 + ["unknown", "not_object", "not_utf8", "deep"]))
    if how == "unknown":
        config[draw(st.sampled_from(["num_expert", "model_type", "", "x" * 300]))] = 1
        return dumps(config).encode(), ["unknown key"]
    if how == "not_object":
        return dumps(draw(st.sampled_from([[config], "config", 1, None]))).encode(), ["not an object"]
    if how == "not_utf8":
        return dumps(config).encode().replace(b"}", b', "x": "\xff"}'), ["not UTF-8"]
    if how == "deep":
        return (dumps(config)[:-1] + ', "x": ' + nested_text(draw(st.sampled_from([101, 1000, 100_000]))) +
                "}").encode(), ["too deep"]
    original = dict(config)
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.sampled_from(sorted(config)))
        true = original[key]
        config[key] = draw(st.sampled_from(JSON_LIES + [true * 2 if isinstance(true, int) else 2.0,
                                                        true + 1 if isinstance(true, int) else 1e308]))
    for key, value in config.items():
        if type(value) is type(original[key]) and value == original[key]:
            continue
        if key in ("qkv_bias", "tie_word_embeddings"):
            valid = isinstance(value, bool)
        elif key in ("rope_theta", "rms_norm_eps"):
            valid = isinstance(value, (int, float)) and not isinstance(value, (bool, Raw)) and 0 < value < INF
        else:
            valid = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        if key in SHAPE_KEYS or not valid:  # another shape than the weights', or no shape at all
            refuse.append(f"config.json {key} = {str(value)[:40]}")
    return dumps(config).encode(), refuse


TEXT_LIES = [b"", b"\xff\xfe", b"[]", b"null", b"step: 1\n", b"a: &x [1]\nb: *x\n", nested_text(1000).encode(),
             b'{"step": 1, "world_size": 1}', b'{"step": "1", "world_size": 1}', b'{"step": 1, "world_size": -1}',
             b'{"step": 1, "world_size": 1, "data": ' + nested_text(5000).encode() + b"}",
             b'{"step": NaN, "world_size": 1}', b'{"step": 1' + b"0" * 5000 + b', "world_size": 1}',
             b'{"step": 1, "world_size": 1e400}', b'{"step": 2, "world_size": 1}']


@st.composite
def header_cases(draw):
    where = draw(st.sampled_from(["model", "checkpoint"]), label="directory")
    files = ["model.safetensors", "model.safetensors", "config.json"]
    if where == "checkpoint":
        files += ["optimizer.safetensors", "optimizer.safetensors", "rng_state.safetensors", "trainer_state.json",
                  "training_args.yaml"]
    return where, draw(st.sampled_from(files), label="file")


def headers_property(stored, scratch, case, data):
    where, target = case
    with case_dir(scratch) as root:
        path = os.path.join(root, os.path.basename(str(stored[where])))
        shutil.copytree(stored[where], path)
        file = os.path.join(path, target)
        refuse = []
        if target.endswith(".safetensors"):
            header, blob = read_safetensors(file)
            if data.draw(st.integers(0, 4), label="whole-file damage") == 0:
                content, refuse = damage_file(data.draw, safetensors_bytes(header, blob)), ["damaged file"]
                if content.startswith(safetensors_bytes(header, blob)):  # trailing bytes: may be read
                    refuse = []
            else:
                content, refuse = lie_about_tensors(data.draw, header, blob, "rng" if "rng" in target else "weights")
        elif target == "config.json":
            with open(file, encoding="utf-8") as f:
                content, refuse = lie_in_config(data.draw, json.load(f))
        else:
            content = data.draw(st.sampled_from(TEXT_LIES), label=target)
        with open(file, "wb") as f:
            f.write(content)
        note(f"{target}: {content[:600]!r} ... ({len(content):,} bytes); a reader must refuse it for: {refuse}")
        before = snapshot(root)
        with time_limit(10):  # a case takes 0.1 s
            if where == "model":
                try:
                    load_model_dir(path)
                except (UserError, ConfigError, DataError) as e:
                    check_line(str(e), root)
                else:
                    assert not refuse, f"load_model_dir loaded a lying file: {refuse}"
            else:
                problem = checkpoint_problem(path)
                if problem is not None:
                    check_line(problem, root)
                else:  # intact: resuming from it must work, and only from a file that does not lie
                    assert not refuse, f"checkpoint_problem passed a lying file: {refuse}"
                    model = Transformer(stored["config"])
                    load_checkpoint(path, model, build_optimizer(model, 1e-3, 0.1, (0.9, 0.95)))
        check_unchanged(before, snapshot(root))


test_stored_files, test_stored_files_long = twice(1200, 5000, case=header_cases(), data=st.data())(headers_property)


# ---------------------------------------------------------------------------
# 4. Server requests

SERVE_CORPUS = ("user: where do bees live?\nassistant: bees live in a hive and make honey from flowers.\n" * 5 +
                "蜜蜂住在蜂巢里，用花酿蜜。\n") * 3
MAX_NEW = 4


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    save_tiny_chat_model(root, SERVE_CORPUS, 128, {"bee": "model_name_or_path: tiny\nstage: sft\n"})
    cfg = serve.ServeConfig(model_path=str(root / "bee"), max_new_tokens=MAX_NEW, device="cpu")
    model, tokenizer, _, _ = load_model(cfg.model_path, "", torch.device("cpu"), torch.float32)
    engine = serve.Engine(model, tokenizer, "bee", cfg)
    loop = asyncio.new_event_loop()
    yield serve.create_app(engine), loop
    engine.worker.shutdown(wait=True)
    loop.close()


async def asgi_request(app, method: str, path: str, body: bytes) -> tuple[int, dict, bytes]:
    """One HTTP request through the ASGI app, as uvicorn makes it: (status, headers, body).
    The client stays connected until the whole answer has been sent."""
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    done, sent = asyncio.Event(), []
    response = {"status": None, "headers": {}, "body": []}

    async def receive():
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            response["status"] = message["status"]
            response["headers"] = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            response["body"].append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    await app(scope, receive, send)
    return response["status"], response["headers"], b"".join(response["body"])


NUMBERS_IN_REQUESTS = st.one_of(st.sampled_from([0, 0.0, -0.0, 1, 0.5, 0.7, 2, 2.5, -1, 1e-300, 1e308, NAN, INF, -INF,
                                                 10**400, 2**64, -2**64, 2**63, True]), st.floats(),
                                st.integers(-2**70, 2**70))
LONG_TEXT = "x" * 3000
LONG_STRING = st.just(LONG_TEXT)
PLAIN_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
REQUEST_TEXT = st.one_of(st.text(max_size=12), st.sampled_from(LONE_SURROGATES), LONG_STRING,
                         st.sampled_from(["", "hello bees", "\x00", "<|im_start|>", "{{ x }}", "{% for %}"]))
ANY_REQUEST_VALUE = st.recursive(st.one_of(st.none(), NUMBERS_IN_REQUESTS, REQUEST_TEXT),
                                 lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(REQUEST_TEXT, inner, max_size=3)),
                                 max_leaves=6)


def stops():
    """(valid, weird) stop strings."""
    word = st.one_of(PLAIN_TEXT, st.sampled_from(["x" * n for n in (0, 1, 999, 1000, 1001, 5000)]),
                     st.sampled_from(LONE_SURROGATES))
    return st.one_of(PLAIN_TEXT, st.lists(PLAIN_TEXT, max_size=4)), \
        st.one_of(word, st.lists(word, max_size=8), ANY_REQUEST_VALUE)


PARTS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": PLAIN_TEXT}), min_size=1, max_size=2)
CONTENTS = st.one_of(PLAIN_TEXT, PLAIN_TEXT, PARTS)
WEIRD_CONTENTS = st.one_of(REQUEST_TEXT, ANY_REQUEST_VALUE, st.lists(st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": REQUEST_TEXT}), ANY_REQUEST_VALUE),
    max_size=3))


@st.composite
def conversations(draw):
    """user, assistant, ... ending with the user (a system or developer message first, or not); one time in
    three with wrong contents or a message out of place or of no shape."""
    broken = draw(st.integers(0, 2)) == 0
    contents = st.one_of(CONTENTS, CONTENTS, WEIRD_CONTENTS) if broken else CONTENTS
    messages = [{"role": draw(st.sampled_from(["system", "developer"])), "content": draw(contents)}] \
        if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 2))):
        messages += [{"role": "user", "content": draw(contents)}, {"role": "assistant", "content": draw(contents)}]
    messages.append({"role": "user", "content": draw(contents)})
    if broken and draw(st.booleans()):
        weird = draw(st.one_of(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(ROLES), REQUEST_TEXT),
                                                      "content": contents}, optional={"name": REQUEST_TEXT}),
                               ANY_REQUEST_VALUE))
        messages.insert(draw(st.integers(0, len(messages))), weird)
    return messages


# Each setting: (valid values, anything else)
SETTINGS_FIELDS = {
    "max_tokens": (st.integers(1, MAX_NEW), st.one_of(NUMBERS_IN_REQUESTS, ANY_REQUEST_VALUE)),
    "max_completion_tokens": (st.integers(1, MAX_NEW), NUMBERS_IN_REQUESTS),
    "temperature": (st.one_of(st.sampled_from([0, 0.7, 1, 2]), st.floats(0, 2)), NUMBERS_IN_REQUESTS),
    "top_p": (st.floats(0, 1), NUMBERS_IN_REQUESTS),
    "top_k": (st.integers(-1, 50), NUMBERS_IN_REQUESTS),
    "repetition_penalty": (st.floats(0.5, 2), NUMBERS_IN_REQUESTS),
    "seed": (st.integers(-2**63, 2**63 - 1), NUMBERS_IN_REQUESTS),
    "stop": stops(),
    "stream": (st.booleans(), ANY_REQUEST_VALUE),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), ANY_REQUEST_VALUE),
    "response_format": (st.just({"type": "text"}), ANY_REQUEST_VALUE),
    "n": (st.just(1), NUMBERS_IN_REQUESTS),
    "presence_penalty": (st.just(0), NUMBERS_IN_REQUESTS),
    "logprobs": (st.just(False), ANY_REQUEST_VALUE),
    "user": (PLAIN_TEXT, REQUEST_TEXT),
}


@st.composite
def requests(draw):
    """A request body, mostly valid: at most two of its settings (and one time in three its
    messages or prompt) anything at all; and its bytes, as JSON or not."""
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), label="path")
    body = {}
    if draw(st.integers(0, 9)):
        body["model"] = "bee"
    elif draw(st.booleans()):
        body["model"] = draw(ANY_REQUEST_VALUE)
    if path == "/v1/chat/completions":
        body["messages"] = draw(st.one_of(conversations(), conversations(), conversations(), ANY_REQUEST_VALUE))
    else:
        valid = st.one_of(PLAIN_TEXT, st.lists(PLAIN_TEXT, min_size=1, max_size=1))
        body["prompt"] = draw(st.one_of(valid, valid, st.one_of(REQUEST_TEXT, st.lists(REQUEST_TEXT, max_size=2),
                                                                ANY_REQUEST_VALUE)))
    keys = draw(st.lists(st.sampled_from(sorted(SETTINGS_FIELDS)), max_size=5, unique=True))
    weird = draw(st.integers(0, 2))
    for i, key in enumerate(keys):
        body[key] = draw(SETTINGS_FIELDS[key][i < weird])
    if draw(st.integers(0, 5)) == 0:
        body[draw(REQUEST_TEXT)] = draw(ANY_REQUEST_VALUE)
    encoding = draw(st.sampled_from(["json"] * 8 + ["utf8_surrogates", "raw"]), label="encoding")
    if encoding == "raw":
        data = draw(st.one_of(
            st.binary(max_size=60),
            st.sampled_from([b"", b"[]", b"null", b"1", b'"bee"', b"{", b"[" * 100_000 + b"]" * 100_000,
                             b'{"model": "bee", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                             b'{"model": "bee", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}",
                             b'{"model": "bee", "prompt": "hi", "temperature": 1e400}',
                             b'{"model": "bee", "prompt": "hi", "max_tokens": 2, "model": "x"}',
                             b'{"model": "bee", "prompt": "caf\xe9"}', b"\xef\xbb\xbf{}",
                             b" " * (2**20) + b'{"model": "bee", "prompt": "hi"}'])), label="raw body")
        return path, body, data, encoding
    if encoding == "json":
        data = json.dumps(body, allow_nan=True).encode()
    else:
        data = json.dumps(body, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return path, body, data, encoding


def standard(value) -> bool:
    """JSON as the standard has it: finite numbers, text without lone surrogates."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return not any(0xd800 <= ord(c) <= 0xdfff for c in value)
    if isinstance(value, list):
        return all(map(standard, value))
    if isinstance(value, dict):
        return all(standard(k) and standard(v) for k, v in value.items())
    return True


def server_property(app, case):
    path, body, data, encoding = case
    application, loop = app
    note(f"POST {path} {data[:2000]!r}{' ...' if len(data) > 2000 else ''}")
    with time_limit():
        status, headers, answer = loop.run_until_complete(asgi_request(application, "POST", path, data))
    event(f"status {status}")
    assert status is not None and (200 <= status < 300 or 400 <= status < 500), \
        f"status {status}: {answer[:2000]!r}"
    if status >= 400:
        error = json.loads(answer)
        event(f"refused: {str(error.get('error', {}).get('param'))[:20]} {str(error.get('error', {}).get('code'))[:30]}")
        assert isinstance(error, dict) and isinstance(error.get("error"), dict), answer[:2000]
        assert isinstance(error["error"].get("message"), str) and error["error"]["message"], answer[:2000]
        assert isinstance(error["error"].get("type"), str), answer[:2000]
        assert len(error["error"]["message"]) <= MAX_MESSAGE, f"a message of {len(error['error']['message']):,} " \
                                                              f"characters: {error['error']['message'][:300]!r}"
        return
    # Accepted: only a request the documented limits allow
    assert encoding != "raw" and standard(body), "accepted a body that is not standard JSON (NaN, Infinity, a " \
                                                 "number beyond a float, a lone surrogate)"
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    assert len(stop) <= 4 and all(len(s) <= 1000 for s in stop), f"accepted {len(stop)} stop strings of " \
                                                                  f"{[len(s) for s in stop]} characters"
    if body.get("temperature") is not None:
        assert 0 <= body["temperature"] <= 2, f"accepted temperature {body['temperature']}"
    if body.get("stream") is True:
        assert headers.get("content-type", "").startswith("text/event-stream"), headers
        events = [line[len("data: "):] for line in answer.decode().split("\n\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", answer[-500:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(isinstance(c.get("choices"), list) for c in chunks)
    else:
        reply = json.loads(answer)
        choice = reply["choices"][0]
        text = choice["message"]["content"] if path == "/v1/chat/completions" else choice["text"]
        assert isinstance(text, str)
        requested = body.get("max_tokens") or body.get("max_completion_tokens") or MAX_NEW
        # usage counts the tokens of every choice (n of them), as OpenAI's does
        assert len(reply["choices"]) == (body.get("n") or 1), reply["choices"]  # "n": null is the default
        assert reply["usage"]["completion_tokens"] <= requested * len(reply["choices"]), reply["usage"]


test_server_requests, test_server_requests_long = twice(3000, 15000, case=requests())(server_property)


# ---------------------------------------------------------------------------
# 5. Whole training runs in this process: generated settings, generated records among good ones

STAGES = {"pretrain": train_pretrain.main, "sft": train_sft.main, "dpo": train_dpo.main}
# The keys a run's case sets, with values that keep it short (a few steps of a tiny model at most):
# valid ones, and ones that must be refused (NaN, inf, out of range, absurd sizes, not numbers).
RUN_KEYS = {
    "learning_rate": st.floats(1e-5, 1e-2), "weight_decay": st.sampled_from([0, 0.1, 10]),
    "warmup_ratio": st.floats(0, 0.9), "min_lr_ratio": st.floats(0, 1), "adam_beta1": st.floats(0, 0.99),
    "adam_beta2": st.floats(0.5, 0.999), "max_grad_norm": st.sampled_from([-1, 0, 1e-3, 1, 1e6]),
    "val_ratio": st.sampled_from([0, 0.1, 0.5]), "seed": st.integers(0, 2**32 - 1),
    "save_total_limit": st.sampled_from([-1, 0, 1, 3]),
    "lr_scheduler_type": st.sampled_from(["cosine", "linear", "constant"]), "strict": st.booleans(),
    "cutoff_len": st.sampled_from([8, 16, 32, 64]), "train_micro_batch_size_per_gpu": st.sampled_from([1, 2, 4]),
    "gradient_accumulation_steps": st.sampled_from([1, 2]), "save_steps": st.sampled_from([1, 2, 0, -1]),
    "max_steps": st.sampled_from([1, 2, 3]), "num_epochs": st.sampled_from([0.01, 0.05]),
}
FINETUNE_KEYS = {"lora_alpha": st.floats(0.1, 100), "lora_dropout": st.sampled_from([0, 0.1, 0.5]),
                 "lora_rank": st.sampled_from([1, 2, 8]), "finetuning_type": st.sampled_from(["full", "lora"]),
                 "system_prompt": st.sampled_from(["", "You are a bee.", "x" * 200])}
STAGE_KEYS = {"pretrain": {}, "sft": {**FINETUNE_KEYS, "packing": st.booleans()},
              "dpo": {**FINETUNE_KEYS, "pref_beta": st.floats(0.01, 10), "sft_weight": st.sampled_from([0, 1, 5]),
                      "label_smoothing": st.sampled_from([0, 0.2, 0.49]), "ld_alpha": st.floats(0, 1),
                      "max_chosen_logp_drop": st.floats(-1, 1),
                      "pref_loss": st.sampled_from(["sigmoid", "ipo", "hinge"]),
                      "precompute_ref_log_probs": st.booleans()}}
# Refused values, and for the keys that could make a run long or big only these (never a huge valid one)
REFUSED = st.one_of(st.sampled_from([NAN, INF, -INF, -1, 1e308, 2**40, 2**64, "x", "", "1e400", "nan"]),
                    st.sampled_from(EDGE_STRINGS))
BOUNDED = {"cutoff_len": [0, -1, 2**40, 1.5], "train_micro_batch_size_per_gpu": [0, 2**40, -2],
           "gradient_accumulation_steps": [0, -3, 2**40], "max_steps": [NAN, 2**50, 1.5, "x"],
           "num_epochs": [0, -1, NAN, INF, 1e308], "lora_rank": [0, -1, 2**40, 1.5],
           "finetuning_type": ["qlora", "", "FULL"]}


# How much validation data: held-out rows (eval_rows), or batches in an older nanobumble
EVAL_SIZE = ["--eval_rows", "2"] if "eval_rows" in field_kinds(PretrainConfig) else ["--eval_batches", "1"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("base_model")
    save_tiny_chat_model(root, SERVE_CORPUS, 128, {"base": "model_name_or_path: tiny\nstage: sft\n"})
    return root / "base"


@st.composite
def run_cases(draw):
    """A stage, two or three of its settings (one of them, one time in three, refused),
    and a data file of good records around generated ones."""
    stage = draw(st.sampled_from(list(STAGES)), label="stage")
    keys = {**RUN_KEYS, **STAGE_KEYS[stage]}
    values = {}
    chosen = draw(st.lists(st.sampled_from(sorted(keys)), min_size=1, max_size=3, unique=True))
    refused = draw(st.integers(0, 2)) == 0
    for i, key in enumerate(chosen):
        if refused and i == 0:
            values[key] = draw(st.sampled_from(BOUNDED[key]) if key in BOUNDED else REFUSED)
        else:
            values[key] = draw(keys[key])
    kind = {"pretrain": "text"}.get(stage, stage)
    return stage, values, draw(data_files(kind, good_records=24), label="data")


def check_weights_finite(directory: str) -> None:
    from safetensors import safe_open

    for name in ("model.safetensors", "adapter_model.safetensors"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safetensors file, not a dict)
                    assert torch.isfinite(f.get_tensor(key).float()).all(), f"{path}: {key} is not finite"


def run_property(base_model, scratch, case):
    stage, values, (content, suffix) = case
    with case_dir(scratch) as root:
        data = os.path.join(root, "data" + suffix)
        with open(data, "wb") as f:
            f.write(content)
        argv = ["--dataset_path", data, "--output_dir", os.path.join(root, "out"),
                "--cache_dir", os.path.join(root, "cache"), "--model_name_or_path", str(base_model),
                "--max_steps", "2", "--num_epochs", "0.01", "--cutoff_len", "64",
                "--train_micro_batch_size_per_gpu", "2", *EVAL_SIZE, "--eval_steps", "1",
                "--logging_steps", "1", "--save_steps", "1", "--val_ratio", "0.1", "--use_tensorboard", "false",
                "--plot", "false", "--preprocessing_num_workers", "1"]
        for key, value in values.items():
            argv += [f"--{key}", argv_word(value)]
        note(f"argv: {argv}")
        note(f"data: {content[:3000]!r}")
        before = snapshot(root, skip=("out", "cache"))
        model_before = snapshot(base_model)
        with time_limit(120):
            code, _, err = run_program(STAGES[stage], argv, root)
        event(f"exit {code}: " + next((line[:70] for line in err.splitlines() if line.startswith("error")), ""))
        check_exit(code, err, root, base_model)
        if code == 0:
            check_weights_finite(os.path.join(root, "out"))
        check_unchanged(before, snapshot(root, skip=("out", "cache")))
        check_unchanged(model_before, snapshot(base_model))


test_training_runs, test_training_runs_long = twice(150, 600, case=run_cases())(run_property)
