"""Training configuration: dataclass defaults < YAML file < command line.

    python train_pretrain.py --yaml_config configs/pretrain/pretrain_full.yaml --learning_rate 3e-4

Every key is a field of the script's config dataclass (PretrainConfig, ...). A key that does not exist, or a value of
the wrong type, is an error that names the key (and the closest valid keys),
so a typo never silently trains with a default.

A field without a default is required. A field annotated list[str] takes every
word after its --key up to the next --key (from YAML: a list). A class may name
one field in POSITIONAL (a class attribute, e.g. POSITIONAL = "output_dir"): a
word on the command line that follows no key is then that field's value.

Every numeric key of every config class (the programs' too: prepare, evaluate,
serve, ...) has its range in one table, NUMBERS below: finite, its bounds, an
integer or not, and a ceiling where a huge value would only exhaust memory.
parse_config and each config's __post_init__ apply it; a numeric field without
an entry is an error (a TypeError, and tests/unit/test_number_table.py walks the
table for every class). Rules between keys stay in the classes' __post_init__.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import io
import re
import sys
import tokenize
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any

import yaml

from nanobumble.base.errors import ConfigError
from nanobumble.base.precision import PRECISIONS
from nanobumble.base.reading import Number, cut, read_yaml
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT
from nanobumble.model.layers import KERNEL_MODES
from nanobumble.model.lora import LORA_ALPHA, LORA_DROPOUT, LORA_RANK

# Tokens in one micro-step (micro-batch x cutoff_len): 32 MB of int64 ids on the
# host, and far past what a GPU's activations hold; beyond it a run can only die
# of memory, so it is refused before anything is loaded.
MAX_MICRO_BATCH_TOKENS = 2**22
FEWSHOT = Number(0, 100, integer=True)  # solved examples before each question

# The values every numeric key accepts, by key name (a key means the same in every
# class that has it); "Class.key" where one class's key means something else.
# Ceilings (2^40 steps, 1024 workers, ...) are where a value stops being a setting.
NUMBERS: dict[str, Number] = {
    # TrainConfig: every training stage
    "preprocessing_num_workers": Number(0, 1024, integer=True, note="0: all CPUs"),
    "cutoff_len": Number(1, MAX_MICRO_BATCH_TOKENS, integer=True),
    "num_epochs": Number(0, 1e6, note="used when max_steps <= 0"),
    "max_steps": Number(-1, 2**40, integer=True, note="<= 0: num_epochs decides"),
    "learning_rate": Number(0, low_open=True),
    "weight_decay": Number(0),
    "warmup_ratio": Number(0, 1, high_open=True),
    "min_lr_ratio": Number(0, 1),
    "adam_beta1": Number(0, 1, high_open=True),
    "adam_beta2": Number(0, 1, high_open=True),
    "max_grad_norm": Number(note="<= 0: no clipping"),
    "train_micro_batch_size_per_gpu": Number(1, MAX_MICRO_BATCH_TOKENS, integer=True),
    "gradient_accumulation_steps": Number(1, 2**16, integer=True),
    "logging_steps": Number(1, 2**40, integer=True),
    "val_ratio": Number(0, 1, high_open=True),
    "eval_steps": Number(-1, 2**40, integer=True, note="<= 0: only at the end"),
    "eval_rows": Number(1, 2**24, integer=True),
    "save_steps": Number(-1, 2**40, integer=True, note="<= 0: only the final model"),
    "save_total_limit": Number(-1, 2**20, integer=True, note="<= 0: keeps all"),
    "seed": Number(0, 2**32, integer=True, high_open=True),  # numpy's seeds are 32-bit
    "collective_timeout_minutes": Number(0, 1e5, low_open=True),
    # PretrainConfig, and prepare.py's PrepareConfig
    "vocab_size": Number(1, 2**20, integer=True),
    "tokenizer_sample_mb": Number(0, 2**20, low_open=True),
    # FinetuneConfig (SFT and DPO): LoRA's ranges are model/lora.py's, also applied to adapter_config.json
    "lora_rank": LORA_RANK,
    "lora_alpha": LORA_ALPHA,
    "lora_dropout": LORA_DROPOUT,
    "eval_num_fewshot": FEWSHOT,
    # DPOConfig
    "pref_beta": Number(0, low_open=True),
    "label_smoothing": Number(0, 0.5, high_open=True),
    "ld_alpha": Number(0, 1),
    "sft_weight": Number(0),  # negative would train the chosen answers' likelihood down
    "max_chosen_logp_drop": Number(note="<= 0: never warn"),
    # The programs: prepare, evaluate, export_hf, serve, chat
    "num_workers": Number(0, 1024, integer=True, note="0: all CPUs"),
    "shard_tokens": Number(1, 2**31, integer=True, high_open=True),
    "num_fewshot": FEWSHOT,
    "limit": Number(0, 2**40, note="0: every item; 0 < limit < 1: that fraction of each task"),
    "smoothing": Number(0, 1, high_open=True, note="0: raw lines only"),
    "batch_size": Number(1, 4096, integer=True),
    "max_new_tokens": Number(1, 2**20, integer=True),
    "max_shard_size_gb": Number(0, low_open=True),
    "port": Number(1, 65535, integer=True),
    "max_batch": Number(1, 256, integer=True),
    "temperature": Number(0, note="0: greedy"),
    "top_p": Number(0, 1, low_open=True),
    "top_k": Number(-1, 2**20, integer=True, note="<= 0: off"),
    "repetition_penalty": Number(0, low_open=True),
    "ChatConfig.seed": Number(-1, 2**32, integer=True, high_open=True, note="-1: a random seed"),
    # every program that runs the model (training stages, chat, serve, evaluate): base/cpu.py
    "num_threads": Number(0, 4096, integer=True, note="0: the free cores, shared between local ranks"),
    # sample_pairs
    "num_samples": Number(1, 1024, integer=True),
    "pairs_per_prompt": Number(1, 2**20, integer=True),
}


def number_rule(cls: type, key: str) -> Number:
    """The entry of NUMBERS for a numeric key of cls. None is a TypeError: a new
    numeric key needs its range stated before any config holding it is built."""
    own = (NUMBERS.get(f"{klass.__name__}.{key}") for klass in cls.__mro__)
    rule = next((rule for rule in own if rule), NUMBERS.get(key))
    integer = _field_types(cls)[key] is int
    if rule is None or rule.integer != integer:
        raise TypeError(f"{cls.__name__}.{key}: no {'integer' if integer else 'number'} range for it in NUMBERS "
                        f"(nanobumble/run/config.py)")
    return rule


def _check_values(cls: type, values: dict[str, Any]) -> None:
    for key, kind in _field_types(cls).items():
        if kind in (int, float):
            rule = number_rule(cls, key)
            if key in values:
                rule.check(key, values[key])


def check_numbers(config) -> None:
    """Every numeric key of a config (a dataclass) within its range in NUMBERS, or
    a ConfigError naming the key: the first line of each config's __post_init__."""
    _check_values(type(config), vars(config))


