"""Export a model directory to the Hugging Face format (Qwen2ForCausalLM).

    python -m nanobumble.export_hf --model_path checkpoints/dpo/bumblebee_1.5b_dpo_merged \
        --save_path exports/bumblebee_1.5b_hf [--dtype bf16]

The model already has Qwen2's shape and parameter names, so the export is a
renaming plus the files transformers expects:

    config.json              Qwen2Config keys (model_type "qwen2")
    model.safetensors        model.embed_tokens.weight, model.layers.N...,
                             model.norm.weight, lm_head.weight (when not tied)
    generation_config.json   the sampling defaults, stopping at <|im_end|> / <|endoftext|>
    tokenizer.json           the sentencepiece BPE as a `tokenizers` BPE (the same ids)
    tokenizer_config.json    special tokens, no BOS/EOS added, the ChatML chat template
    tokenizer.model          the sentencepiece model, unchanged

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
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from .chat_template import DEFAULT_SYSTEM_PROMPT
from .checkpoint import atomic_write_bytes, atomic_write_text, check_output_dir, load_model_dir, model_state_dict
from .common import UserError, run_cli
from .config import ConfigError, parse_config
from .generation import GenerationConfig
from .model import ModelConfig
from .tokenizer import EOT_ID, IM_END_ID, SPACE_PIECE, SPECIAL_TOKENS, UNK_ID, Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class ExportConfig:
    model_path: str = ""  # a nanobumble model directory (config.json + model.safetensors + tokenizer.model)
    save_path: str = ""  # the Hugging Face directory to write
    dtype: str = "fp32"  # fp32 (exact) | bf16 | fp16
    overwrite_output_dir: bool = False  # replace a model already in save_path

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"key 'dtype' must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
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
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "pad_token_id": EOT_ID,
        "torch_dtype": HF_DTYPE_NAMES[dtype],
    }


def hf_generation_config() -> dict:
    gen = GenerationConfig()
    return {"bos_token_id": EOT_ID, "eos_token_id": [IM_END_ID, EOT_ID], "pad_token_id": EOT_ID,
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


def chat_template() -> str:
    """ChatML as nanobumble's chat_template.render lays it out, in Jinja."""
    return (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT.replace("'", "\\'") + "<|im_end|>\\n' }}"
        "{%- endif %}"
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


def hf_tokenizer_config() -> dict:
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
        "chat_template": chat_template(),
    }


def write_json(path: str, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def export_hf(model_path: str, save_path: str, dtype: torch.dtype = torch.float32, overwrite: bool = False) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        if not os.path.isfile(os.path.join(model_path, name)):
            hint = " (a LoRA adapter directory? merge it into a full model first)" \
                if os.path.isfile(os.path.join(model_path, "adapter_config.json")) else ""
            raise UserError(f"model_path {model_path}: missing {name}{hint}")
    if os.path.abspath(model_path) == os.path.abspath(save_path):
        raise UserError("save_path must differ from model_path (the file formats share names)")
    check_output_dir(save_path, overwrite, "save_path")
    model, cfg = load_model_dir(model_path)
    state = hf_state_dict(model_state_dict(model), cfg, dtype)
    os.makedirs(save_path, exist_ok=True)
    tmp = os.path.join(save_path, f"model.safetensors.tmp-{os.getpid()}")
    save_file(state, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(save_path, "model.safetensors"))
    write_json(os.path.join(save_path, "config.json"), hf_config(cfg, dtype))
    write_json(os.path.join(save_path, "generation_config.json"), hf_generation_config())
    tokenizer = Tokenizer(os.path.join(model_path, "tokenizer.model"))
    write_json(os.path.join(save_path, "tokenizer.json"), hf_tokenizer_json(tokenizer))
    write_json(os.path.join(save_path, "tokenizer_config.json"), hf_tokenizer_config())
    with open(os.path.join(model_path, "tokenizer.model"), "rb") as f:
        atomic_write_bytes(os.path.join(save_path, "tokenizer.model"), f.read())
    print(f"exported {model_path} -> {save_path} (Qwen2ForCausalLM, {HF_DTYPE_NAMES[dtype]}, "
          f"{model.num_parameters() / 1e6:.1f}M parameters)", file=sys.stderr)


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, ExportConfig)
    if not cfg.model_path or not cfg.save_path:
        raise ConfigError("give both --model_path and --save_path")
    export_hf(cfg.model_path, cfg.save_path, DTYPES[cfg.dtype], cfg.overwrite_output_dir)


if __name__ == "__main__":
    run_cli(main)
