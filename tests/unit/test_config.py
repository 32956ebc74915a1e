from dataclasses import dataclass, field
from itertools import pairwise

import pytest

from nanobumble.base.errors import ConfigError
from nanobumble.evaluate import EvalConfig
from nanobumble.plot import PlotConfig
from nanobumble.run.config import DPOConfig, PretrainConfig, SFTConfig, config_to_yaml, format_help, parse_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_yaml_and_command_line_precedence(tmp_path):
    path = write(tmp_path, "learning_rate: 1e-4\ncutoff_len: 128\nuse_tensorboard: false\n")
    cfg = parse_config(["--yaml_config", path, "--cutoff_len", "64"], PretrainConfig)
    assert cfg.learning_rate == 1e-4  # YAML over default ("1e-4" is a string to YAML 1.1)
    assert cfg.cutoff_len == 64  # command line over YAML
    assert cfg.use_tensorboard is False
    assert cfg.seed == PretrainConfig().seed  # untouched default
    cfg = parse_config([f"--yaml_config={path}", "--cutoff_len=32"], PretrainConfig)
    assert cfg.cutoff_len == 32


def test_script_defaults_sit_below_yaml(tmp_path):
    path = write(tmp_path, "cutoff_len: 128\n")
    cfg = parse_config(["--yaml_config", path], PretrainConfig, defaults={"cutoff_len": 512, "seed": 7})
    assert cfg.cutoff_len == 128 and cfg.seed == 7


@pytest.mark.parametrize("text,expected", [("true", True), ("1", True), ("False", False), ("0", False)])
def test_booleans(text, expected):
    assert parse_config(["--strict", text], PretrainConfig).strict is expected


def test_numbers_parse_as_numbers():
    cfg = parse_config(["--max_steps", "1e3", "--learning_rate", "3e-4", "--max_grad_norm", "2"], PretrainConfig)
    assert cfg.max_steps == 1000 and isinstance(cfg.max_steps, int)
    assert cfg.learning_rate == 3e-4 and isinstance(cfg.max_grad_norm, float)
    assert parse_config(["--max_steps", "-1"], PretrainConfig).max_steps == -1


def test_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'learnig_rate'.*learning_rate"):
        parse_config(["--learnig_rate", "1"], PretrainConfig)
    path = write(tmp_path, "save_step: 10\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'save_step'.*save_steps"):
        parse_config(["--yaml_config", path], PretrainConfig)
    with pytest.raises(ConfigError, match=r"unknown key 'eval_batches'; it is now eval_rows \(held-out rows"):
        parse_config(["--eval_batches", "2"], PretrainConfig)


@pytest.mark.parametrize("argv,key", [
    (["--max_steps", "ten"], "max_steps"),
    (["--max_steps", "2.5"], "max_steps"),
    (["--strict", "maybe"], "strict"),
    (["--learning_rate", "fast"], "learning_rate"),
    (["--lr_scheduler_type", "exponential"], "lr_scheduler_type"),
    (["--cutoff_len", "0"], "cutoff_len"),
    (["--learning_rate", "nan"], "learning_rate"),
    (["--learning_rate", "-1e-3"], "learning_rate"),
    (["--min_lr_ratio", "-5"], "min_lr_ratio"),
    (["--adam_beta1", "1.5"], "adam_beta1"),
    (["--adam_beta2", "nan"], "adam_beta2"),
    (["--weight_decay", "-0.1"], "weight_decay"),
    (["--max_grad_norm", "inf"], "max_grad_norm"),
    (["--seed", "-1"], "seed"),
    (["--collective_timeout_minutes", "0"], "collective_timeout_minutes"),
    (["--collective_timeout_minutes", "inf"], "collective_timeout_minutes"),
])
def test_bad_values_name_the_key(argv, key):
    with pytest.raises(ConfigError, match=key):
        parse_config(argv, PretrainConfig)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        parse_config(["--yaml_config", str(tmp_path / "missing.yaml")], PretrainConfig)
    with pytest.raises(ConfigError, match="mapping"):
        parse_config(["--yaml_config", write(tmp_path, "- a\n- b\n")], PretrainConfig)
    with pytest.raises(ConfigError, match="expects int"):
        parse_config(["--yaml_config", write(tmp_path, "seed: [1, 2]\n")], PretrainConfig)


