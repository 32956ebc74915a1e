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

Errors. A model's own chat template (a Hugging Face model's) is compiled before
anything is said: one that is not Jinja ends chat.py with one line
"error: <its file>: ..." and exit code 2. One that fails on a conversation (an
undefined name, a sandbox refusal, no output, an output longer than the context
could hold) does the same with --prompt or piped input; at a terminal the line
is shown, the message is dropped, and the conversation goes on.

Output. The answer goes to stdout, streamed as whole characters; everything
else (loading, warnings, "[12 tokens, 40.1 tokens/s]" after each answer) goes
to stderr, so `python chat.py --prompt ... > answer.txt` holds only the answer.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from nanobumble.base.cpu import apply_num_threads, cpu_line
from nanobumble.base.errors import ConfigError, DataError, UserError, run_cli
from nanobumble.base.precision import resolve_precision
from nanobumble.data.chat_template import DEFAULT_SYSTEM_PROMPT, check_template, render
from nanobumble.data.tokenizer import Tokenizer
from nanobumble.inference.generation import GenerationConfig, TextStreamer, fit_to_context, generate_stream
from nanobumble.inference.loading import check_sampling_keys, load_model, log, resolve_device, resolve_mode
from nanobumble.run.config import check_numbers, parse_config


@dataclass
class ChatConfig:
    model_path: str = "checkpoints/sft/tiny_instruct"  # a model directory
    adapter_path: str = ""  # a LoRA adapter directory, applied on top of model_path (not merged)
    mode: str = "auto"  # auto | chat | completion (see the module docstring)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # "" = no system turn
    history: bool = True  # False: every message starts a new conversation
    prompt: str = ""  # answer this one message and exit
    max_new_tokens: int = 512  # the most tokens in one answer
    temperature: float = 0.7  # < 1 sharpens the next-token distribution, > 1 flattens it
    top_p: float = 0.8  # sample from the smallest set of tokens holding this much probability
    top_k: int = 20  # sample from the k likeliest tokens only (0: all)
    repetition_penalty: float = 1.1  # > 1 makes tokens already in the text less likely
    do_sample: bool = True  # False (or temperature 0): greedy
    seed: int = -1  # < 0: random; else answer i uses seed + i
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:1 ...
    precision: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else fp32) | bf16 | fp32
    num_threads: int = 0  # CPU threads for PyTorch's operations; 0: the free physical cores at start (base/cpu.py)

    def __post_init__(self):
        check_numbers(self)  # ranges: NUMBERS in run/config.py
        if self.mode not in ("auto", "chat", "completion"):
            raise ConfigError(f"key 'mode' must be one of auto, chat, completion, got {self.mode!r}")
        try:
            self.prompt.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8 come from the command line as lone surrogates
            raise ConfigError("key 'prompt' is not UTF-8 text") from None
        check_sampling_keys(self)


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
    if cfg.num_threads or device.type == "cpu":
        apply_num_threads(cfg.num_threads)
    dtype = resolve_precision(cfg.precision, device)
    start = time.time()
    model, tokenizer, model_path, adapter_path = load_model(cfg.model_path, cfg.adapter_path, device, dtype)
    mode, why = resolve_mode(cfg.mode, model_path, adapter_path)
    if mode == "chat":
        check_template(tokenizer)  # a template that is not Jinja fails now, not at the first message
    if device.type == "cpu":
        log(cpu_line())  # cpu: ..., native bf16: no (flags: avx2); threads: ...
    log(f"model: {model_path} ({model.num_parameters() / 1e6:.1f}M parameters, context "
        f"{model.config.max_position_embeddings}) on {device} {str(dtype).removeprefix('torch.')}, "
        f"loaded in {time.time() - start:.1f}s; mode: {mode} ({why})")
    interactive = not cfg.prompt and sys.stdin.isatty()
    if interactive:
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
        try:
            prompt_ids, _ = render(messages, tokenizer, system_prompt=cfg.system_prompt, add_generation_prompt=True,
                                   context_len=model.config.max_position_embeddings)
        except DataError as e:  # the model's chat template failed on this conversation
            if not interactive:
                raise
            log(f"error: {e}")
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": answer(model, tokenizer, prompt_ids, gen)})


if __name__ == "__main__":
    run_cli(main)
