"""The one table of numeric ranges (NUMBERS in nanobumble/run/config.py).

Every numeric key of every config class (the training stages' and the programs')
has an entry, and any value a user can give is either accepted, when the entry
allows it, or refused with a ConfigError naming the key: never a traceback of
another kind, never NaN or infinity trained with."""

import ast
import math
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from chat import ChatConfig
from nanobumble.base.errors import ConfigError
from nanobumble.base.reading import Number
from nanobumble.evaluate import EvalConfig
from nanobumble.export_hf import ExportConfig
from nanobumble.merge_lora import MergeConfig
from nanobumble.plot import PlotConfig
from nanobumble.prepare import PrepareConfig
from nanobumble.run.config import (
    NUMBERS,
    DPOConfig,
    FinetuneConfig,
    PretrainConfig,
    SFTConfig,
    TrainConfig,
    number_rule,
    parse_config,
)
from nanobumble.sample_pairs import SamplePairsConfig
from nanobumble.serve import ServeConfig

# Each config class, with values for its required keys.
CLASSES = {TrainConfig: {}, PretrainConfig: {}, FinetuneConfig: {}, SFTConfig: {}, DPOConfig: {},
           PrepareConfig: {"dataset_path": "d", "output_dir": "o"}, EvalConfig: {"model_path": "m", "tasks": ["t"]},
           ExportConfig: {}, MergeConfig: {"base_model_path": "b", "lora_model_path": "l", "save_path": "s"},
           PlotConfig: {"output_dir": "o"}, ServeConfig: {}, ChatConfig: {},
           SamplePairsConfig: {"model_path": "m", "dataset_path": "d", "output_path": "o"}}


def numeric_keys(cls) -> list[tuple[str, bool]]:
    """(key, is an int) for every int or float field of cls."""
    types = {"int": True, "float": False, int: True, float: False}
    return [(f.name, types[f.type]) for f in fields(cls) if f.type in types]


def required_argv(cls) -> list[str]:
    argv = []
    for key, value in CLASSES[cls].items():
        argv += [f"--{key}", *value] if isinstance(value, list) else [f"--{key}", value]
    return argv


def test_every_config_class_is_walked():
    """Every dataclass named *Config in a module that calls parse_config is in CLASSES:
    a new program's config cannot escape the walk below."""
    found = set()
    sources = [*Path(REPO_ROOT, "nanobumble").rglob("*.py"), *Path(REPO_ROOT).glob("*.py")]
    for path in sources:
        text = path.read_text(encoding="utf-8")
        if "parse_config(" not in text:
            continue
        found |= {node.name for node in ast.walk(ast.parse(text)) if isinstance(node, ast.ClassDef)
                  and node.name.endswith("Config") and node.decorator_list}
    assert found == {cls.__name__ for cls in CLASSES}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_numeric_key_has_an_entry(cls):
    for key, integer in numeric_keys(cls):
        rule = number_rule(cls, key)  # a TypeError when there is none
        assert rule.integer == integer, key


def test_every_entry_belongs_to_a_key():
    """No entry outlives its key (a renamed key would leave a stale range behind)."""
    keys = {key for cls in CLASSES for key, _ in numeric_keys(cls)}
    own = {f"{cls.__name__}.{key}" for cls in CLASSES for key, _ in numeric_keys(cls)}
    assert set(NUMBERS) <= keys | own
    assert all(isinstance(rule, Number) for rule in NUMBERS.values())