def alias_bomb(levels: int = 7) -> str:
    """~300 bytes of YAML whose last alias expands to 9^levels strings."""
    names = "abcdefghij"[:levels]
    lines = ["seed:", "  - &a [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"  - &{name} [" + ", ".join([f"*{previous}"] * 9) + "]" for previous, name in pairwise(names)]
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_one_short_line(tmp_path):
    path = write(tmp_path, alias_bomb())
    with pytest.raises(ConfigError) as error:
        parse_config(["--yaml_config", path], PretrainConfig)
    message = str(error.value)
    assert message.startswith(f"{path}: not valid YAML (line 3, column 9: an alias (*name)")
    assert len(message) < 300


@pytest.mark.parametrize("content,message", [
    (b"output_dir: caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 15)"),
    (b"seed: " + b"[" * 1000 + b"]" * 1000, "not valid YAML (line 1, column 106: nested deeper than 100 levels)"),
    (b"seed: " + b"9" * 5000, "not valid YAML (Exceeds the limit (4300 digits) for integer string conversion"),
    (b"seed: 1\n" + b"#" * 2**20, "1.0 MB, more than the 1.0 MB such a file may be"),
])
def test_a_yaml_config_that_cannot_be_read_is_one_line(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as error:
        parse_config(["--yaml_config", str(path)], PretrainConfig)
    assert str(error.value).startswith(f"{path}: {message}")


def test_a_yaml_config_that_is_a_directory_or_has_a_byte_order_mark(tmp_path):
    with pytest.raises(ConfigError, match=f"^{tmp_path}: is a directory, not a file$"):
        parse_config(["--yaml_config", str(tmp_path)], PretrainConfig)
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufeffseed: 7\n".encode())
    assert parse_config(["--yaml_config", str(path)], PretrainConfig).seed == 7
    anchored = write(tmp_path, "seed: &s 7\n")  # an anchor alone expands nothing: fine
    assert parse_config(["--yaml_config", anchored], PretrainConfig).seed == 7


def test_long_values_are_cut_in_messages(tmp_path):
    with pytest.raises(ConfigError) as error:
        parse_config(["--yaml_config", write(tmp_path, "seed: [" + "1, " * 100_000 + "1]\n")], PretrainConfig)
    assert "key 'seed' expects int, got [1, 1, 1" in str(error.value) and len(str(error.value)) < 300
    with pytest.raises(ConfigError) as error:
        parse_config(["--" + "x" * 100_000, "1"], PretrainConfig)
    assert "unknown key 'xxx" in str(error.value) and len(str(error.value)) < 300


def test_stage_is_fixed_per_script(tmp_path):
    # training_args.yaml records the stage; feeding one stage's file to another script is refused.
    assert parse_config([], PretrainConfig).stage == "pretrain"
    with pytest.raises(ConfigError, match="stage"):
        parse_config(["--yaml_config", write(tmp_path, "stage: sft\n")], PretrainConfig)


def test_training_args_yaml_reproduces_the_config(tmp_path):
    from nanobumble.run.config import config_to_yaml
    cfg = parse_config(["--learning_rate", "3e-4", "--strict", "true"], PretrainConfig)
    again = parse_config(["--yaml_config", write(tmp_path, config_to_yaml(cfg))], PretrainConfig)
    assert again == cfg


def test_every_bundled_recipe_parses():
    import glob
    import os

    from conftest import REPO_ROOT

    stage_config = {"pretrain": PretrainConfig, "sft": SFTConfig, "dpo": DPOConfig}
    files = glob.glob(os.path.join(REPO_ROOT, "configs", "*", "*.yaml"))
    assert len(files) >= 6
    for path in files:
        stage = os.path.basename(os.path.dirname(path))
        parse_config(["--yaml_config", path], stage_config[stage])


# --- lists, a positional, required keys (the programs: evaluate, plot, merge_lora, prepare) ---------

def test_a_list_key_takes_every_word_up_to_the_next_key():
    cfg = parse_config(["--model_path", "m", "--tasks", "a.csv", "dir/", "--num_fewshot", "1"], EvalConfig)
    assert cfg.tasks == ["a.csv", "dir/"] and cfg.num_fewshot == 1 and cfg.model_path == "m"
    assert parse_config(["--tasks=a", "--model_path=m"], EvalConfig).tasks == ["a"]
    assert parse_config(["--tasks", "a", "--model_path", "m", "--tasks", "b", "c"], EvalConfig).tasks == ["b", "c"]
    assert parse_config(["--model_path", "m", "--tasks", "a=b", "-1"], EvalConfig).tasks == ["a=b", "-1"]


def test_a_list_key_from_yaml(tmp_path):
    path = write(tmp_path, "model_path: m\ntasks: [a.csv, dir/, 7]\nbatch_size: 2\n")
    cfg = parse_config(["--yaml_config", path], EvalConfig)
    assert cfg.tasks == ["a.csv", "dir/", "7"] and cfg.batch_size == 2
    assert parse_config(["--yaml_config", path, "--tasks", "b"], EvalConfig).tasks == ["b"]  # command line wins
    assert parse_config(["--yaml_config", write(tmp_path, config_to_yaml(cfg))], EvalConfig) == cfg
    for text, message in (("model_path: m\ntasks: a.csv\n", "key 'tasks' expects list, got 'a.csv'"),
                          ("model_path: m\ntasks: [a, {b: 1}]\n", "key 'tasks' expects a list of strings"),
                          ("model_path: m\ntasks: [a, null]\n", "key 'tasks' expects a list of strings"),
                          ("model_path: m\ntasks: []\n", "key 'tasks' must be one or more task files")):
        with pytest.raises(ConfigError, match=message):
            parse_config(["--yaml_config", write(tmp_path, text)], EvalConfig)


@pytest.mark.parametrize("argv", [["--model_path", "m", "--tasks"], ["--tasks", "--model_path", "m"],
                                  ["--model_path", "m", "--tasks="]])
def test_a_list_key_without_values_is_an_error(argv):
    with pytest.raises(ConfigError, match="key 'tasks' expects one or more values"):
        parse_config(argv, EvalConfig)


def test_required_keys_are_named():
    with pytest.raises(ConfigError, match=r"^key 'tasks' is required \(--tasks\)$"):
        parse_config(["--model_path", "m"], EvalConfig)
    with pytest.raises(ConfigError, match=r"^keys 'model_path', 'tasks' are required \(--model_path, --tasks\)$"):
        parse_config([], EvalConfig)


def test_unknown_keys_still_name_the_closest():
    with pytest.raises(ConfigError, match=r"command line: unknown key 'task'; did you mean tasks\?"):
        parse_config(["--model_path", "m", "--task", "a", "b"], EvalConfig)
    with pytest.raises(ConfigError, match=r"unknown key 'num_fewshots'; did you mean num_fewshot[?,]"):
        parse_config(["--model_path", "m", "--tasks", "a", "--num_fewshots", "1"], EvalConfig)
    # A mistyped key followed by several words is named too, not its second word.
    with pytest.raises(ConfigError, match=r"unknown key 'learnig_rate'.*learning_rate"):
        parse_config(["--learnig_rate", "1", "2"], PretrainConfig)


def test_a_positional_word_is_the_declared_key():
    assert parse_config(["runs/a"], PlotConfig).output_dir == "runs/a"
    assert parse_config(["--output_dir", "runs/a"], PlotConfig).output_dir == "runs/a"
    assert parse_config(["--output_dir=runs/a"], PlotConfig).output_dir == "runs/a"
    with pytest.raises(ConfigError, match=r"expected --key value, got 'runs/b'"):
        parse_config(["runs/a", "runs/b"], PlotConfig)
    with pytest.raises(ConfigError, match=r"output_dir given twice \(OUTPUT_DIR and --output_dir\)"):
        parse_config(["--output_dir", "runs/a", "runs/b"], PlotConfig)
    with pytest.raises(ConfigError, match=r"^key 'output_dir' is required \(OUTPUT_DIR or --output_dir\)$"):
        parse_config([], PlotConfig)
    # A class that declares none still refuses a stray word.
    with pytest.raises(ConfigError, match=r"command line: expected --key value, got 'runs/a'"):
        parse_config(["runs/a"], PretrainConfig)
    with pytest.raises(ConfigError, match=r"expected --key value, got 'extra'"):
        parse_config(["--seed", "1", "extra"], PretrainConfig)


@dataclass
class WordListFlag:  # without `from __future__ import annotations` in this file: real types, not strings
    POSITIONAL = "name"
    name: str = "default"
    words: list[str] = field(default_factory=list)
    flag: bool = False
    num_fewshot: int = 0  # a numeric key needs an entry in NUMBERS: this one has


def test_positional_lists_and_flags_together():
    cfg = parse_config(["--flag", "--num_fewshot", "2", "x", "--words", "a", "b"], WordListFlag)
    assert cfg == WordListFlag(name="x", words=["a", "b"], flag=True, num_fewshot=2)
    assert parse_config(["--words", "a", "x"], WordListFlag) == WordListFlag(words=["a", "x"])  # up to --key
    assert parse_config([], WordListFlag) == WordListFlag()
    with pytest.raises(ConfigError, match="key 'num_fewshot' expects int"):
        parse_config(["--num_fewshot", "many"], WordListFlag)
    with pytest.raises(ConfigError, match=r"^key 'num_fewshot' must be >= 0, got -1$"):  # the table, for any class
        parse_config(["--num_fewshot", "-1"], WordListFlag)


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--model_path", "m", "--help"], EvalConfig)
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "usage: --yaml_config FILE --key value ...  (command line > YAML > defaults)"
    keys = [line for line in lines[2:] if line.startswith("  --")]
    assert keys[:3] == ["  --model_path (required)", "  --tasks (required)  (a list: --tasks A B ...)",
                        "  --adapter_path ''"]
    assert len(keys) == len(EvalConfig.__dataclass_fields__)
    assert format_help(PlotConfig).startswith("usage: OUTPUT_DIR (or --output_dir OUTPUT_DIR) --yaml_config")
    pretrain = format_help(PretrainConfig).splitlines()
    assert pretrain[:3] == ["usage: --yaml_config FILE --key value ...  (command line > YAML > defaults)", "keys:",
                            "  --stage 'pretrain'"]
    assert "  --learning_rate 0.001" in pretrain and "  --vocab_size 4096" in pretrain


def program_configs() -> list[type]:
    import importlib

    programs = [("nanobumble.merge_lora", "MergeConfig"), ("nanobumble.plot", "PlotConfig"),
                ("nanobumble.export_hf", "ExportConfig"), ("nanobumble.evaluate", "EvalConfig"),
                ("nanobumble.prepare", "PrepareConfig"), ("nanobumble.serve", "ServeConfig"), ("chat", "ChatConfig")]
    return [PretrainConfig, SFTConfig, DPOConfig] + [getattr(importlib.import_module(module), name)
                                                     for module, name in programs]


@pytest.mark.parametrize("config", program_configs(), ids=lambda c: c.__name__)
def test_help_says_what_every_key_of_every_program_does(config):
    lines = format_help(config).splitlines()
    for key in config.__dataclass_fields__:
        at = next(i for i, line in enumerate(lines) if line.startswith(f"  --{key} "))
        description = lines[at + 1] if at + 1 < len(lines) else ""
        assert description.startswith("      ") and len(description.strip()) > 8, f"--{key} has no description"
    # a subclass's comment on its own default does not replace what the key is
    if config.__name__ == "SFTConfig":
        assert lines[lines.index("  --num_epochs 10.0") + 1].strip().startswith("passes over the training data")
