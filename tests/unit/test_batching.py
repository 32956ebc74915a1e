"""Batched decoding: a KV cache with a length per row, generate_batch, and the continuous Batcher."""

import threading

import pytest
import torch
from helpers import generate
from test_generation import GREEDY, ScriptedModel, tiny_model

from nanobumble.data.tokenizer import IM_END_ID
from nanobumble.inference.batching import Batcher, generate_batch
from nanobumble.inference.generation import Decoder, GenerationConfig
from nanobumble.model.transformer import KVCache

PROMPTS = [[4, 17, 9, 30, 30, 2], [5, 6], [7, 8, 9, 10, 11, 12, 13, 14, 15, 3, 50]]


@pytest.fixture(scope="module")
def model():
    return tiny_model()  # float64: batched and alone must agree exactly


@pytest.fixture(scope="module")
def alone(model):
    """Each prompt's 30 greedy tokens, decoded by itself."""
    return [generate(model, prompt, GREEDY, stop_ids=()) for prompt in PROMPTS]


def test_rows_at_their_own_positions_give_the_logits_of_a_full_forward(model):
    """Right-padded prefill of rows of different lengths, decode steps of a subset of rows,
    a row that joins mid-way and a row freed and reused: every logit as a full recompute."""
    ids = torch.randint(0, 96, (3, 24), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.config, 3, 24, "cpu")
    lengths = [5, 9, 0]  # rows 0 and 1 first; row 2 joins later
    mask = torch.tensor([[1] * 5 + [0] * 4, [1] * 9])
    out = model(ids[:2, :9] * mask, attention_mask=mask, kv_cache=cache)
    worst = 0.0

    def check(logits, row, length):  # the logits after the first `length` tokens of row `row`
        nonlocal worst
        full = model(ids[row:row + 1, :length])[0, -1]
        worst = max(worst, (logits - full).abs().max().item())

    for b in range(2):
        check(out[b, lengths[b] - 1], b, lengths[b])
    assert cache.lengths.tolist() == lengths
    for step in range(12):
        rows = [0, 1] if step < 3 else [2, 0, 1] if step % 4 else [1, 2]  # row 0 sits out some steps
        if step == 3:  # row 2 joins: its prompt alone into the free row
            out = model(ids[2:3, :4], kv_cache=cache, cache_rows=[2])
            lengths[2] = 4
            check(out[0, -1], 2, 4)
        if step == 9:  # row 0 is freed and takes a new sequence (row 0 of a different draw)
            cache.reset(0)
            ids[0] = torch.randint(0, 96, (24,), generator=torch.Generator().manual_seed(1))
            out = model(ids[0:1, :3], kv_cache=cache, cache_rows=[0])
            lengths[0] = 3
            check(out[0, -1], 0, 3)
        tokens = torch.stack([ids[r, lengths[r]] for r in rows])[:, None]
        out = model(tokens, kv_cache=cache, cache_rows=rows)
        for b, r in enumerate(rows):
            lengths[r] += 1
            check(out[b, 0], r, lengths[r])
        assert cache.lengths.tolist() == lengths
    assert worst < 1e-10


def test_rows_of_different_lengths_decoded_together_give_each_ones_tokens_alone(model, alone):
    assert len({tuple(tokens) for tokens in alone}) == 3 and all(len(set(t)) > 3 for t in alone)
    decoder = Decoder(model, max_batch=3)
    results = generate_batch(model, PROMPTS, GREEDY, stop_ids=(), decoder=decoder)
    assert [tokens for tokens, _ in results] == alone
    assert decoder.prefill_rows == [3] and decoder.step_rows == [3] * 29  # one forward a step for all rows
    # two rows at a time: the third prompt takes the first free row
    decoder = Decoder(model, max_batch=2)
    configs = [GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=n) for n in (30, 10, 30)]
    results = generate_batch(model, PROMPTS, configs, stop_ids=(), decoder=decoder)
    assert [tokens for tokens, _ in results] == [alone[0], alone[1][:10], alone[2]]
    assert decoder.prefill_rows == [2, 1] and max(decoder.step_rows) == 2


def test_a_seeded_sampled_row_draws_the_same_tokens_alone_and_beside_others(model):
    sampled = GenerationConfig(temperature=1.5, top_k=0, top_p=0.95, repetition_penalty=1.2, max_new_tokens=15,
                               seed=7)
    alone = generate(model, PROMPTS[1], sampled, stop_ids=())
    others = [GenerationConfig(temperature=1.0, max_new_tokens=15, seed=None), GREEDY,
              GenerationConfig(temperature=2.0, top_k=5, max_new_tokens=15, seed=8)]
    results = generate_batch(model, [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]],
                             [others[0], sampled, others[1], others[2]], stop_ids=())
    assert results[1][0] == alone and len(set(alone)) > 5
    assert generate_batch(model, [PROMPTS[1]] * 2, [sampled, sampled], stop_ids=())[1][0] == alone
    assert generate(model, PROMPTS[1], GenerationConfig(**{**sampled.__dict__, "seed": 8}), stop_ids=()) != alone