def test_a_numeric_key_without_an_entry_is_refused_by_the_program(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class NewConfig:
        mystery_knob: float = 1.0

    with pytest.raises(TypeError, match=r"NewConfig.mystery_knob: no number range for it in NUMBERS"):
        parse_config([], NewConfig)


def candidates(rule: Number, integer: bool) -> list:
    """The values to try on a key: not numbers at all, NaN and infinities, zero,
    negatives, huge ones, each bound and the values just past it."""
    values = [float("nan"), math.inf, -math.inf, 0, -1, 1, 2, 10**30, -(10**30), 2**63]
    values += [0.0, -1.0, 0.5, 1e300, -1e300, 5e-324] if not integer else [2.5, True]
    for bound in (rule.low, rule.high):
        if math.isfinite(bound):
            values += [bound, bound - 1, bound + 1] if integer else \
                [float(bound), math.nextafter(bound, -math.inf), math.nextafter(bound, math.inf)]
    return values


def in_range(rule: Number, integer: bool, value) -> bool:
    """The entry's meaning, computed here without the code under test."""
    if isinstance(value, bool) or (integer and not isinstance(value, int)):
        return False
    if not math.isfinite(value):
        return False
    above_low = value > rule.low if rule.low_open else value >= rule.low
    below_high = value < rule.high if rule.high_open else value <= rule.high
    return above_low and below_high


def outcome(build, *args, **kwargs) -> str | None:
    """None when the config was built, else a ConfigError's message; any other exception fails the test."""
    try:
        build(*args, **kwargs)
    except ConfigError as e:
        return str(e)
    return None


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_value_is_accepted_or_refused_naming_the_key(cls):
    for key, integer in numeric_keys(cls):
        rule = number_rule(cls, key)
        for value in candidates(rule, integer):
            direct = outcome(cls, **CLASSES[cls], **{key: value})
            # from the command line, as a user types it (a float where an int is due is refused there too)
            typed = outcome(parse_config, [*required_argv(cls), f"--{key}", repr(value)], cls)
            for message in (direct, typed):
                if in_range(rule, integer, value):
                    # accepted, or refused by a rule between keys (num_epochs 0 without max_steps, ...)
                    assert message is None or f"'{key}'" in message, (key, value, message)
                else:
                    assert message is not None and f"'{key}'" in message, (key, value, message)
                    assert len(message) < 300 and "\n" not in message
            if direct is not None and not in_range(rule, integer, value):
                assert direct.startswith(f"key '{key}' must be ") and ", got " in direct, direct


@pytest.mark.parametrize("cls,argv,message", [
    (PretrainConfig, ["--learning_rate", "inf"], "key 'learning_rate' must be a finite number > 0, got inf"),
    (SFTConfig, ["--lora_alpha", "inf"], "key 'lora_alpha' must be a finite number in (0, 2^16], got inf"),
    (SFTConfig, ["--lora_alpha", "nan"], "key 'lora_alpha' must be a finite number in (0, 2^16], got nan"),
    (DPOConfig, ["--pref_beta", "nan"], "key 'pref_beta' must be a finite number > 0, got nan"),
    (DPOConfig, ["--pref_beta", "inf"], "key 'pref_beta' must be a finite number > 0, got inf"),
    (DPOConfig, ["--max_chosen_logp_drop", "nan"], "key 'max_chosen_logp_drop' must be a finite number"),
    (DPOConfig, ["--sft_weight", "-1"], "key 'sft_weight' must be >= 0, got -1.0"),
    (PretrainConfig, ["--train_micro_batch_size_per_gpu", "1e12"],
     "key 'train_micro_batch_size_per_gpu' must be at most 2^22, got 1000000000000"),
    (PretrainConfig, ["--train_micro_batch_size_per_gpu", "4096", "--cutoff_len", "2048"],
     ("keys 'train_micro_batch_size_per_gpu' x 'cutoff_len' must be at most 4,194,304 tokens per micro-step, "
      "got 4096 x 2048")),
    (SFTConfig, ["--lora_rank", "1000000000"], "key 'lora_rank' must be at most 4096, got 1000000000"),
    (PretrainConfig, ["--vocab_size", "1e12"], "key 'vocab_size' must be at most 2^20"),
    (PretrainConfig, ["--collective_timeout_minutes", "1e300"], "key 'collective_timeout_minutes' must be <="),
    (PretrainConfig, ["--num_epochs", "1e300"], "key 'num_epochs' must be <="),
    (ServeConfig, ["--temperature", "nan"], "key 'temperature' must be a finite number >= 0 (0: greedy), got nan"),
    (ChatConfig, ["--repetition_penalty", "inf"], "key 'repetition_penalty' must be a finite number > 0"),
])
def test_values_that_were_trained_with_are_refused(cls, argv, message):
    with pytest.raises(ConfigError) as error:
        parse_config(argv, cls)
    assert str(error.value).startswith(message)


def test_bounds_are_where_the_table_says():
    assert parse_config(["--seed", str(2**32 - 1)], PretrainConfig).seed == 2**32 - 1
    with pytest.raises(ConfigError, match=r"^key 'seed' must be < 2\^32, got 4294967296$"):
        parse_config(["--seed", str(2**32)], PretrainConfig)
    assert parse_config(["--seed", "-1"], ChatConfig).seed == -1  # chat's own seed: -1 is a random one
    assert parse_config(["--max_grad_norm", "-1"], PretrainConfig).max_grad_norm == -1  # no clipping
    assert parse_config(["--eval_steps", "0", "--save_steps", "-1"], PretrainConfig).save_steps == -1
    with pytest.raises(ConfigError, match=r"^key 'eval_steps' must be >= -1 \(<= 0: only at the end\), got -2$"):
        parse_config(["--eval_steps", "-2"], PretrainConfig)
    cfg = parse_config(["--train_micro_batch_size_per_gpu", "2048", "--cutoff_len", "2048"], PretrainConfig)
    assert cfg.train_micro_batch_size_per_gpu * cfg.cutoff_len == 2**22  # the most tokens a micro-step may hold
