"""Export to the Hugging Face format: transformers loads it as Qwen2ForCausalLM and
gives the same logits; its tokenizer gives nanobumble's ids and chat layout."""

import glob
import json
import math
import os

import pytest
import torch
from safetensors import safe_open

from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT, render
from nanobumble.data.tokenizer import Tokenizer, train_tokenizer
from nanobumble.export_hf import main as export_main
from nanobumble.inference.loading import resolve_mode
from nanobumble.model.transformer import ModelConfig, Transformer, pad_vocab_size
from nanobumble.run.config import DPOConfig, PretrainConfig, SFTConfig, config_to_yaml, parse_config
from nanobumble.store.model_dir import save_model_dir

transformers = pytest.importorskip("transformers")

TEXT = ("The bees fly from flower to flower and make honey in the hive. " * 3 +
        "A small model learns to answer questions, one token at a time 42 times.\n"
        "蜜蜂从一朵花飞到另一朵花，在蜂巢里酿蜜。小模型一次学习一个词。\n")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer([TEXT] * 4, 400, path)
    return path


def save_model(path, tokenizer_file, tie: bool = True, qkv_bias: bool = True, training_args: str = "stage: sft\n"):
    vocab = pad_vocab_size(Tokenizer(tokenizer_file).vocab_size)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=96, max_position_embeddings=128, rope_theta=5000.0,
                      tie_word_embeddings=tie, qkv_bias=qkv_bias)
    model = Transformer(cfg)
    with torch.no_grad():  # make every weight matter: non-zero biases, norms away from 1
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    save_model_dir(str(path), model, tokenizer_file, training_args)
    return model.eval()


def export_model(tmp_path, tokenizer_file, tie: bool, qkv_bias: bool):
    model = save_model(tmp_path / "model", tokenizer_file, tie, qkv_bias)
    export_main(["--model_path", str(tmp_path / "model"), "--save_path", str(tmp_path / "hf")])
    return model, str(tmp_path / "hf")


@pytest.mark.parametrize("tie,qkv_bias", [(True, True), (False, False)])
def test_transformers_loads_the_export_with_the_same_logits(tmp_path, tokenizer_file, tie, qkv_bias):
    model, hf_dir = export_model(tmp_path, tokenizer_file, tie, qkv_bias)
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["tie_word_embeddings"] is tie and config["num_key_value_heads"] == 2
    hf = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings is tie
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(ids).logits
    assert ours.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_exported_tokenizer_gives_nanobumble_ids_and_chat_layout(tmp_path, tokenizer_file):
    _, hf_dir = export_model(tmp_path, tokenizer_file, tie=True, qkv_bias=True)
    with open(os.path.join(hf_dir, "generation_config.json")) as f:
        gen = json.load(f)
    assert (gen["temperature"], gen["top_p"], gen["top_k"], gen["repetition_penalty"]) == (0.7, 0.8, 20, 1.1)
    assert gen["eos_token_id"] == [3, 1]
    ours = Tokenizer(tokenizer_file)
    # AutoTokenizer is what pipeline, lm-eval and vLLM call; for model_type qwen2 transformers 5
    # would build Qwen's byte-level tokenizer around this vocabulary unless the export says otherwise
    for trust_remote_code in (False, True):
        hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
        for text in ["The bees fly to the hive.", "  two  spaces\n\nand lines 1234", "蜜蜂酿蜜。", "unseen 🐝 字"]:
            ids = hf_tok.encode(text, add_special_tokens=False)
            assert ids == ours.encode(text), (trust_remote_code, text)
            assert hf_tok.decode(ids) == text
        assert [hf_tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == \
            [ours.eot_id, ours.im_start_id, ours.im_end_id]
        assert hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token == "<|endoftext|>"
        messages = [{"role": "user", "content": "Where do bees live?"},
                    {"role": "assistant", "content": "In a hive."}, {"role": "user", "content": "蜜蜂?"}]
        theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert list(theirs["input_ids"]) == render(messages, ours, add_generation_prompt=True)[0]


def test_the_export_is_readable_by_all_keeps_its_stage_and_uses_current_key_names(tmp_path, tokenizer_file):
    old = os.umask(0o022)
    try:
        _, hf_dir = export_model(tmp_path, tokenizer_file, tie=True, qkv_bias=True)
    finally:
        os.umask(old)
    modes = {name: oct(os.stat(os.path.join(hf_dir, name)).st_mode & 0o777) for name in os.listdir(hf_dir)}
    assert set(modes.values()) == {"0o644"}, modes  # safetensors' save_file wrote 0600
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    assert "torch_dtype" not in config and config["dtype"] == "float32"  # transformers' current name
    assert resolve_mode("auto", hf_dir, "")[0] == "chat"  # the model was saved with stage: sft


# --- the system prompt the model was trained with -----------------------------------------------------

CUSTOM_PROMPT = 'You are "Bee" \\ {{ not jinja }} {% raw %}\nAnswer 蜜蜂 questions 🐝 briefly.'


@pytest.mark.parametrize("stage,system_prompt,expected", [
    ("sft", "", ""),                                   # trained without a system turn: none is added
    ("dpo", CUSTOM_PROMPT, CUSTOM_PROMPT),             # quotes, backslash, braces, newline, non-ASCII
    ("pretrain", None, DEFAULT_SYSTEM_PROMPT),         # never saw one: the default
])
def test_exported_chat_template_uses_the_trained_system_prompt(tmp_path, tokenizer_file, stage, system_prompt,
                                                               expected):
    config = {"sft": SFTConfig, "dpo": DPOConfig, "pretrain": PretrainConfig}[stage]
    argv = [] if system_prompt is None else ["--system_prompt", system_prompt]
    save_model(tmp_path / "model", tokenizer_file, training_args=config_to_yaml(parse_config(argv, config)))
    export_main(["--model_path", str(tmp_path / "model"), "--save_path", str(tmp_path / "hf")])

    ours = Tokenizer(tokenizer_file)
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "hf"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    conversations = [
        [{"role": "user", "content": "Where do bees live?"}, {"role": "assistant", "content": "In a hive."}],
        [{"role": "system", "content": "Their own system turn."}, {"role": "user", "content": "蜜蜂?"}],
    ]
    for messages in conversations:
        for add_generation_prompt in (False, True):
            want, _ = render(messages, ours, system_prompt=expected, add_generation_prompt=add_generation_prompt)
            ids = fast.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                           return_dict=True)["input_ids"]
            assert list(ids) == want, (messages, add_generation_prompt)
            ids = auto.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                           return_dict=True)["input_ids"]
            assert list(ids) == want, (messages, add_generation_prompt)
            text = auto.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
            assert text == fast.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                    tokenize=False)
            assert text == ours.decode(want)
    with open(tmp_path / "hf" / "README.md", encoding="utf-8") as f:
        card = f.read()
    assert (json.dumps(expected, ensure_ascii=False) in card) if expected else "no system prompt" in card