@dataclass
class TrainConfig:
    """Keys every training stage shares. Each stage's config below adds its own
    keys and its own defaults (the defaults are that stage's tiny demo)."""
    stage: str = ""  # fixed per script (pretrain, sft, dpo); recorded in training_args.yaml
    # --- model, data, output ---
    model_name_or_path: str = "tiny"  # preset name (tiny, bumblebee-1.5b) or model directory
    dataset_path: str = ""  # JSON/JSONL/Parquet files, a directory of them, or a comma-separated list
    output_dir: str = ""  # where checkpoints, the final model, metrics.jsonl and plots go
    strict: bool = False  # stop at the first malformed record instead of skipping it
    cache_dir: str = "cache"  # tokenized data (and trained tokenizers), keyed by their inputs
    preprocessing_num_workers: int = 0  # processes that tokenize the data once (0: all CPUs)
    cutoff_len: int = 256  # tokens per training sequence
    # --- schedule ---
    num_epochs: float = 1.0  # passes over the training data (used when max_steps <= 0)
    max_steps: int = -1  # optimizer steps; overrides num_epochs when > 0
    learning_rate: float = 1e-3  # peak learning rate, reached after the warmup
    weight_decay: float = 0.1  # AdamW's decoupled weight decay (matrices only: not norms, biases, embeddings)
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.05  # share of the steps over which the learning rate rises linearly from 0
    min_lr_ratio: float = 0.1  # the schedule decays to learning_rate * min_lr_ratio
    adam_beta1: float = 0.9  # AdamW's decay of the running mean of gradients
    adam_beta2: float = 0.95  # AdamW's decay of the running mean of squared gradients
    max_grad_norm: float = 1.0  # <= 0 turns clipping off
    train_micro_batch_size_per_gpu: int = 8  # rows per forward on each process
    gradient_accumulation_steps: int = 1  # micro-batches summed into each optimizer step
    # --- numerics and speed ---
    train_model_precision: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | bf16 | fp32
    # CPU threads for PyTorch's operations; 0: the free physical cores (those other processes do not keep busy
    # at start), shared between the ranks on this machine (base/cpu.py); the choice is printed at start
    num_threads: int = 0
    # auto: the cheapest of none / selective / full whose memory plan fits the device (run/memory.py);
    # true: full (each block recomputed in backward); false: none; selective: only the MLP sublayer recomputed
    enable_gradient_checkpointing: str = "auto"
    memory_check: bool = True  # refuse a run whose memory plan (printed at start) does not fit the device
    compile: bool = False  # torch.compile each transformer block
    # auto: one CUDA process also runs FSDP2 (on a one-rank mesh), so 1 and N GPUs compute alike: bf16
    # parameters, fp32 master weights and gradients; true: also on CPU (to test that path); false: plain autocast
    single_process_fsdp: str = "auto"
    kernels: str = "auto"  # auto (Triton on CUDA) | triton | torch (plain PyTorch, model/layers.py)
    # --- logging, checkpoints ---
    logging_steps: int = 10  # print and log the training metrics every N steps
    val_ratio: float = 0.05  # share of the data held out for validation (0: none)
    eval_steps: int = 100  # validate every N steps, and at the end (<= 0: only at the end)
    # held-out rows (DPO: pairs) per evaluation: the same ones every time, whatever the ranks or batch sizes
    eval_rows: int = 160
    save_steps: int = 100  # <= 0: only the final model
    save_total_limit: int = 2  # newest checkpoints kept; <= 0 keeps all
    use_tensorboard: bool = True  # also write TensorBoard event files into output_dir
    plot: bool = True  # draw the curves of metrics.jsonl into output_dir/plots/ at the end (needs matplotlib)
    seed: int = 42  # model initialisation, data order, dropout and LoRA initialisation
    resume: str = ""  # "" = fresh run, "auto" = newest intact checkpoint in output_dir, or a checkpoint dir
    allow_schedule_change: bool = False  # resume with another learning_rate, scheduler, warmup or length
    overwrite_output_dir: bool = False  # a fresh run may replace the model and checkpoints in output_dir
    collective_timeout_minutes: float = 10.0  # ranks give up on a rank that stops answering after this long

    def __post_init__(self):
        check_numbers(self)
        if self.stage != type(self).stage:
            raise ConfigError(f"key 'stage' is {type(self).stage!r} for this script, got {self.stage!r} "
                              f"(a training_args.yaml from another stage?)")
        _check_choice(self, "lr_scheduler_type", ("cosine", "linear", "constant"))
        _check_choice(self, "train_model_precision", PRECISIONS)
        _check_choice(self, "kernels", KERNEL_MODES)
        checkpointing = str(self.enable_gradient_checkpointing).strip().lower()  # YAML's true arrives as a bool
        self.enable_gradient_checkpointing = ("true" if checkpointing in _TRUE else
                                              "false" if checkpointing in _FALSE else checkpointing)
        _check_choice(self, "enable_gradient_checkpointing", ("auto", "true", "false", "selective"))
        fsdp = str(self.single_process_fsdp).strip().lower()
        self.single_process_fsdp = "true" if fsdp in _TRUE else "false" if fsdp in _FALSE else fsdp
        _check_choice(self, "single_process_fsdp", ("auto", "true", "false"))
        if self.max_steps <= 0 and self.num_epochs <= 0:
            raise ConfigError(f"set key 'max_steps' > 0 or key 'num_epochs' > 0, got {self.max_steps} and "
                              f"{self.num_epochs}")
        tokens = self.train_micro_batch_size_per_gpu * self.cutoff_len
        if tokens > MAX_MICRO_BATCH_TOKENS:
            raise ConfigError(f"keys 'train_micro_batch_size_per_gpu' x 'cutoff_len' must be at most "
                              f"{MAX_MICRO_BATCH_TOKENS:,} tokens per micro-step, got "
                              f"{self.train_micro_batch_size_per_gpu} x {self.cutoff_len}")


