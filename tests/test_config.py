import pytest

from nanobumble.base.errors import ConfigError
from nanobumble.run.config import PretrainConfig, parse_config


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

    from nanobumble.run.config import DPOConfig, SFTConfig
    stage_config = {"pretrain": PretrainConfig, "sft": SFTConfig, "dpo": DPOConfig}
    files = glob.glob(os.path.join(REPO_ROOT, "configs", "*", "*.yaml"))
    assert len(files) >= 6
    for path in files:
        stage = os.path.basename(os.path.dirname(path))
        parse_config(["--yaml_config", path], stage_config[stage])