def test_each_row_stops_at_its_own_stop_id_max_new_tokens_or_context_end():
    model = ScriptedModel({3: 5, 4: 6, 5: IM_END_ID}, context=16)  # position n -> script[n], else 9
    configs = [GREEDY, GenerationConfig(do_sample=False, max_new_tokens=4), GREEDY, GREEDY]
    results = generate_batch(model, [[10] * 3, [10] * 6, [10] * 12, [10] * 15], configs, max_batch=2)
    assert [tokens for tokens, _ in results] == [[5, 6], [9] * 4, [9] * 4, [9]]
    assert [stats["stop"] for _, stats in results] == ["stop_id", "max_new_tokens", "context", "context"]
    assert [stats["new_tokens"] for _, stats in results] == [2, 4, 4, 1]
    assert [stats["prompt_tokens"] for _, stats in results] == [3, 6, 12, 15]
    with pytest.raises(ValueError, match="context"):
        generate_batch(model, [[10] * 3, [10] * 16], GREEDY)


def test_batcher_serves_two_requests_submitted_together_in_one_forward_a_step(model, alone):
    with Batcher(model, max_batch=4) as batcher:
        with batcher._lock:  # the batcher thread sees both requests at once
            first = batcher.submit(PROMPTS[0], GREEDY, stop_ids=())
            second = batcher.submit(PROMPTS[2], GREEDY, stop_ids=())
        assert list(first) == alone[0] and list(second) == alone[2]
        assert batcher.prefill_rows == [2] and batcher.step_rows == [2] * 29 and batcher.forwards == 30
    assert first.done and first.stats["stop"] == "max_new_tokens" and first.stats["new_tokens"] == 30
    assert first.stats["prompt_tokens"] == 6 and first.stats["time_to_first_token"] > 0


def test_batcher_a_request_joins_mid_way_and_a_cancelled_one_frees_its_row(model, alone):
    gate, delivered = threading.Event(), []

    def hold_after_three():  # runs in the batcher thread: it waits there until the second request is in
        delivered.append(1)
        if len(delivered) == 3:
            assert gate.wait(30)

    with Batcher(model, max_batch=2) as batcher:
        first = batcher.submit(PROMPTS[0], GREEDY, stop_ids=(), notify=hold_after_three)
        head = [next(first) for _ in range(3)]
        joining = batcher.submit(PROMPTS[1], GREEDY, stop_ids=())
        cancelled = batcher.submit(PROMPTS[2], GenerationConfig(max_new_tokens=40, seed=0), stop_ids=())
        gate.set()
        assert head + list(first) == alone[0]
        assert list(joining) == alone[1]
        assert 2 in batcher.step_rows  # the joining request stepped beside the first one
        assert cancelled.get(timeout=30) is not None  # it had a row (the first two are done) and ran
        cancelled.cancel()
        rest = list(cancelled)
        assert cancelled.stats["stop"] == "cancelled" and cancelled.stats["new_tokens"] < 40
        assert cancelled.get() is None and len(rest) < 40  # ended for good
        count = cancelled.stats["new_tokens"]
        # its row is free again: two more requests both run (max_batch 2), nothing waits forever
        late = [batcher.submit(PROMPTS[i], GREEDY, stop_ids=()) for i in (1, 0)]
        assert [late[0].get(timeout=30), late[1].get(timeout=30)] == [alone[1][0], alone[0][0]]
        assert list(late[1]) == alone[0][1:]
        assert cancelled.stats["new_tokens"] == count  # its row took no step after the cancel
    assert late[0].done and late[0].stats["stop"] in ("closed", "max_new_tokens")


def test_batcher_refuses_a_prompt_without_room_and_reports_model_errors(model):
    with Batcher(model, max_batch=1) as batcher:
        with pytest.raises(ValueError, match="context"):
            batcher.submit([1] * 64, GREEDY)
        broken = batcher.submit([1, 2, 3], GREEDY, vocab_size=0)
        with pytest.raises(IndexError):  # argmax over no logits: raised to the request, the thread lives on
            list(broken)
        assert broken.stats["stop"] == "error"
        assert len(list(batcher.submit([1, 2, 3], GREEDY, stop_ids=()))) == 30
