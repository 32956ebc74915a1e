"""Export a model directory to the Hugging Face format (Qwen2ForCausalLM).

    python -m nanobumble.export_hf --model_path checkpoints/dpo/bumblebee_1.5b_dpo_merged \
        --save_path exports/bumblebee_1.5b_hf [--dtype bf16]

The model already has Qwen2's shape and parameter names, so the export is a
renaming plus the files transformers expects:

    config.json              Qwen2Config keys (model_type "qwen2")
    model.safetensors        model.embed_tokens.weight, model.layers.N...,
                             model.norm.weight, lm_head.weight (when not tied); above
                             max_shard_size instead model-00001-of-0000N.safetensors ...
                             and model.safetensors.index.json (which file holds each tensor)
    generation_config.json   the sampling defaults, stopping at <|im_end|> / <|endoftext|>
    tokenizer.json           the sentencepiece BPE as a `tokenizers` BPE (the same ids)
    tokenizer_config.json    special tokens, no BOS/EOS added, the ChatML chat template
                             with the system prompt the model was trained with
    tokenizer.model          the sentencepiece model, unchanged
    README.md                a short model card: training stages, data, final metrics

Then, with transformers installed:

    model = Qwen2ForCausalLM.from_pretrained(save_path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(save_path)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)

Use PreTrainedTokenizerFast, not AutoTokenizer: for model_type "qwen2",
transformers 5 replaces the declared tokenizer class with Qwen's byte-level
tokenizer, which misreads this vocabulary. The ids equal nanobumble's, except
that transformers turns a literal "<|im_end|>" (etc.) inside text into the
special token, where nanobumble's encode never does, and a literal U+2581 is
read as a space.

A model without q/k/v biases (qkv_bias: false) is exported with zero biases,
since Qwen2 always has them. A LoRA run must be merged into a full model first.

The chat template inserts the system prompt from the model's training_args.yaml
(none for `system_prompt: ""`; the default for a pretrained model, which has no
such key), so apply_chat_template renders the tokens the model was trained on.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file

from nanobumble.base.errors import UserError
from nanobumble.base.files import atomic_write_bytes, atomic_write_text
from nanobumble.base.output_guard import publish_directory
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT
from nanobumble.data.tokenizer import SPACE_PIECE, SPECIAL_TOKENS, UNK_ID, Tokenizer, load_tokenizer
from nanobumble.model.transformer import ModelConfig
from nanobumble.store.model_card import model_card
from nanobumble.store.model_dir import check_model_dir, load_model_dir, model_state_dict
from nanobumble.store.run_files import read_training_args

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
GIB = 2**30
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"  # transformers' names, numbered from 1


def hf_config(cfg: ModelConfig, dtype: torch.dtype, tokenizer) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,  # older transformers read this key ...
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # ... newer ones this
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": tokenizer.eot_id,
        "pad_token_id": tokenizer.eot_id,
        "torch_dtype": HF_DTYPE_NAMES[dtype],
    }


def hf_generation_config(tokenizer, gen) -> dict:
    """generation_config.json: the stop tokens, and the sampling defaults of gen (a GenerationConfig)."""
    return {"bos_token_id": tokenizer.eot_id, "eos_token_id": [tokenizer.im_end_id, tokenizer.eot_id],
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
        save_file(shard, os.path.join(save_path, name), metadata={"format": "pt"})
    if len(names) > 1:  # transformers' index format
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {tensor: name for name, shard in zip(names, shards) for tensor in shard}
        write_json(os.path.join(save_path, INDEX_NAME), {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def trained_system_prompt(args: dict) -> str:
    """The system prompt SFT/DPO rendered conversations with (run/config.py: FinetuneConfig's key);
    a pretrained model never saw one, so it keeps the default."""
    if "system_prompt" not in args:
        return DEFAULT_SYSTEM_PROMPT
    return "" if args["system_prompt"] is None else str(args["system_prompt"])


def write_hf_model(model_path: str, save_path: str, sampling, dtype: torch.dtype = torch.float32,
                   overwrite: bool = False, max_shard_size: int = 5 * GIB) -> None:
    """Export model_path to save_path; sampling (a GenerationConfig) gives generation_config.json's defaults."""
    check_model_dir(model_path, "model_path")
    args = read_training_args(model_path)
    system_prompt = trained_system_prompt(args)
    # the export appears whole or not at all, never in place of its input (base/output_guard.py)
    with publish_directory(save_path, {"model_path": model_path}, overwrite, "save_path") as tmp:
        model, cfg = load_model_dir(model_path)
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
        # A model imported from Hugging Face keeps its own tokenizer files, chat template included
        # (it was trained with that template); nanobumble's keeps its sentencepiece model beside.
        for name, data in tokenizer.files.items():
            atomic_write_bytes(os.path.join(tmp, name), data)
        atomic_write_text(os.path.join(tmp, "README.md"),
                          model_card(model_path, args, cfg, model.num_parameters(), HF_DTYPE_NAMES[dtype],
                                     system_prompt))
    shards = f", {len(weight_files)} shards" if len(weight_files) > 1 else ""
    print(f"exported {model_path} -> {save_path} (Qwen2ForCausalLM, {HF_DTYPE_NAMES[dtype]}, "
          f"{model.num_parameters() / 1e6:.1f}M parameters{shards})", file=sys.stderr)