# --- sharded weights ----------------------------------------------------------------------------------

def weight_files(hf_dir) -> list[str]:
    return sorted(name for name in os.listdir(hf_dir) if name.startswith("model") and "safetensors" in name)


def hf_logits(hf_dir, ids) -> torch.Tensor:
    hf = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


def test_sharded_export_loads_with_identical_logits_and_leaves_nothing_stale(tmp_path, tokenizer_file):
    model = save_model(tmp_path / "model", tokenizer_file, tie=False)
    hf_dir = str(tmp_path / "hf")
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)

    def export(*extra):
        export_main(["--model_path", str(tmp_path / "model"), "--save_path", hf_dir, *extra])

    export()  # the default 5 GiB: one file
    assert weight_files(hf_dir) == ["model.safetensors"]
    single = hf_logits(hf_dir, ids)
    torch.testing.assert_close(single, ours, atol=1e-4, rtol=1e-4)

    shard_counts = []
    for gib in ("0.00005", "0.0002"):  # about 52 kB, then 210 kB: several shards, then fewer
        export("--overwrite_output_dir", "true", "--max_shard_size_gb", gib)
        files = weight_files(hf_dir)
        with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
            index = json.load(f)
        shards = sorted(set(index["weight_map"].values()))
        shard_counts.append(len(shards))
        assert len(shards) > 1 and files == sorted(shards + ["model.safetensors.index.json"])  # nothing stale
        assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        stored, total = {}, 0
        for shard in shards:
            with safe_open(os.path.join(hf_dir, shard), "pt") as f:
                sizes = {name: math.prod(f.get_slice(name).get_shape()) * 4 for name in f.keys()}  # fp32 bytes
            stored.update(dict.fromkeys(sizes, shard))
            total += sum(sizes.values())
            # a shard exceeds the limit only when it is a single tensor larger than the limit
            assert sum(sizes.values()) <= float(gib) * 2**30 or len(sizes) == 1
        assert stored == index["weight_map"] and index["metadata"]["total_size"] == total
        assert torch.equal(hf_logits(hf_dir, ids), single)
    assert shard_counts[0] > shard_counts[1]

    export("--overwrite_output_dir", "true")  # back to one file: the shards and the index go
    assert weight_files(hf_dir) == ["model.safetensors"]
    assert torch.equal(hf_logits(hf_dir, ids), single)
    assert not glob.glob(os.path.join(hf_dir, "*.tmp-*"))