def _check_range(config, key: str, ok, what: str) -> None:
    """A rule NUMBERS cannot state (e.g. a list that must not be empty)."""
    value = getattr(config, key)
    if not ok(value):
        raise ConfigError(f"key '{key}' must be {what}, got {cut(value)}")


def _check_choice(config, key: str, allowed: tuple[str, ...]) -> None:
    if getattr(config, key) not in allowed:
        raise ConfigError(f"key '{key}' must be one of {', '.join(allowed)}, got {cut(repr(getattr(config, key)))}")


@dataclass
class PretrainConfig(TrainConfig):
    stage: str = "pretrain"
    dataset_path: str = "datasets/pretrain"
    output_dir: str = "checkpoints/pretrain/tiny_base"
    num_epochs: float = 6.0
    tokenizer_path: str = ""  # sentencepiece .model or a model directory; "" = train one on the data
    vocab_size: int = 4096  # size of a tokenizer trained on the data
    tokenizer_sample_mb: float = 80.0  # a new tokenizer learns from this much of the text (bounds its memory)
    val_ratio: float = 0.01  # share of documents held out for validation


@dataclass
class FinetuneConfig(TrainConfig):
    """Keys shared by SFT and DPO: what to train (all weights or LoRA adapters) and the chat template."""
    finetuning_type: str = "full"  # full | lora
    lora_rank: int = 8  # r: each adapter is B (out x r) times A (r x in)
    lora_alpha: float = 16.0  # adapters are scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.05  # dropout on the adapters' input while training
    # comma-separated; also gate_proj,up_proj,down_proj, or all
    lora_target_modules: str = "q_proj,k_proj,v_proj,o_proj"
    use_rslora: bool = False  # scale adapters by alpha/sqrt(rank) instead of alpha/rank
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # added when a conversation has none; "" for no system turn
    eval_dataset_path: str = ""  # held-out data to validate on, instead of a val_ratio share of dataset_path
    eval_tasks: str = ""  # benchmark task files or directories, comma-separated, run at eval_steps (see evaluate.py)
    eval_num_fewshot: int = 0  # examples from each task's dev split put before every question

    def __post_init__(self):
        super().__post_init__()
        _check_choice(self, "finetuning_type", ("full", "lora"))


