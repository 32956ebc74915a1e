"""Many prompts through one model at once, on the Decoder of generation.py (one
KV cache, a row per sequence, one forward per step for every active row).

    generate_batch(model, prompts, configs)   synchronous: every prompt's new ids and stats
    Batcher(model).submit(prompt_ids, cfg)    continuous batching for a server: a background
                                              thread steps all running requests together;
                                              new ones join at the next step

Each row keeps its own sampling settings and, when sampling, its own
torch.Generator: a seeded request draws the same tokens alone or beside others.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable

import torch

from nanobumble.inference.generation import STOP_IDS, Decoder, GenerationConfig, Sequence, _model_device_dtype

__all__ = ["Batcher", "Decoder", "Handle", "generate_batch"]


def generate_batch(model, prompts: list[list[int]], configs: GenerationConfig | list[GenerationConfig],
                   stop_ids: Iterable[int] = STOP_IDS, vocab_size: int | None = None, max_batch: int = 8,
                   max_len: int | None = None, dtype: torch.dtype = torch.float32,
                   decoder: Decoder | None = None) -> list[tuple[list[int], dict]]:
    """Each prompt's new ids (stop id excluded) and stats (see generation.Sequence), in
    prompt order. configs: one for all, or one per prompt. At most max_batch rows run
    at once; a finished row takes the next waiting prompt (in order) at the next step.
    max_len: a row's room (default: the longest prompt + its max_new_tokens, at most the
    context). dtype: the autocast dtype. decoder: a Decoder to run on (its counts then
    show the forwards)."""
    if isinstance(configs, GenerationConfig):
        configs = [configs] * len(prompts)
    if len(configs) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(configs)} generation configs")
    model.eval()
    context_len = model.config.max_position_embeddings
    device = _model_device_dtype(model)[0]
    seqs = [Sequence(prompt, cfg, stop_ids, vocab_size, None, context_len, device)
            for prompt, cfg in zip(prompts, configs)]
    if decoder is None:
        room = max((len(p) + max(cfg.max_new_tokens, 1) for p, cfg in zip(prompts, configs)), default=1)
        decoder = Decoder(model, max_batch, min(max_len or room, context_len), dtype=dtype)
    waiting = deque(seqs)
    while waiting or decoder.active:
        if waiting and decoder.free_rows():
            decoder.add([waiting.popleft() for _ in range(min(len(waiting), decoder.free_rows()))])
        decoder.step()
    return [(seq.tokens, seq.stats) for seq in seqs]


_END = object()


class Handle:
    """One request to a Batcher: its new token ids as they come, its stats, cancel().

    Iterate it (blocking) for the ids; get(timeout) for one id or None at the end;
    poll() for the ids there now. stats is final once done is True. An error in the
    batcher thread is raised here. Every method may be called from any thread."""

    def __init__(self, batcher: Batcher, seq: Sequence, notify: Callable[[], None] | None):
        self._batcher, self._seq, self._notify = batcher, seq, notify
        self._queue: queue.Queue = queue.Queue()
        self._ended = False  # the consumer has seen the end
        self._sent = 0  # ids queued so far (the batcher thread's count)
        self.done = False  # set by the batcher thread before the end is queued
        self.stats = seq.stats

    def __iter__(self):
        return self

    def __next__(self) -> int:
        token = self.get()
        if token is None:
            raise StopIteration
        return token

    def get(self, timeout: float | None = None) -> int | None:
        """The next new id, or None once the answer has ended (queue.Empty on timeout)."""
        if self._ended:
            return None
        item = self._queue.get(timeout=timeout)
        return self._take(item)

    def poll(self) -> list[int]:
        """The new ids available now, without waiting (check done for the end)."""
        tokens = []
        while not self._ended:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            token = self._take(item)
            if token is not None:
                tokens.append(token)
        return tokens

    def cancel(self) -> None:
        """The client went away: the row frees before the next forward. Idempotent."""
        self._batcher._cancel(self)

    def _take(self, item) -> int | None:
        if item is _END:
            self._ended = True
            return None
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item

    def _put(self, item) -> None:  # the batcher thread only
        self._queue.put(item)
        if self._notify is not None:
            self._notify()


class Batcher:
    """Continuous batching: requests come from any thread (submit), one background
    thread runs the model. Each step admits waiting requests into free rows (one
    prefill forward for all of them), then runs one decode forward for every active
    row. At most max_batch rows; the others wait in submit order. Only the batcher
    thread touches the model while it runs.

    Counts (read them when idle): forwards, prefill_rows and step_rows (the rows each
    forward served)."""

    def __init__(self, model, max_batch: int = 8, max_len: int | None = None, dtype: torch.dtype = torch.float32):
        model.eval()
        self.model = model
        self.context_len = model.config.max_position_embeddings
        self.device = _model_device_dtype(model)[0]
        self.decoder = Decoder(model, max_batch, max_len, dtype=dtype)
        self._lock = threading.Condition()
        self._waiting: deque[Handle] = deque()
        self._cancelled: list[Handle] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="nanobumble-batcher", daemon=True)
        self._thread.start()

    @property
    def forwards(self) -> int:
        return self.decoder.forwards

    @property
    def step_rows(self) -> list[int]:
        return self.decoder.step_rows

    @property
    def prefill_rows(self) -> list[int]:
        return self.decoder.prefill_rows

    def submit(self, prompt_ids: list[int], cfg: GenerationConfig, stop_ids: Iterable[int] = STOP_IDS,
               vocab_size: int | None = None, notify: Callable[[], None] | None = None) -> Handle:
        """Queue a request; returns at once. notify (optional, no arguments) is called by
        the batcher thread after each new id and at the end."""
        seq = Sequence(prompt_ids, cfg, stop_ids, vocab_size, None, self.context_len, self.device)
        if seq.length >= self.decoder.max_len:
            raise ValueError(f"prompt of {seq.length} tokens leaves no room in a row of {self.decoder.max_len}")
        handle = Handle(self, seq, notify)
        seq.owner = handle
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._waiting.append(handle)
            self._lock.notify()
        return handle

    def close(self) -> None:
        """Stop the thread (after its current step); unfinished requests end with stop "closed"."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _cancel(self, handle: Handle) -> None:
        with self._lock:
            self._cancelled.append(handle)
            self._lock.notify()

    def _end(self, handle: Handle, stop: str | None = None, error: BaseException | None = None) -> None:
        if handle.done:
            return
        if stop is not None:
            handle.stats["stop"] = stop
        self.decoder.remove(handle._seq)
        handle.done = True
        handle._put(error if error is not None else _END)

    def _deliver(self, seqs: list[Sequence]) -> None:
        """Send each sequence's ids that its handle has not had yet; end the finished ones."""
        for seq in seqs:
            handle = seq.owner
            while handle._sent < len(seq.tokens):
                handle._sent += 1
                handle._put(seq.tokens[handle._sent - 1])
            if seq.done:
                self._end(handle)

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._closed or self._waiting or self._cancelled or self.decoder.active):
                        self._lock.wait()
                    closed = self._closed
                    cancelled, self._cancelled = self._cancelled, []
                    for handle in cancelled:
                        if handle in self._waiting:
                            self._waiting.remove(handle)
                for handle in cancelled:  # their rows free before the next forward
                    self._end(handle, "cancelled")
                with self._lock:
                    admit = []
                    while self._waiting and (closed or len(admit) < self.decoder.free_rows()):
                        admit.append(self._waiting.popleft())
                if closed:
                    for handle in admit + [seq.owner for seq in self.decoder.active]:
                        self._end(handle, "closed")
                    return
                try:
                    if admit:
                        self.decoder.add([handle._seq for handle in admit])
                        self._deliver([handle._seq for handle in admit])
                    self._deliver(self.decoder.step())
                except Exception as error:  # every live request hears of it; the thread goes on
                    for handle in admit + [seq.owner for seq in self.decoder.active]:
                        self._end(handle, "error", error)
