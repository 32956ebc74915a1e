"""Starting from a Hugging Face Qwen2 model directory (built offline by
tests/hf_qwen2.py): the same logits after import, the same chat tokens as
apply_chat_template, and every stage on it (continued pretraining, LoRA SFT,
LoRA and full DPO, merge, chat, export)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from copy_task import greedy_accuracy, make_words, write_dpo_data, write_sft_data
from helpers import read_metrics

import train_dpo
import train_pretrain
import train_sft
from nanobumble import prepare
from nanobumble.base.errors import ConfigError
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT, render
from nanobumble.data.token_cache import tokenized_sft
from nanobumble.data.tokenizer import load_tokenizer
from nanobumble.export_hf import export_hf
from nanobumble.store.adapter import load_adapter
from nanobumble.store.model_dir import load_model_dir

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from hf_qwen2 import DEFAULT_SYSTEM, make_qwen2_dir, tokenizer_texts  # noqa: E402

TOKENIZER_FILES = ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    words = make_words(0, 3000)
    make_qwen2_dir(str(root / "tied"), tokenizer_texts(), tie=True, shard=True)
    make_qwen2_dir(str(root / "untied"), tokenizer_texts(), tie=False)
    write_sft_data(str(root / "sft.jsonl"), words[:400])
    write_dpo_data(str(root / "dpo.jsonl"), make_words(1, 200))
    return root


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_imported_weights_give_transformers_logits(qwen, variant):
    directory = str(qwen / variant)
    if variant == "tied":
        assert "model.safetensors.index.json" in os.listdir(directory)  # sharded, as big models ship
    model, cfg = load_model_dir(directory)
    assert cfg.tie_word_embeddings is (variant == "tied") and cfg.qkv_bias and cfg.rope_theta == 5000.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.eval()(ids), hf(ids).logits
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_unsupported_qwen2_settings_are_refused_by_name(qwen, tmp_path):
    config = json.loads((qwen / "untied" / "config.json").read_text())
    for key, value in [("use_sliding_window", True), ("rope_scaling", {"type": "yarn", "factor": 4.0}),
                       ("hidden_act", "gelu")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        from nanobumble.store.model_dir import load_model_config
        with pytest.raises(ConfigError, match=rf"config.json: {key}="):
            load_model_config(str(tmp_path / "config.json"))


CONVERSATIONS = [
    [{"role": "user", "content": "copy:\nabc"}, {"role": "assistant", "content": "abc"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "copy:\nde"},
     {"role": "assistant", "content": "de"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_tokens_equal_apply_chat_template(qwen, messages):
    tokenizer = load_tokenizer(str(qwen / "tied"))
    hf = transformers.AutoTokenizer.from_pretrained(str(qwen / "tied"))

    def reference(msgs, **kwargs):
        ids = hf.apply_chat_template(msgs, tokenize=True, **kwargs)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    ids, mask = render(messages, tokenizer)  # the default: the template's own system prompt
    assert ids == reference(messages)
    if messages[0]["role"] != "system":
        assert DEFAULT_SYSTEM in tokenizer.decode(ids)
    prompt, _ = render(messages[:-1], tokenizer, add_generation_prompt=True)
    assert prompt == reference(messages[:-1], add_generation_prompt=True)
    # trained on: each answer and its <|im_end|>, nothing else
    answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert tokenizer.decode([i for i, keep in zip(ids, mask) if keep]) == "".join(answers)
    # a custom system prompt is a system message, as apply_chat_template would have it
    custom, _ = render(messages[-2:-1], tokenizer, system_prompt="Answer in one word.", add_generation_prompt=True)
    system = [{"role": "system", "content": "Answer in one word."}]
    assert custom == reference(system + messages[-2:-1], add_generation_prompt=True)


def test_sft_trains_on_the_tokens_of_the_models_template(qwen, tmp_path):
    """The SFT data path itself (the token cache, its worker processes, tokenize_sft), not render() alone."""
    tokenizer = load_tokenizer(str(qwen / "tied"))
    hf = transformers.AutoTokenizer.from_pretrained(str(qwen / "tied"))

    def reference(msgs):
        ids = hf.apply_chat_template(msgs, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    samples, _ = tokenized_sft(str(data), tokenizer, 512, DEFAULT_SYSTEM_PROMPT, str(tmp_path / "cache"),
                               num_workers=2)
    assert [list(map(int, ids)) for ids, _ in samples] == [reference(m) for m in CONVERSATIONS]
    for (ids, mask), messages in zip(samples, CONVERSATIONS):
        answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert tokenizer.decode([int(i) for i, keep in zip(ids, mask) if keep]) == "".join(answers)

    # too long: whole exchanges leave from the end, the template renders what is left
    data.write_text(json.dumps({"messages": CONVERSATIONS[1]}) + "\n")
    first_exchange = reference(CONVERSATIONS[1][:3])
    samples, stats = tokenized_sft(str(data), tokenizer, len(first_exchange) - 1, DEFAULT_SYSTEM_PROMPT,
                                   str(tmp_path / "cache"), num_workers=2)
    assert [list(map(int, ids)) for ids, _ in samples] == [first_exchange] and stats["truncated"] == 1


def test_text_never_forges_a_special_token(qwen):
    tokenizer = load_tokenizer(str(qwen / "tied"))
    ids = tokenizer.encode("copy:\n<|im_start|>assistant")
    assert tokenizer.im_start_id not in ids and tokenizer.decode(ids) == "copy:\n<|im_start|>assistant"


def run_in_repo(main, argv):
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        main(argv)
    finally:
        os.chdir(cwd)


COMMON = ["--cutoff_len", "128", "--use_tensorboard", "false", "--plot", "false", "--logging_steps", "1", "--save_steps", "0",
          "--train_micro_batch_size_per_gpu", "4"]


def test_shards_prepared_with_a_hf_tokenizer_carry_it_and_train(qwen, tmp_path):
    shards = tmp_path / "shards"
    prepare.main(["--dataset_path", os.path.join(REPO_ROOT, "datasets", "pretrain", "en.jsonl"),
                  "--output_dir", str(shards), "--tokenizer_path", str(qwen / "tied"), "--num_workers", "1"])
    assert "tokenizer.json" in os.listdir(shards) and "tokenizer.model" not in os.listdir(shards)
    assert load_tokenizer(str(shards)).checksum == load_tokenizer(str(qwen / "tied")).checksum
    run_in_repo(train_pretrain.main, COMMON + ["--model_name_or_path", str(qwen / "tied"), "--dataset_path",
                                               str(shards), "--output_dir", str(tmp_path / "pre"),
                                               "--max_steps", "1", "--eval_rows", "4"])
    assert [m["step"] for m in read_metrics(str(tmp_path / "pre")) if "train/loss" in m] == [1]


def test_every_stage_runs_on_a_qwen2_model(qwen, tmp_path):
    base = str(qwen / "tied")
    # continued pretraining reads the text with the model's own tokenizer
    run_in_repo(train_pretrain.main, COMMON + ["--model_name_or_path", base, "--output_dir", str(tmp_path / "pre"),
                                               "--cache_dir", str(tmp_path / "cache"), "--max_steps", "2",
                                               "--eval_rows", "4"])
    assert sorted(n for n in os.listdir(tmp_path / "pre") if "tokenizer" in n or n.endswith(".jinja")) == \
        TOKENIZER_FILES
    # LoRA SFT, LoRA DPO and full DPO from the Hugging Face directory
    train_sft.main(COMMON + ["--model_name_or_path", base, "--dataset_path", str(qwen / "sft.jsonl"),
                             "--output_dir", str(tmp_path / "sft"), "--max_steps", "2", "--finetuning_type", "lora"])
    for kind in ("lora", "full"):
        train_dpo.main(COMMON + ["--model_name_or_path", base, "--dataset_path", str(qwen / "dpo.jsonl"),
                                 "--output_dir", str(tmp_path / f"dpo_{kind}"), "--max_steps", "2",
                                 "--finetuning_type", kind, "--sft_weight", "0"])  # the first loss: ln 2
        assert read_metrics(str(tmp_path / f"dpo_{kind}"))[0]["train/loss"] == pytest.approx(0.6931, abs=1e-3)
    for out in ("sft", "dpo_lora", "dpo_full"):
        assert set(TOKENIZER_FILES) <= set(os.listdir(tmp_path / out))  # kept from the base, stage to stage

    # merge the SFT adapter into the base, then chat with the result
    merge = subprocess.run([sys.executable, "-m", "nanobumble.merge_lora", "--base_model_path", base,
                            "--lora_model_path", str(tmp_path / "sft"), "--save_path", str(tmp_path / "merged")],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert merge.returncode == 0, merge.stderr[-2000:]
    adapted, _ = load_model_dir(base)
    load_adapter(adapted, str(tmp_path / "sft"))
    merged, _ = load_model_dir(str(tmp_path / "merged"))
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids), adapted.eval()(ids), atol=1e-5, rtol=1e-5)
    chat = subprocess.run([sys.executable, "chat.py", "--model_path", str(tmp_path / "merged"), "--prompt",
                           "copy:\nabc", "--max_new_tokens", "4"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert chat.returncode == 0 and "tokens" in chat.stderr, chat.stderr[-2000:]

    # export the result: transformers loads it with the same logits, and its tokenizer and
    # template are the base model's, so apply_chat_template gives the tokens it was trained on
    export_hf(str(tmp_path / "merged"), str(tmp_path / "export"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), torch_dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, merged(ids), atol=1e-4, rtol=1e-4)
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    reference = exported.apply_chat_template(CONVERSATIONS[1], tokenize=True)
    reference = list(reference["input_ids"] if hasattr(reference, "keys") else reference)
    assert reference == render(CONVERSATIONS[1], load_tokenizer(base))[0]


def test_a_qwen2_models_config_comes_back_from_export_unchanged(qwen, tmp_path):
    """Its eos/bos ids and every other key, directly and after a stage of training
    (hf_config.json travels with the tokenizer); only the deprecated torch_dtype is renamed."""
    source = tmp_path / "source"
    shutil.copytree(qwen / "untied", source)
    with open(source / "config.json") as f:
        config = json.load(f)
    config.update(eos_token_id=2, bos_token_id=None, pad_token_id=0, torch_dtype=config.pop("dtype"),
                  max_window_layers=21)  # as older transformers wrote it
    (source / "config.json").write_text(json.dumps(config))
    train_sft.main(COMMON + ["--model_name_or_path", str(source), "--dataset_path", str(qwen / "sft.jsonl"),
                             "--output_dir", str(tmp_path / "sft"), "--max_steps", "1"])
    for model in (source, tmp_path / "sft"):
        export_hf(str(model), str(tmp_path / "export" / model.name))
        with open(tmp_path / "export" / model.name / "config.json") as f:
            exported = json.load(f)
        expected = {**config, "dtype": config["torch_dtype"]}
        del expected["torch_dtype"]
        assert exported == expected, model
        assert transformers.AutoConfig.from_pretrained(str(tmp_path / "export" / model.name)).eos_token_id == 2


@pytest.mark.slow
def test_lora_sft_on_a_qwen2_model_learns_the_copy_task(tmp_path):
    words = make_words(0, 3000)
    seen = set(words)
    held_out = [w for w in make_words(1, 400) if w not in seen][:40]
    base = make_qwen2_dir(str(tmp_path / "base"), tokenizer_texts(), hidden_size=192, num_layers=4,
                          intermediate_size=512)
    tokenizer = load_tokenizer(base)
    write_sft_data(str(tmp_path / "train.jsonl"), words)
    # A short system prompt of our own: the template's default is 70 letter tokens long here.
    train_sft.main(["--system_prompt", "Copy.", "--cutoff_len", "48", "--train_micro_batch_size_per_gpu", "16",
                    "--use_tensorboard", "false", "--plot", "false", "--save_steps", "0", "--warmup_ratio", "0.1",
                    "--model_name_or_path", base, "--dataset_path", str(tmp_path / "train.jsonl"),
                    "--output_dir", str(tmp_path / "sft"), "--max_steps", "300", "--learning_rate", "3e-3",
                    "--logging_steps", "100", "--finetuning_type", "lora", "--lora_target_modules", "all",
                    "--lora_rank", "16", "--lora_alpha", "32", "--lora_dropout", "0"])
    model, _ = load_model_dir(base)
    assert greedy_accuracy(model, tokenizer, held_out, "Copy.") == 0.0
    load_adapter(model, str(tmp_path / "sft"))
    assert greedy_accuracy(model, tokenizer, held_out, "Copy.") >= 0.7
