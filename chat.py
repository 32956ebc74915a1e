"""Talk to a trained model in the terminal.

    python chat.py --model_path ./checkpoints/dpo/bumblebee_1.5b_dpo_merged
    python chat.py --model_path ./checkpoints/sft/tiny_instruct --prompt "What is a bee?"
    printf 'Hi\\nTell me more\\n' | python chat.py --temperature 0
    python chat.py --model_path ./checkpoints/pretrain/tiny_base --prompt "Once upon a time"

Keys as in training (--yaml_config configs/chat.yaml, then --key value):
see ChatConfig below or run with --help.

Modes. "chat" renders the conversation with the ChatML template (the same
renderer as SFT/DPO) and the model answers as the assistant. "completion"
feeds the text as it is and the model continues it (what a pretrained base
model can do). "auto" (the default) picks chat when the adapter's or the
model's training_args.yaml says `stage: sft` or `stage: dpo`, completion
otherwise (a base model from pretraining).

Input. With a terminal: type a message; /reset clears the history, /exit (or
Ctrl-D) quits, Ctrl-C stops the answer being generated. Without one (input
piped on stdin) every line is a message, answered in turn until EOF. --prompt
answers one message and exits.

Output. The answer goes to stdout, streamed as whole characters; everything
else (loading, warnings, "[12 tokens, 40.1 tokens/s]" after each answer) goes
to stderr, so `python chat.py --prompt ... > answer.txt` holds only the answer.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import yaml

from nanobumble.chat_template import DEFAULT_SYSTEM_PROMPT, render
from nanobumble.checkpoint import check_model_dir, load_model_dir
from nanobumble.common import UserError, resolve_precision, run_cli
from nanobumble.config import ConfigError, parse_config
from nanobumble.generation import GenerationConfig, TextStreamer, fit_to_context, generate_stream
from nanobumble.lora import ADAPTER_CONFIG, load_adapter, read_adapter_config
from nanobumble.tokenizer import Tokenizer, load_tokenizer

CHAT_STAGES = ("sft", "dpo")


@dataclass
class ChatConfig:
    model_path: str = "checkpoints/sft/tiny_instruct"  # a model directory
    adapter_path: str = ""  # a LoRA adapter directory, applied on top of model_path (not merged)
    mode: str = "auto"  # auto | chat | completion (see the module docstring)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # "" = no system turn
    history: bool = True  # False: every message starts a new conversation
    prompt: str = ""  # answer this one message and exit
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    repetition_penalty: float = 1.1
    do_sample: bool = True  # False (or temperature 0): greedy
    seed: int = -1  # < 0: random; else answer i uses seed + i
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:1 ...
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32

    def __post_init__(self):
        if self.mode not in ("auto", "chat", "completion"):
            raise ConfigError(f"key 'mode' must be one of auto, chat, completion, got {self.mode!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"key 'precision' must be one of auto, bf16, fp32, got {self.precision!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"key 'device' must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        for key in ("prompt", "system_prompt"):
            try:
                getattr(self, key).encode("utf-8")
            except UnicodeEncodeError:  # bytes that were not UTF-8 come from the command line as lone surrogates
                raise ConfigError(f"key '{key}' is not UTF-8 text") from None
        if self.max_new_tokens < 1:
            raise ConfigError(f"key 'max_new_tokens' must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"key 'temperature' must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"key 'top_p' must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"key 'repetition_penalty' must be > 0, got {self.repetition_penalty}")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_stage(directory: str) -> str | None:
    """The `stage` key of directory/training_args.yaml, if there is one."""
    path = os.path.join(directory, "training_args.yaml")
    if not directory or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            args = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML: {e}") from None
    return str(args.get("stage")) if isinstance(args, dict) and args.get("stage") else None


def resolve_mode(mode: str, model_path: str, adapter_path: str) -> tuple[str, str]:
    """(mode, why). auto: chat if the adapter's or the model's training_args.yaml
    has stage sft or dpo, else completion."""
    if mode != "auto":
        return mode, "--mode"
    for directory in (adapter_path, model_path):
        stage = read_stage(directory)
        if stage in CHAT_STAGES:
            return "chat", f"{os.path.join(directory, 'training_args.yaml')} has stage: {stage}"
    return "completion", "no training_args.yaml with stage: sft or dpo"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name}: CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def load_model(cfg: ChatConfig, device: torch.device, dtype: torch.dtype):
    """The model (plus its adapter) and tokenizer. A LoRA run's output directory
    (adapter files, no model.safetensors) loads its base model from adapter_config.json."""
    model_path, adapter_path = cfg.model_path, cfg.adapter_path
    if not os.path.isdir(model_path):
        raise UserError(f"model_path {model_path}: no such directory")
    if not os.path.isfile(os.path.join(model_path, "model.safetensors")) and not adapter_path \
            and os.path.isfile(os.path.join(model_path, ADAPTER_CONFIG)):
        adapter_path = model_path
        model_path = read_adapter_config(model_path)["base_model_name_or_path"]
        log(f"{cfg.model_path} holds a LoRA adapter; base model: {model_path}")
    check_model_dir(model_path, "model_path")
    model, _ = load_model_dir(model_path)
    if adapter_path:
        adapter = load_adapter(model, adapter_path)
        log(f"adapter: {adapter_path} (r={adapter['r']}, {', '.join(adapter['target_modules'])})")
    model.to(device=device, dtype=dtype).eval()
    return model, load_tokenizer(model_path), model_path, adapter_path


def read_messages(prompt: str) -> Iterator[str]:
    """The user's messages: --prompt, else lines typed at a terminal, else lines piped on stdin."""
    if prompt:
        yield prompt
        return
    if not sys.stdin.isatty():
        for number, raw in enumerate(sys.stdin.buffer, start=1):  # bytes: a bad line is named, not guessed at
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"stdin line {number} is not UTF-8 text ({e.reason} at byte {e.start})") from None
            if line.strip():
                yield line.rstrip("\r\n")
        return
    while True:
        try:
            line = input("\n>>> ")
            line.encode("utf-8")  # bytes that were not UTF-8 may come through as lone surrogates
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # at the prompt: a fresh line, like the Python REPL
            print()
            continue
        except UnicodeError:  # not decodable, or not encodable for the tokenizer
            log("[that line is not UTF-8 text; ignored]")
            continue
        if line.strip():
            yield line