def test_max_shard_size_must_be_positive(tmp_path):
    from nanobumble.base.errors import ConfigError
    from nanobumble.export_hf import ExportConfig

    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(ConfigError, match="max_shard_size_gb"):
            parse_config(["--model_path", "m", "--save_path", "s", "--max_shard_size_gb", bad], ExportConfig)


# --- the model card -----------------------------------------------------------------------------------

def test_model_card_names_the_stages_data_and_final_metrics(tmp_path, tokenizer_file):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "hi", "chosen": "hello", "rejected": "go away"}\n' * 50)
    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    save_model(sft_dir, tokenizer_file, training_args=config_to_yaml(parse_config(
        ["--model_name_or_path", "tiny", "--dataset_path", str(tmp_path / "missing")], SFTConfig)))
    save_model(dpo_dir, tokenizer_file, training_args=config_to_yaml(parse_config(
        ["--model_name_or_path", str(sft_dir), "--dataset_path", str(data), "--output_dir", str(dpo_dir),
         "--pref_loss", "ipo", "--pref_beta", "0.1", "--max_steps", "20"], DPOConfig)))
    with open(dpo_dir / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 10, "train/loss": 0.6931, "rewards/accuracies": 0.5, "train/lr": 1e-4}) + "\n")
        f.write('{"step": 15, "train/lo')  # a damaged line from a killed run is skipped
        f.write("\n" + json.dumps({"step": 20, "train/loss": 0.4321, "rewards/accuracies": 0.875,
                                   "rewards/margins": 1.25, "train/lr": 1e-5}) + "\n")
    export_main(["--model_path", str(dpo_dir), "--save_path", str(tmp_path / "hf")])
    with open(tmp_path / "hf" / "README.md", encoding="utf-8") as f:
        card = f.read()
    assert card.index("| sft (full") < card.index("| dpo (lora, ipo, beta 0.1, 20 steps)")  # oldest first
    assert f"`{sft_dir}`" in card and "`tiny`" in card
    assert f"`{data}` (1 file, {data.stat().st_size / 1e3:.1f} kB)" in card  # the DPO data, with its size
    assert "| train/loss | 0.4321 | 20 |" in card and "| rewards/accuracies | 0.875 | 20 |" in card
    assert "| rewards/margins | 1.25 | 20 |" in card and "train/lr" not in card
    assert len(card.splitlines()) < 30  # short

    # merged LoRA run: the metrics stay in the adapter directory (output_dir of the same run)
    merged = tmp_path / "merged"
    save_model(merged, tokenizer_file, training_args=(dpo_dir / "training_args.yaml").read_text())
    export_main(["--model_path", str(merged), "--save_path", str(tmp_path / "hf_merged")])
    card = (tmp_path / "hf_merged" / "README.md").read_text(encoding="utf-8")
    assert "| train/loss | 0.4321 | 20 |" in card and str(dpo_dir / "metrics.jsonl") in card

    # a checkpoint of the run: the run's metrics, up to the checkpoint's step
    checkpoint = dpo_dir / "checkpoint-10"
    save_model(checkpoint, tokenizer_file, training_args=(dpo_dir / "training_args.yaml").read_text())
    (checkpoint / "trainer_state.json").write_text('{"step": 10, "world_size": 1}')
    export_main(["--model_path", str(checkpoint), "--save_path", str(tmp_path / "hf_checkpoint")])
    card = (tmp_path / "hf_checkpoint" / "README.md").read_text(encoding="utf-8")
    assert "| train/loss | 0.6931 | 10 |" in card and "| 20 |" not in card

    # no training_args.yaml, no metrics: the card says what it does not know
    os.remove(sft_dir / "training_args.yaml")
    (sft_dir / "complete.json").write_text("{}")  # whole without it (complete.json would otherwise name it)
    export_main(["--model_path", str(sft_dir), "--save_path", str(tmp_path / "hf_bare")])
    card = (tmp_path / "hf_bare" / "README.md").read_text(encoding="utf-8")
    assert "history is unknown" in card and "Final metrics" not in card
