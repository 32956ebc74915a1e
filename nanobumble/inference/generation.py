"""Text generation: sampling filters, the decode loop over a batched KV cache,
and a streamer that turns token ids into whole characters.

    for token_id in generate_stream(model, prompt_ids, GenerationConfig(seed=0)):
        ...

One step: logits of the last position -> repetition penalty -> (greedy: argmax)
or temperature -> top-k -> top-p -> softmax -> draw. The order is that of the
Hugging Face logits processors, so the same settings mean the same thing.

The Decoder is the one decode loop (generate_stream, batching.generate_batch,
batching.Batcher and evaluate's greedy_generate all run on it). It holds a
KVCache (nanobumble/model/transformer.py) with a row per sequence: prompts go
through the model once (prefill, several right-padded in one forward), then each
step is one forward of one token per row, at that row's own position, attending
to that row's cached keys and values. `use_cache=False` recomputes every
sequence whole each step instead: the slow reference that tests and the
benchmark compare against.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from nanobumble.base.precision import autocast
from nanobumble.data.tokenizer import EOT_ID, IM_END_ID, Tokenizer
from nanobumble.model.attention import bucket_width
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


class Sequence:
    """One prompt being answered: its settings, its new ids so far, its stats, its row.

    stats: prompt_tokens, new_tokens, prefill_seconds, decode_seconds, time_to_first_token
    (seconds from creation to the first new id), stop ("stop_id" | "max_new_tokens" | "context",
    or what the caller sets: "cancelled", "closed", "error")."""

    def __init__(self, prompt_ids: list[int], cfg: GenerationConfig, stop_ids: Iterable[int] = STOP_IDS,
                 vocab_size: int | None = None, stats: dict | None = None, context_len: int | None = None,
                 device: torch.device | str = "cpu"):
        if not prompt_ids:
            raise ValueError("generate needs at least one prompt token")
        if context_len is not None and len(prompt_ids) >= context_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the model's context "
                             f"of {context_len} (cut it with fit_to_context)")
        self.prompt_ids, self.cfg, self.stop_ids, self.vocab_size = list(prompt_ids), cfg, set(stop_ids), vocab_size
        self.tokens: list[int] = []
        self.generator = None
        if not cfg.greedy:  # its own generator: a seeded row draws the same tokens whoever its neighbours are
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(cfg.seed if cfg.seed is not None else int(torch.randint(2**62, ())))
        # prompt and new ids on the device, kept only for the repetition penalty
        self.seen = torch.tensor(prompt_ids if cfg.repetition_penalty != 1.0 else [], dtype=torch.long, device=device)
        self.row: int | None = None
        self.done = False
        self.created = time.perf_counter()
        self.first_token_time: float | None = None
        self.stats = stats if stats is not None else {}
        self.stats.update(prompt_tokens=len(prompt_ids), new_tokens=0, prefill_seconds=0.0, decode_seconds=0.0,
                          time_to_first_token=None, stop="max_new_tokens")
        self.owner = None  # whatever the caller ties to it (the batcher: its handle)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.tokens)


class Decoder:
    """The decode loop, for up to max_batch sequences at once: each in its own row of
    one KVCache, of its own length, with its own sampling settings.

        decoder.add(sequences)  one forward: the new prompts, right-padded, into free rows
                                (prefill), and each one's first new id
        decoder.step()          one forward: every active row's last id at its own position,
                                and each one's next id

    A sequence is done at a stop id (not kept), at cfg.max_new_tokens, or when it
    fills its row (max_len, the model's context at most); its row is then free for
    the next add. use_cache=False recomputes every sequence whole at each step
    instead (the slow reference). dtype: the autocast dtype (float32: none).
    Counts: forwards, prefill_rows and step_rows (the rows of each forward).
    Not thread-safe: one thread drives it (see batching.Batcher)."""

    def __init__(self, model: Transformer, max_batch: int, max_len: int | None = None, use_cache: bool = True,
                 dtype: torch.dtype = torch.float32):
        self.model = model
        self.context_len = model.config.max_position_embeddings
        self.max_len = min(max_len or self.context_len, self.context_len)
        self.device = _model_device_dtype(model)[0]
        self.dtype = dtype
        self.cache = KVCache(model.config, max_batch, self.max_len, self.device) if use_cache else None
        self.rows: list[Sequence | None] = [None] * max_batch
        self.forwards = 0
        self.prefill_rows: list[int] = []
        self.step_rows: list[int] = []

    @property
    def active(self) -> list[Sequence]:
        return [seq for seq in self.rows if seq is not None]

    def free_rows(self) -> int:
        return self.rows.count(None)

    def remove(self, seq: Sequence) -> None:
        """Free the sequence's row (a cancelled request); it is done."""
        if seq.row is not None and self.rows[seq.row] is seq:
            self.rows[seq.row] = None
        seq.row, seq.done = None, True

    @torch.inference_mode()
    def add(self, seqs: list[Sequence]) -> None:
        """Prefill new sequences into free rows (one forward) and pick each one's first id."""
        seqs = [seq for seq in seqs if not self._finished_before_start(seq)]
        if not seqs:
            return
        if len(seqs) > self.free_rows():
            raise ValueError(f"{len(seqs)} sequences, {self.free_rows()} free rows")
        for seq in seqs:
            if seq.length >= self.max_len:
                raise ValueError(f"prompt of {seq.length} tokens leaves no room in a row of {self.max_len}")
            seq.row = self.rows.index(None)
            self.rows[seq.row] = seq
            if self.cache is not None:
                self.cache.reset(seq.row)
        start = time.perf_counter()
        logits = self._forward(seqs, [seq.prompt_ids for seq in seqs])
        self.prefill_rows.append(len(seqs))
        self._pick(seqs, logits)
        elapsed = time.perf_counter() - start
        for seq in seqs:
            seq.stats["prefill_seconds"] = elapsed

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One forward for every active sequence; returns them (each has one more id, or is done)."""
        seqs = self.active
        if seqs:
            logits = self._forward(seqs, [seq.tokens[-1:] for seq in seqs])
            self.step_rows.append(len(seqs))
            self._pick(seqs, logits)
        return seqs

    def _finished_before_start(self, seq: Sequence) -> bool:
        if seq.cfg.max_new_tokens <= 0:
            seq.done = True
        return seq.done

    def _forward(self, seqs: list[Sequence], new_ids: list[list[int]]) -> torch.Tensor:
        """The logits [len(seqs), vocab] after each sequence's new ids."""
        self.forwards += 1
        if self.cache is None:  # the reference: every sequence whole, right-padded (causal: no mask needed)
            new_ids = [seq.prompt_ids + seq.tokens for seq in seqs]
        width = max(len(ids) for ids in new_ids)
        if self.cache is None and getattr(self.model, "compiled", False):
            # compiled blocks: a few padded widths rather than a new shape every step (attention.bucket_width);
            # the cached path runs its blocks eagerly (Block.compile), so its widths do not matter
            width = bucket_width(width, self.context_len)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for b, row_ids in enumerate(new_ids):
            ids[b, :len(row_ids)] = torch.tensor(row_ids)
        kwargs = {}
        if self.cache is not None:
            kwargs = dict(kv_cache=self.cache, cache_rows=[seq.row for seq in seqs], last_only=True)
            if any(len(row_ids) < width for row_ids in new_ids):
                mask = torch.zeros(len(seqs), width, dtype=torch.long)
                for b, row_ids in enumerate(new_ids):
                    mask[b, :len(row_ids)] = 1
                kwargs["attention_mask"] = mask.to(self.device)
        with autocast(self.device, self.dtype):
            logits = self.model(ids.to(self.device), **kwargs)
        if self.cache is None:
            last = torch.tensor([len(row_ids) - 1 for row_ids in new_ids], device=self.device)
            logits = logits[torch.arange(len(seqs), device=self.device), last]
        return logits

    def _pick(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Each sequence's next id from its logits row, then whether it is done."""
        picked: dict[int, int] = {}
        plain = [b for b, seq in enumerate(seqs) if seq.cfg.greedy and seq.cfg.repetition_penalty == 1.0]
        for vocab in {seqs[b].vocab_size for b in plain}:  # plain greedy rows: one argmax, one transfer
            rows = [b for b in plain if seqs[b].vocab_size == vocab]
            picked.update(zip(rows, logits[rows, :vocab].float().argmax(-1).tolist()))
        for b, seq in enumerate(seqs):
            if b not in picked:
                picked[b] = next_token(logits[b, :seq.vocab_size], seq.seen, seq.cfg, seq.generator)
        now = time.perf_counter()
        for b, seq in enumerate(seqs):
            self._advance(seq, picked[b], now)

    def _advance(self, seq: Sequence, token: int, now: float) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now
            seq.stats["time_to_first_token"] = now - seq.created
        seq.stats["decode_seconds"] = now - seq.first_token_time
        if token in seq.stop_ids:
            seq.stats["stop"] = "stop_id"
            self.remove(seq)
            return
        seq.tokens.append(token)
        seq.stats["new_tokens"] = len(seq.tokens)
        if seq.cfg.repetition_penalty != 1.0:
            seq.seen = torch.cat([seq.seen, seq.seen.new_tensor([token])])
        if seq.length >= self.context_len:
            seq.stats["stop"] = "context"
        elif len(seq.tokens) >= seq.cfg.max_new_tokens:
            seq.stats["stop"] = "max_new_tokens"
        elif seq.length >= self.max_len:  # the row is full: this decoder's context
            seq.stats["stop"] = "context"
        else:
            return
        self.remove(seq)


@torch.inference_mode()
def generate_stream(model: Transformer, prompt_ids: list[int], cfg: GenerationConfig,
                    stop_ids: Iterable[int] = STOP_IDS, use_cache: bool = True,
                    stats: dict | None = None, vocab_size: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time until a stop id (not yielded),
    max_new_tokens, or the end of the model's context: a Decoder with one row.

    vocab_size: the tokenizer's; the model's embedding table is padded beyond it
    (pad_vocab_size) and those extra ids, which decode to nothing, are never drawn.

    stats, when given, is filled as generation goes: prompt_tokens, new_tokens,
    prefill_seconds, decode_seconds, time_to_first_token,
    stop ("stop_id" | "max_new_tokens" | "context").
    """
    model.eval()
    device = _model_device_dtype(model)[0]
    seq = Sequence(prompt_ids, cfg, stop_ids, vocab_size, stats, model.config.max_position_embeddings, device)
    room = len(prompt_ids) + max(cfg.max_new_tokens, 1)
    decoder = Decoder(model, 1, min(model.config.max_position_embeddings, room), use_cache)
    decoder.add([seq])
    sent = 0
    while True:
        while sent < len(seq.tokens):
            sent += 1
            yield seq.tokens[sent - 1]
        if seq.done:
            return
        decoder.step()


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