def answer(model, tokenizer: Tokenizer, prompt_ids: list[int], gen: GenerationConfig) -> str:
    """Generate, stream whole characters to stdout, report speed to stderr; return the text."""
    prompt_ids, cut = fit_to_context(prompt_ids, model.config.max_position_embeddings, gen.max_new_tokens)
    if cut:
        log(f"warning: the prompt is longer than the model's context ({model.config.max_position_embeddings} "
            f"tokens, with room to answer); cut {cut} tokens from the left")
    streamer = TextStreamer(tokenizer)
    pieces: list[str] = []
    stats: dict = {}
    tokens = generate_stream(model, prompt_ids, gen, stop_ids=(tokenizer.im_end_id, tokenizer.eot_id), stats=stats,
                             vocab_size=tokenizer.vocab_size)
    try:
        for token_id in tokens:
            piece = streamer.put(token_id)
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        tokens.close()
        log("\n[stopped]")
    tail = streamer.flush()
    pieces.append(tail)
    sys.stdout.write(tail + "\n")
    sys.stdout.flush()
    seconds = stats.get("decode_seconds", 0.0)
    speed = stats.get("new_tokens", 0) / seconds if seconds > 0 else 0.0
    note = "; context full" if stats.get("stop") == "context" else ""
    log(f"[{stats.get('new_tokens', 0)} tokens, {speed:.1f} tokens/s; prompt {stats.get('prompt_tokens', 0)} "
        f"tokens in {stats.get('prefill_seconds', 0.0):.2f}s{note}]")
    return "".join(pieces)


def main(argv: list[str]) -> None:
    cfg = parse_config(argv, ChatConfig)
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    start = time.time()
    model, tokenizer, model_path, adapter_path = load_model(cfg, device, dtype)
    mode, why = resolve_mode(cfg.mode, model_path, adapter_path)
    log(f"model: {model_path} ({model.num_parameters() / 1e6:.1f}M parameters, context "
        f"{model.config.max_position_embeddings}) on {device} {str(dtype).removeprefix('torch.')}, "
        f"loaded in {time.time() - start:.1f}s; mode: {mode} ({why})")
    if not cfg.prompt and sys.stdin.isatty():
        log("/reset clears the history, /exit quits, Ctrl-C stops an answer")

    messages: list[dict] = []
    for turn, text in enumerate(read_messages(cfg.prompt)):
        command = text.strip()
        if command == "/exit":
            break
        if command == "/reset":
            messages = []
            log("[history cleared]")
            continue
        gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                               top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
                               do_sample=cfg.do_sample, seed=cfg.seed + turn if cfg.seed >= 0 else None)
        if mode == "completion":
            prompt_ids = tokenizer.encode(text)
            if not prompt_ids:
                continue
            answer(model, tokenizer, prompt_ids, gen)
            continue
        if not cfg.history:
            messages = []
        messages.append({"role": "user", "content": text})
        prompt_ids, _ = render(messages, tokenizer, system_prompt=cfg.system_prompt, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": answer(model, tokenizer, prompt_ids, gen)})


if __name__ == "__main__":
    run_cli(main)
