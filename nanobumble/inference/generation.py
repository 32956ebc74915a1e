"""Text generation: sampling filters, incremental decoding with a KV cache,
and a streamer that turns token ids into whole characters.

    for token_id in generate_stream(model, prompt_ids, GenerationConfig(seed=0)):
        ...

One step: logits of the last position -> repetition penalty -> (greedy: argmax)
or temperature -> top-k -> top-p -> softmax -> draw. The order is that of the
Hugging Face logits processors, so the same settings mean the same thing.

Decoding fills a KVCache (nanobumble/model/transformer.py): the prompt goes through the
model once (prefill), then each new token is one forward of a single
position that attends to the cached keys and values. `use_cache=False`
recomputes the whole sequence every step instead: the slow reference that
tests and the benchmark compare against.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from nanobumble.data.tokenizer import EOT_ID, IM_END_ID, Tokenizer
from nanobumble.model.transformer import KVCache, Transformer

STOP_IDS = (IM_END_ID, EOT_ID)


@dataclass
class GenerationConfig:
    """Defaults as the bumblebee (Qwen2.5 instruct) generation config."""
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_k: int = 20  # <= 0: off
    top_p: float = 0.8  # >= 1: off
    repetition_penalty: float = 1.1  # 1.0: off
    do_sample: bool = True  # False (or temperature 0): greedy
    seed: int | None = None  # None: a fresh random seed

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (as Hugging Face applies it): every token id already in the
    sequence gets logit / penalty when its logit is positive, logit * penalty
    otherwise; each id once, however often it occurred. logits: [vocab]."""
    if penalty == 1.0 or seen_ids.numel() == 0:
        return logits
    ids = seen_ids.unique()
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly the k largest logits, set the rest to -inf. Ties at the
    boundary go to the lower token id (a stable sort), so the count is always k."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    order = torch.sort(logits, descending=True, stable=True).indices
    filtered = torch.full_like(logits, float("-inf"))
    keep = order[:k]
    filtered[keep] = logits[keep]
    return filtered


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose
    probabilities sum to >= p (always at least the most likely one); ties in
    probability are ordered by token id, as in top_k_filter."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, stable=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
    drop = mass_before >= p  # the set already reached p without this token
    drop[0] = False
    filtered = logits.clone()
    filtered[order[drop]] = float("-inf")
    return filtered


def next_token(logits: torch.Tensor, seen_ids: torch.Tensor, cfg: GenerationConfig,
               generator: torch.Generator | None = None) -> int:
    """Pick the next token id from the last position's logits [vocab]."""
    logits = apply_repetition_penalty(logits.float(), seen_ids, cfg.repetition_penalty)
    if cfg.greedy:
        return int(logits.argmax())  # the lowest id among equal maxima
    scaled = logits / cfg.temperature
    if not torch.isfinite(scaled).all():  # a temperature so small that the logits overflow: greedy, its limit
        return int(logits.argmax())
    logits = top_p_filter(top_k_filter(scaled, cfg.top_k), cfg.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def fit_to_context(prompt_ids: list[int], context_len: int, max_new_tokens: int) -> tuple[list[int], int]:
    """Cut a prompt from the left so that it leaves room to answer: the prompt may
    use at most context_len - min(max_new_tokens, context_len // 4) positions.
    Returns the (possibly) shortened prompt and how many tokens were cut."""
    room = max(1, min(max_new_tokens, context_len // 4))
    limit = context_len - room
    cut = max(0, len(prompt_ids) - limit)
    return prompt_ids[cut:], cut


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


@torch.inference_mode()
def generate_stream(model: Transformer, prompt_ids: list[int], cfg: GenerationConfig,
                    stop_ids: Iterable[int] = STOP_IDS, use_cache: bool = True,
                    stats: dict | None = None, vocab_size: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time until a stop id (not yielded),
    max_new_tokens, or the end of the model's context.

    vocab_size: the tokenizer's; the model's embedding table is padded beyond it
    (pad_vocab_size) and those extra ids, which decode to nothing, are never drawn.

    stats, when given, is filled as generation goes: prompt_tokens, new_tokens,
    prefill_seconds, decode_seconds, stop ("stop_id" | "max_new_tokens" | "context").
    """
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    context_len = model.config.max_position_embeddings
    if len(prompt_ids) >= context_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the model's context "
                         f"of {context_len} (cut it with fit_to_context)")
    model.eval()
    device, dtype = _model_device_dtype(model)
    stop_ids = set(stop_ids)
    generator = None
    if not cfg.greedy:
        generator = torch.Generator(device=device)
        generator.manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(2**62, ())))
    max_len = min(context_len, len(prompt_ids) + cfg.max_new_tokens)
    cache = KVCache(model.config, 1, max_len, device, dtype) if use_cache else None
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    stats = stats if stats is not None else {}
    stats.update(prompt_tokens=len(prompt_ids), new_tokens=0, prefill_seconds=0.0, decode_seconds=0.0,
                 stop="max_new_tokens")

    start = time.perf_counter()
    logits = model(ids[None], kv_cache=cache)[0, -1]
    stats["prefill_seconds"] = _elapsed(start, device)
    start = time.perf_counter()
    for step in range(cfg.max_new_tokens):
        token = next_token(logits[:vocab_size], ids, cfg, generator)
        if token in stop_ids:
            stats["stop"] = "stop_id"
            break
        ids = torch.cat([ids, ids.new_tensor([token])])
        stats["new_tokens"] = step + 1
        stats["decode_seconds"] = _elapsed(start, device)
        yield token
        if len(ids) >= max_len:
            if len(ids) >= context_len:
                stats["stop"] = "context"
            break
        if cache is not None:
            logits = model(ids[None, -1:], kv_cache=cache)[0, -1]
        else:
            logits = model(ids[None])[0, -1]
    stats["decode_seconds"] = _elapsed(start, device)


def _elapsed(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class TextStreamer:
    """Token ids in, text out, only ever whole characters.

    put() returns the text that the new id completes. While the decoded text
    ends in U+FFFD (the first bytes of a multi-byte character whose remaining
    byte-fallback tokens have not arrived yet) it returns "" and holds the ids
    back; the character comes out whole with its last byte. flush() returns
    whatever is still held (an invalid byte sequence stays U+FFFD).
    Only the ids since the last whole character are decoded, so each step costs
    the same however long the answer grows.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []  # ids after the last whole character returned

    def put(self, token_id: int) -> str:
        self.pending.append(int(token_id))
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self.pending)
        self.pending = []
        return text
