"""chat.py end to end on a tiny model directory: --prompt, piped stdin with history
and /reset, completion mode, a LoRA adapter, an over-long prompt, and a model's
own chat template that fails."""

import os
import subprocess
import sys

import pytest
import torch
from chat_helpers import save_tiny_chat_model
from conftest import REPO_ROOT
from helpers import generate, stream_text

import chat
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT, render
from nanobumble.data.hf_tokenizer import HFTokenizer
from nanobumble.data.tokenizer import Tokenizer
from nanobumble.inference.generation import GenerationConfig
from nanobumble.model.transformer import ModelConfig, Transformer, pad_vocab_size
from nanobumble.store.adapter import load_adapter
from nanobumble.store.model_dir import load_model_dir, save_model_dir

REPO = REPO_ROOT
CORPUS = ("user: where do bees live?\nassistant: bees live in a hive and make honey from flowers.\n" * 5 +
          "蜜蜂住在蜂巢里，用花酿蜜。\n") * 3
MAX_NEW = 6
# fp32: the answers are compared with generate() in fp32 (precision auto is bf16 on a CPU with native bf16)
GREEDY = ["--do_sample", "false", "--max_new_tokens", str(MAX_NEW), "--precision", "fp32"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    save_tiny_chat_model(root, CORPUS, 96, {"sft": "model_name_or_path: tiny\nstage: sft\n",
                                            "base": "model_name_or_path: tiny\n"})
    return root


def run_chat(args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    # bytes, not text mode: text mode would turn a generated "\r" into "\n"
    result = subprocess.run([sys.executable, os.path.join(REPO, "chat.py"), *args], input=stdin.encode(), cwd=REPO,
                            capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    result.stdout, result.stderr = result.stdout.decode("utf-8"), result.stderr.decode("utf-8")
    assert result.returncode == 0, result.stderr
    return result


def expected_answer(model_dir, messages=None, text=None, adapter=None) -> str:
    model, _ = load_model_dir(str(model_dir))
    if adapter:
        load_adapter(model, str(adapter))
    tokenizer = Tokenizer(os.path.join(model_dir, "tokenizer.model"))
    if messages is not None:
        ids, _ = render(messages, tokenizer, system_prompt=DEFAULT_SYSTEM_PROMPT, add_generation_prompt=True)
    else:
        ids = tokenizer.encode(text)
    new = generate(model, ids, GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW),
                   vocab_size=tokenizer.vocab_size)
    return "".join(stream_text(tokenizer, new))


def test_one_shot_prompt_prints_only_the_answer(dirs):
    result = run_chat(["--model_path", str(dirs / "sft"), "--prompt", "where do bees live?", *GREEDY])
    answer = expected_answer(dirs / "sft", [{"role": "user", "content": "where do bees live?"}])
    assert result.stdout == answer + "\n"
    assert "mode: chat" in result.stderr and "tokens/s" in result.stderr


def test_piped_prompts_keep_history_until_reset(dirs):
    result = run_chat(["--model_path", str(dirs / "sft"), *GREEDY], stdin="hello bees\nand honey?\n/reset\nand honey?\n")
    first = expected_answer(dirs / "sft", [{"role": "user", "content": "hello bees"}])
    second = expected_answer(dirs / "sft", [{"role": "user", "content": "hello bees"},
                                            {"role": "assistant", "content": first},
                                            {"role": "user", "content": "and honey?"}])
    fresh = expected_answer(dirs / "sft", [{"role": "user", "content": "and honey?"}])
    assert result.stdout == f"{first}\n{second}\n{fresh}\n"
    assert "history cleared" in result.stderr and result.stderr.count("tokens/s") == 3


def test_base_model_defaults_to_completion(dirs):
    result = run_chat(["--model_path", str(dirs / "base"), "--prompt", "bees live in", *GREEDY])
    assert "mode: completion" in result.stderr
    assert result.stdout == expected_answer(dirs / "base", text="bees live in") + "\n"


def test_adapter_is_applied_on_top_of_the_model(dirs):
    messages = [{"role": "user", "content": "where do bees live?"}]
    result = run_chat(["--model_path", str(dirs / "sft"), "--adapter_path", str(dirs / "adapter"),
                       "--prompt", "where do bees live?", *GREEDY])
    with_adapter = expected_answer(dirs / "sft", messages, adapter=dirs / "adapter")
    assert with_adapter != expected_answer(dirs / "sft", messages)  # the adapter changes the answer
    assert result.stdout == with_adapter + "\n"


def test_over_long_prompt_is_cut_from_the_left_with_a_warning(dirs):
    long_prompt = "bees live in a hive " * 40  # far beyond the 96-token context
    result = run_chat(["--model_path", str(dirs / "base"), "--prompt", long_prompt, *GREEDY])
    assert "warning" in result.stderr and "cut" in result.stderr
    tokenizer = Tokenizer(str(dirs / "base" / "tokenizer.model"))
    kept = tokenizer.encode(long_prompt)[-(96 - MAX_NEW):]
    model, _ = load_model_dir(str(dirs / "base"))
    new = generate(model, kept, GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW),
                   vocab_size=tokenizer.vocab_size)
    assert result.stdout == "".join(stream_text(tokenizer, new)) + "\n"


def test_mode_rule_reads_stage_from_training_args(tmp_path):
    (tmp_path / "m").mkdir()
    assert chat.resolve_mode("auto", str(tmp_path / "m"), "")[0] == "completion"  # no training_args.yaml
    (tmp_path / "m" / "training_args.yaml").write_text("stage: pretrain\n")
    assert chat.resolve_mode("auto", str(tmp_path / "m"), "")[0] == "completion"
    (tmp_path / "m" / "training_args.yaml").write_text("stage: dpo\n")
    assert chat.resolve_mode("auto", str(tmp_path / "m"), "")[0] == "chat"
    assert chat.resolve_mode("completion", str(tmp_path / "m"), "")[0] == "completion"


def test_a_cuda_device_beyond_the_count_is_refused(monkeypatch):
    # The CUDA branch of resolve_device, reached on a CPU machine with one stand-in GPU.
    import chat
    from nanobumble.base.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert chat.resolve_device("cuda:0") == torch.device("cuda", 0)
    assert chat.resolve_device("auto") == torch.device("cuda")
    with pytest.raises(UserError, match="device cuda:3: there are only 1 CUDA devices"):
        chat.resolve_device("cuda:3")


# --- a model's own chat template ------------------------------------------------------------------

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def hf_chat_model(root, name: str, template: str) -> str:
    """A tiny chat model with a Hugging Face tokenizer (byte-level BPE) that brings this template."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    source = root / f"{name}-tokenizer"
    source.mkdir()
    fast = FastTokenizer(models.BPE())
    fast.pre_tokenizer, fast.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    fast.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast.save(str(source / "tokenizer.json"))
    (source / "chat_template.jinja").write_text(template, encoding="utf-8")
    tokenizer = HFTokenizer(str(source))
    cfg = ModelConfig(vocab_size=pad_vocab_size(tokenizer.vocab_size), hidden_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, intermediate_size=48, max_position_embeddings=96)
    save_model_dir(str(root / name), Transformer(cfg), tokenizer, "stage: sft\n")
    return str(root / name)


def run_in_process(monkeypatch, capsys, argv: list[str], lines: list[str] | None = None):
    """chat.py's run_cli(main) in this process: (exit code, stdout, stderr lines). lines: typed at a terminal."""
    if lines is not None:
        typed = iter(lines)

        def type_a_line(prompt=""):
            line = next(typed, None)
            if line is None:
                raise EOFError
            return line

        monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
        monkeypatch.setattr("builtins.input", type_a_line)
    monkeypatch.setattr(sys, "argv", ["chat.py", *argv])
    code = 0
    try:
        chat.run_cli(chat.main)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_a_chat_template_that_is_not_jinja_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    model = hf_chat_model(tmp_path, "broken", "{% for m in messages %}{{ m['content'] }")
    code, out, err = run_in_process(monkeypatch, capsys, ["--model_path", model, "--prompt", "hi", *GREEDY])
    assert code == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith(f"error: {model}/chat_template.jinja:1: the chat template failed: TemplateSyntaxError")


UNDEFINED_ON_HI = "{% if messages[-1]['content'] == 'hi' %}{{ nothing.at_all }}{% endif %}" + CHATML


def test_a_chat_template_that_fails_on_the_prompt_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    model = hf_chat_model(tmp_path, "undefined", UNDEFINED_ON_HI)
    code, out, err = run_in_process(monkeypatch, capsys, ["--model_path", model, "--prompt", "hi", *GREEDY])
    assert code == 2 and out == "" and not any("Traceback" in line for line in err), err
    assert err[-1] == f"error: {model}/chat_template.jinja: the chat template failed: UndefinedError: " \
                      f"'nothing' is undefined"


def test_at_a_terminal_a_failing_template_drops_the_message_and_the_chat_goes_on(tmp_path, monkeypatch, capsys):
    model = hf_chat_model(tmp_path, "undefined", UNDEFINED_ON_HI)
    code, _, err = run_in_process(monkeypatch, capsys, ["--model_path", model, *GREEDY], lines=["hi", "bees"])
    assert code == 0 and not any("Traceback" in line for line in err), err
    assert f"error: {model}/chat_template.jinja: the chat template failed: UndefinedError: 'nothing' is undefined" \
        in err
    assert sum("tokens/s" in line for line in err) == 1  # "bees" was answered, in a conversation without "hi"