@dataclass
class SFTConfig(FinetuneConfig):
    stage: str = "sft"
    model_name_or_path: str = "checkpoints/pretrain/tiny_base"
    dataset_path: str = "datasets/sft"
    output_dir: str = "checkpoints/sft/tiny_instruct"
    # SFT and DPO defaults: chosen with tests/bench_quality.py (README: "Choosing the defaults")
    num_epochs: float = 10.0
    learning_rate: float = 1e-3
    packing: bool = False  # pack several conversations into each row of cutoff_len tokens


@dataclass
class DPOConfig(FinetuneConfig):
    stage: str = "dpo"
    model_name_or_path: str = "checkpoints/sft/tiny_instruct"
    dataset_path: str = "datasets/dpo"
    output_dir: str = "checkpoints/dpo/tiny_dpo_lora"
    finetuning_type: str = "lora"
    num_epochs: float = 1.0
    learning_rate: float = 2e-5
    train_micro_batch_size_per_gpu: int = 4  # pairs: each forward runs 2x this many rows
    pref_beta: float = 0.5  # strength of the pull toward the reference model
    pref_loss: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge
    label_smoothing: float = 0.0  # conservative DPO (sigmoid only): assumed share of flipped preference labels
    ld_alpha: float = 1.0  # LD-DPO: weight of response tokens past the shorter response (1 = plain DPO)
    sft_weight: float = 1.0  # adds sft_weight x the NLL of the chosen responses
    precompute_ref_log_probs: bool = False  # reference log-probs once before training, then drop the reference
    # Likelihood displacement: warn when the chosen answers' mean log-prob per token falls
    # this many nats below the reference's on the validation pairs (<= 0: never warn)
    max_chosen_logp_drop: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        _check_choice(self, "pref_loss", ("sigmoid", "ipo", "hinge"))
        if self.label_smoothing and self.pref_loss != "sigmoid":  # cDPO smooths the sigmoid loss; others ignore it
            raise ConfigError(f"key 'label_smoothing' ({self.label_smoothing}) is conservative DPO, for "
                              f"pref_loss 'sigmoid' only; key 'pref_loss' {self.pref_loss!r} would ignore it")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(key: str, value: Any, kind: type, source: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or explain why not."""
    def bad() -> ConfigError:
        return ConfigError(f"{source}: key '{key}' expects {kind.__name__}, got {cut(repr(value))}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad()
    if kind is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)  # accepts "1000" and "1e3"
            except ValueError:
                raise bad() from None
            if number.is_integer():
                return int(number)
        raise bad()
    if kind is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float, str)):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                raise bad() from None
            except OverflowError:  # an integer of hundreds of digits
                raise ConfigError(f"{source}: key '{key}' is beyond any float, got {cut(repr(value))}") from None
        raise bad()
    if kind is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise bad()
        return str(value)
    if kind is list:  # list[str]: a YAML list, or the words after --key
        if not isinstance(value, list):
            raise bad()
        if any(item is None or isinstance(item, (dict, list)) for item in value):
            raise ConfigError(f"{source}: key '{key}' expects a list of strings, got {cut(repr(value))}")
        return [str(item) for item in value]
    raise TypeError(f"unsupported config field type {kind}")


_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "list[str]": list}


def _field_type(annotation: Any) -> type:
    if isinstance(annotation, str):  # under `from __future__ import annotations`
        return _TYPES[annotation.replace(" ", "")]
    if typing.get_origin(annotation) is list and typing.get_args(annotation) == (str,):
        return list
    return annotation


@functools.cache  # a class's fields never change; the number checks ask for them per key
def _field_types(cls: type) -> dict[str, type]:
    return {f.name: _field_type(f.type) for f in fields(cls)}


def _positional(cls: type) -> str:
    """The field a bare command-line word sets (the class attribute POSITIONAL), or ""."""
    name = getattr(cls, "POSITIONAL", "")
    if name and _field_types(cls).get(name, list) is list:
        raise TypeError(f"{cls.__name__}.POSITIONAL must name a field that is not a list, got {name!r}")
    return name


# Keys that were renamed: the old name, and what to write now.
RENAMED = {"eval_batches": "eval_rows (held-out rows, not batches: the old value x train_micro_batch_size_per_gpu)"}


def _unknown_key(key: str, valid: list[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    if key in RENAMED:
        hint = f"; it is now {RENAMED[key]}"
    return ConfigError(f"{source}: unknown key {cut(repr(key))}{hint} (run with --help to list all keys)")


def _split_command_line(argv: list[str], types: dict[str, type] | None = None,
                        positional: str = "") -> list[tuple[str, Any]]:
    """['--a', '1', '--b=2', '--flag'] -> [('a', '1'), ('b', '2'), ('flag', 'true')].

    A key whose type in `types` is list takes every word up to the next --key:
    ['--l', 'x', 'y'] -> [('l', ['x', 'y'])]. So does a key not in `types`, so
    that parse_config reports the unknown key rather than its second word. With
    a `positional` field, the first word that follows no key is its value."""
    types = types or {}
    pairs: list[tuple[str, Any]] = []
    positional_taken = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or len(arg) == 2:
            if positional and not positional_taken and arg != "--":
                pairs.append((positional, arg))
                positional_taken = True
                continue
            raise ConfigError(f"command line: expected --key value, got {cut(repr(arg))}")
        key, equals, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        is_list = types.get(key) is list
        if equals:  # --key=value
            if is_list:
                if not value:
                    raise ConfigError(f"command line: key '{key}' expects one or more values")
                value = [value]
        elif is_list or (key not in types and key != "yaml_config"):
            end = i
            while end < len(argv) and not argv[end].startswith("--"):
                end += 1
            words, i = argv[i:end], end
            if is_list and not words:
                raise ConfigError(f"command line: key '{key}' expects one or more values (--{key} A B ...)")
            value = words if is_list else words[0] if len(words) == 1 else words or "true"
        elif i < len(argv) and not argv[i].startswith("--"):
            value = argv[i]
            i += 1
        else:
            value = "true"  # a bare --flag switches a boolean on
        pairs.append((key, value))
    return pairs


def _required(cls: type) -> list[str]:
    """The fields without a default: the keys a run must give."""
    return [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]


def _help_defaults(cls: type, defaults: dict[str, Any] | None) -> dict[str, Any]:
    """Each key's default, without building the config (whose checks a default may fail)."""
    values = {}
    for f in fields(cls):
        if f.default is not MISSING:
            values[f.name] = f.default
        elif f.default_factory is not MISSING:
            values[f.name] = f.default_factory()
    values.update(defaults or {})
    return values


def key_descriptions(cls: type) -> dict[str, str]:
    """Each key's description, for --help: the comment on its line in the config class
    (or the comment lines just above it), read from the source, so the code and
    --help say the same thing."""
    described: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins over its base's
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # no source (a frozen install): --help lists the keys bare
            continue
        above: list[str] = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("# "))
                continue
            match = re.match(r"\s+(\w+)\s*:[^=]*(=.*)?$", line)
            if match and match.group(1) in klass.__dataclass_fields__:
                key = match.group(1)
                # the comment lines just above, unless a section title ("--- schedule ---"), say
                # what a key is only where nothing else does (not a subclass's note on its default)
                above = [text for text in above if not text.startswith("---")]
                text = _trailing_comment(line) or (" ".join(above) if key not in described else "")
                if text:
                    described[key] = text
            above = []
    return described


