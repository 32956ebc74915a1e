"""Export a model directory to the Hugging Face format (Qwen2ForCausalLM).

    python -m nanobumble.export_hf --model_path checkpoints/dpo/bumblebee_1.5b_dpo_merged \
        --save_path exports/bumblebee_1.5b_hf [--dtype bf16]

The model already has Qwen2's shape and parameter names, so the export is a
renaming plus the files transformers expects:

    config.json              Qwen2Config keys (model_type "qwen2"); a model that came from
                             Hugging Face gets its own config.json back (eos/bos ids and all)
    model.safetensors        model.embed_tokens.weight, model.layers.N...,
                             model.norm.weight, lm_head.weight (when not tied); above
                             max_shard_size instead model-00001-of-0000N.safetensors ...
                             and model.safetensors.index.json (which file holds each tensor)
    generation_config.json   the sampling defaults, stopping at <|im_end|> / <|endoftext|>
    tokenizer.json           the sentencepiece BPE as a `tokenizers` BPE (the same ids)
    tokenizer_config.json    special tokens, no BOS/EOS added, the ChatML chat template
                             with the system prompt the model was trained with
    tokenization_nanobumble.py  what keeps AutoTokenizer on tokenizer.json (below)
    tokenizer.model          the sentencepiece model, unchanged
    training_args.yaml       the model's, so chat.py and serve open the export in chat mode
    README.md                a short model card: training stages, data, final metrics
    adapter/                 for a LoRA run only: the adapter, for PEFT (write_hf_model)

Then, with transformers installed:

    model = AutoModelForCausalLM.from_pretrained(save_path)
    tokenizer = AutoTokenizer.from_pretrained(save_path)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)

For model_type "qwen2", transformers 5 builds Qwen's byte-level tokenizer around
whatever vocabulary it finds, which misreads this one. tokenizer_config.json's
auto_map keeps AutoTokenizer (and so pipeline, lm-eval, vLLM) on tokenizer.json as
written, with or without trust_remote_code (see hf_tokenizer_config). The ids equal
nanobumble's, except that transformers turns a literal "<|im_end|>" (etc.) inside
text into the special token, where nanobumble's encode never does, and a literal
U+2581 is read as a space. A model imported from Hugging Face keeps its own
tokenizer files, which transformers reads as it did before.

A model without q/k/v biases (qkv_bias: false) is exported with zero biases,
since Qwen2 always has them.

The chat template inserts the system prompt from the model's training_args.yaml
(none for `system_prompt: ""`; the default for a pretrained model, which has no
such key), so apply_chat_template renders the tokens the model was trained on.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from nanobumble.base.errors import UserError
from nanobumble.base.files import atomic_write_bytes, atomic_write_text
from nanobumble.base.output_guard import publish_directory
from nanobumble.base.reading import read_json
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT
from nanobumble.data.hf_tokenizer import HF_CONFIG
from nanobumble.data.tokenizer import SPACE_PIECE, SPECIAL_TOKENS, UNK_ID, Tokenizer, load_tokenizer
from nanobumble.model.transformer import ModelConfig
from nanobumble.store.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_config
from nanobumble.store.model_card import model_card
from nanobumble.store.model_dir import check_model_dir, load_model_dir, model_state_dict
from nanobumble.store.run_files import read_training_args
from nanobumble.store.tensor_files import write_gathered

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
GIB = 2**30
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"  # transformers' names, numbered from 1


def hf_config(cfg: ModelConfig, dtype: torch.dtype, tokenizer) -> dict:
    """config.json. A model that came from Hugging Face gets its own config.json back
    (hf_config.json, carried with its tokenizer), with only the shape and dtype written
    over; one trained here gets Qwen2's keys with its tokenizer's special ids."""
    shape = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,  # older transformers read this key ...
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # ... newer ones this
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": HF_DTYPE_NAMES[dtype],
    }
    if HF_CONFIG in tokenizer.files:
        config = json.loads(tokenizer.files[HF_CONFIG])
        config.pop("torch_dtype", None)  # transformers' old name for dtype
        if "rope_theta" not in config:  # keep the source's own way of writing it
            del shape["rope_theta"]
        return {**config, **shape}
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **shape,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": None,  # nothing is put before a text
        "eos_token_id": tokenizer.eot_id,
        "pad_token_id": tokenizer.eot_id,
    }


def hf_generation_config(tokenizer, gen) -> dict:
    """generation_config.json: the stop tokens, and the sampling defaults of gen (a GenerationConfig)."""
    return {"eos_token_id": [tokenizer.im_end_id, tokenizer.eot_id],
            "pad_token_id": tokenizer.eot_id,
            "do_sample": gen.do_sample, "temperature": gen.temperature, "top_k": gen.top_k, "top_p": gen.top_p,
            "repetition_penalty": gen.repetition_penalty}


def hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """nanobumble names -> Qwen2ForCausalLM names (everything but the LM head lives under "model.")."""
    out = {}
    for name, tensor in state.items():
        out[name if name == "lm_head.weight" else f"model.{name}"] = tensor.to(dtype).contiguous()
    if not cfg.qkv_bias:  # Qwen2 always has q/k/v biases: zeros change nothing
        for i in range(cfg.num_layers):
            for proj, width in (("q_proj", cfg.num_heads), ("k_proj", cfg.num_kv_heads), ("v_proj", cfg.num_kv_heads)):
                out[f"model.layers.{i}.self_attn.{proj}.bias"] = torch.zeros(width * cfg.head_dim, dtype=dtype)
    return out


def chat_template(system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """ChatML as nanobumble's chat_template.render lays it out, in Jinja: system_prompt
    becomes the first turn of a conversation that has no system message ("" adds none)."""
    template = ""
    if system_prompt:
        # A JSON string is also a valid Jinja string literal with the same value (Jinja
        # unescapes \n, \", \\ and \uXXXX as JSON does), whatever quotes, backslashes or
        # braces the prompt holds.
        system_turn = json.dumps(f"<|im_start|>system\n{system_prompt}<|im_end|>\n", ensure_ascii=False)
        template += ("{%- if not messages or messages[0]['role'] != 'system' %}"
                     "{{- " + system_turn + " }}"
                     "{%- endif %}")
    return template + (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def hf_tokenizer_json(tokenizer: Tokenizer) -> dict:
    """The sentencepiece BPE model as a `tokenizers` BPE: the same vocabulary, and
    one merge per way of splitting each multi-character piece into two pieces,
    ranked by the piece's sentencepiece score (its merge order in training).
    Sentencepiece encodes by repeatedly merging the adjacent pair that forms the
    best-scoring piece, which is what a BPE with these ranks does. No pre-splitting
    is needed: no piece spans a word boundary. Characters outside the vocabulary
    become <0xNN> byte tokens in both."""
    sp = tokenizer.sp
    vocab = {sp.id_to_piece(i): i for i in range(tokenizer.vocab_size)}
    text_pieces = {sp.id_to_piece(i): i for i in range(tokenizer.vocab_size)
                   if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    ranked = sorted((i for piece, i in text_pieces.items() if len(piece) > 1), key=lambda i: (-sp.get_score(i), i))
    merges = []
    for i in ranked:
        piece = sp.id_to_piece(i)
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in text_pieces and piece[k:] in text_pieces]
        merges += sorted(splits, key=lambda pair: (text_pieces[pair[0]], text_pieces[pair[1]]))
    specials = [("<unk>", UNK_ID), *SPECIAL_TOKENS.items()]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": token_id, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for piece, token_id in specials],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_PIECE},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE_PIECE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(pair) for pair in merges]},
    }


def hf_tokenizer_config(system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> dict:
    """Settings around tokenizer.json: nothing added around the ids (no BOS/EOS),
    the special tokens by name, and the chat template."""
    added = {str(token_id): {"content": piece, "special": True, "normalized": False, "lstrip": False,
                             "rstrip": False, "single_word": False}
             for piece, token_id in [("<unk>", UNK_ID), *SPECIAL_TOKENS.items()]}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # transformers 5 gives every model_type "qwen2" Qwen's byte-level tokenizer, which
        # rebuilds the pipeline around this vocabulary and gets other ids. An auto_map makes
        # AutoTokenizer keep tokenizer.json as written: without trust_remote_code it falls
        # back to tokenizer_class above; with it, it loads TOKENIZER_MODULE (a bare subclass).
        "auto_map": {"AutoTokenizer": [None, "tokenization_nanobumble.NanobumbleTokenizer"]},
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "unk_token": "<unk>",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "added_tokens_decoder": added,
        "model_max_length": None,
        "chat_template": chat_template(system_prompt),
    }


TOKENIZER_MODULE = '''"""AutoTokenizer with trust_remote_code=True loads this class (tokenizer_config.json's
auto_map): tokenizer.json exactly as written, a sentencepiece-style BPE, not Qwen's
byte-level pipeline that transformers would otherwise build for model_type qwen2."""
from transformers import PreTrainedTokenizerFast


class NanobumbleTokenizer(PreTrainedTokenizerFast):
    pass
'''


def write_json(path: str, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# --- weights, in one file or in shards ----------------------------------------------------------------

def plan_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """The tensors in order, a new shard whenever the next one would overflow the current
    one (a tensor larger than max_bytes gets a shard of its own, as in transformers)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_weights(save_path: str, state: dict[str, torch.Tensor], max_bytes: int) -> list[str]:
    """model.safetensors, or shards plus the index when the weights exceed max_bytes,
    into a new directory. Returns the weight file names."""
    shards = plan_shards(state, max_bytes)
    names = [WEIGHTS_NAME] if len(shards) == 1 else \
        [SHARD_NAME.format(i, len(shards)) for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards):
        write_gathered(os.path.join(save_path, name), list(shard.items()))
    if len(names) > 1:  # transformers' index format
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {tensor: name for name, shard in zip(names, shards) for tensor in shard}
        write_json(os.path.join(save_path, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and \
        not os.path.isfile(os.path.join(path, WEIGHTS_NAME))


def write_peft_adapter(adapter_path: str, out_dir: str, base_path: str) -> None:
    """The adapter as PEFT reads it (its tensors already carry PEFT's names), pointing at base_path."""
    config = read_json(os.path.join(adapter_path, ADAPTER_CONFIG))
    os.makedirs(out_dir)
    with open(os.path.join(adapter_path, ADAPTER_WEIGHTS), "rb") as f:
        atomic_write_bytes(os.path.join(out_dir, ADAPTER_WEIGHTS), f.read())
    write_json(os.path.join(out_dir, ADAPTER_CONFIG), {**config, "base_model_name_or_path": base_path})


def trained_system_prompt(args: dict) -> str:
    """The system prompt SFT/DPO rendered conversations with (run/config.py: FinetuneConfig's key);
    a pretrained model never saw one, so it keeps the default."""
    if "system_prompt" not in args:
        return DEFAULT_SYSTEM_PROMPT
    return "" if args["system_prompt"] is None else str(args["system_prompt"])


def write_hf_model(model_path: str, save_path: str, sampling, dtype: torch.dtype = torch.float32,
                   overwrite: bool = False, max_shard_size: int = 5 * GIB) -> None:
    """Export model_path to save_path; sampling (a GenerationConfig) gives generation_config.json's defaults.

    A LoRA run's directory exports as its base model at save_path plus the adapter in
    save_path/adapter, whose base_model_name_or_path is save_path (absolute): PEFT's
    AutoPeftModelForCausalLM.from_pretrained(save_path/adapter) loads both."""
    weights_path = model_path  # where the full weights are: a LoRA run's base model
    if is_adapter_dir(model_path):
        weights_path = read_adapter_config(model_path)["base_model_name_or_path"]
    check_model_dir(weights_path, "model_path" if weights_path == model_path else f"{model_path}'s base model")
    args = read_training_args(model_path)
    system_prompt = trained_system_prompt(args)
    # the export appears whole or not at all, never in place of its input (base/output_guard.py)
    with publish_directory(save_path, {"model_path": model_path}, overwrite, "save_path") as tmp:
        model, cfg = load_model_dir(weights_path)
        state = hf_state_dict(model_state_dict(model), cfg, dtype)
        bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
        if bad:
            name = HF_DTYPE_NAMES[dtype]
            raise UserError(f"{model_path}: {len(bad)} weights are not finite in {name} (e.g. {bad[0]}; NaN/inf "
                            f"in the model, or values beyond the range of {name}); nothing is exported")
        weight_files = write_weights(tmp, state, max_shard_size)
        tokenizer = load_tokenizer(model_path)
        write_json(os.path.join(tmp, "config.json"), hf_config(cfg, dtype, tokenizer))
        write_json(os.path.join(tmp, "generation_config.json"), hf_generation_config(tokenizer, sampling))
        if "tokenizer.model" in tokenizer.files:
            write_json(os.path.join(tmp, "tokenizer.json"), hf_tokenizer_json(tokenizer))
            write_json(os.path.join(tmp, "tokenizer_config.json"), hf_tokenizer_config(system_prompt))
            atomic_write_text(os.path.join(tmp, "tokenization_nanobumble.py"), TOKENIZER_MODULE)
        # A model imported from Hugging Face keeps its own tokenizer files, chat template included
        # (it was trained with that template); nanobumble's keeps its sentencepiece model beside.
        for name, data in tokenizer.files.items():
            if name != HF_CONFIG:  # its values are in config.json
                atomic_write_bytes(os.path.join(tmp, name), data)
        # the stage and the system prompt the model was trained with: chat.py and serve
        # open the export in chat mode as they open the model, and an export of the export
        # keeps its template
        if os.path.isfile(os.path.join(model_path, "training_args.yaml")):
            with open(os.path.join(model_path, "training_args.yaml"), "rb") as f:
                atomic_write_bytes(os.path.join(tmp, "training_args.yaml"), f.read())
        if weights_path != model_path:
            write_peft_adapter(model_path, os.path.join(tmp, "adapter"), os.path.abspath(save_path))
        atomic_write_text(os.path.join(tmp, "README.md"),
                          model_card(model_path, args, cfg, model.num_parameters(), HF_DTYPE_NAMES[dtype],
                                     system_prompt))
    shards = f", {len(weight_files)} shards" if len(weight_files) > 1 else ""
    print(f"exported {model_path} -> {save_path} (Qwen2ForCausalLM, {HF_DTYPE_NAMES[dtype]}, "
          f"{model.num_parameters() / 1e6:.1f}M parameters{shards})", file=sys.stderr)