def _trailing_comment(line: str) -> str:
    """The comment ending a line of code ("" if none), found by tokenizing it (a # in a string is not one)."""
    try:
        for token in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline):
            if token.type == tokenize.COMMENT:
                return token.string.lstrip("# ").strip()
    except (tokenize.TokenError, SyntaxError):
        pass
    return ""


def format_help(cls: type, defaults: dict[str, Any] | None = None) -> str:
    values = _help_defaults(cls, defaults)
    types = _field_types(cls)
    positional = _positional(cls)
    usage = "--yaml_config FILE --key value ...  (command line > YAML > defaults)"
    if positional:
        usage = f"{positional.upper()} (or --{positional} {positional.upper()}) {usage}"
    lines = [f"usage: {usage}", "keys:"]
    descriptions = key_descriptions(cls)
    for f in fields(cls):
        shown = repr(values[f.name]) if f.name in values else "(required)"
        if types[f.name] is list:
            shown += f"  (a list: --{f.name} A B ...)"
        lines.append(f"  --{f.name} {shown}")
        if f.name in descriptions:
            lines.append(f"      {descriptions[f.name]}")
    return "\n".join(lines)


def parse_config(argv: list[str], cls: type, defaults: dict[str, Any] | None = None):
    """Build a config from per-script defaults, an optional YAML file and overrides."""
    if any(a in ("-h", "--help") for a in argv):
        print(format_help(cls, defaults))
        sys.exit(0)
    types = _field_types(cls)
    valid = list(types)
    values: dict[str, Any] = dict(defaults or {})
    positional = _positional(cls)
    pairs = _split_command_line(argv, types, positional)
    if positional and sum(key == positional for key, _ in pairs) > 1:
        raise ConfigError(f"command line: {positional} given twice ({positional.upper()} and --{positional})")

    yaml_files = [v for k, v in pairs if k == "yaml_config"]
    if len(yaml_files) > 1:
        raise ConfigError("command line: --yaml_config given more than once")
    if yaml_files:
        path = yaml_files[0]
        loaded = read_yaml(path, error=ConfigError)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
        for key, value in loaded.items():
            if key not in types:
                raise _unknown_key(str(key), valid, path)
            values[key] = _coerce(key, value, types[key], path)

    for key, value in pairs:
        if key == "yaml_config":
            continue
        if key not in types:
            raise _unknown_key(key, valid, "command line")
        values[key] = _coerce(key, value, types[key], "command line")
    missing = [key for key in _required(cls) if key not in values]
    if missing:
        how = ", ".join(f"{key.upper()} or --{key}" if key == positional else f"--{key}" for key in missing)
        names = ", ".join(f"'{key}'" for key in missing)
        raise ConfigError(f"key {names} is required ({how})" if len(missing) == 1
                          else f"keys {names} are required ({how})")
    _check_values(cls, values)  # before __post_init__, whose rules between keys expect numbers in range
    return cls(**values)


def config_to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_to_yaml(config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)
