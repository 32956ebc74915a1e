"""KV-cache decoding, sampling filters, stopping, and whole-character streaming."""

import pytest
import torch
import torch.nn as nn
from helpers import generate, stream_text

from nanobumble.data.tokenizer import EOT_ID, IM_END_ID, Tokenizer, train_tokenizer
from nanobumble.inference.generation import (GenerationConfig, TextStreamer, apply_repetition_penalty, fit_to_context,
                                             generate_stream, next_token, top_k_filter, top_p_filter)
from nanobumble.model.transformer import KVCache, ModelConfig, Transformer

GREEDY = GenerationConfig(do_sample=False, repetition_penalty=1.0, max_new_tokens=30)


def tiny_model(dtype=torch.float64, **overrides) -> Transformer:
    cfg = ModelConfig(**{**dict(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                intermediate_size=96, max_position_embeddings=64), **overrides})
    model = Transformer(cfg)
    with torch.no_grad():  # larger weights than the init: confident, varied predictions
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20)
    return model.to(dtype).eval()


def test_cache_holds_only_the_kv_heads_in_the_model_dtype():
    model = tiny_model(torch.float32)
    cache = KVCache(model.config, batch_size=1, max_len=10, device="cpu")
    model(torch.tensor([[5, 6, 7]]), kv_cache=cache)
    assert cache.keys[0].shape == (1, 2, 10, 16) and len(cache.values) == 2 and cache.keys[0].dtype == torch.float32
    assert cache.lengths.tolist() == [3] and cache.keys[1][:, :, 3:].abs().sum() == 0


def test_greedy_with_cache_equals_recomputing_every_step():
    model = tiny_model()
    prompt = [4, 17, 9, 30, 30, 2]
    with_cache = generate(model, prompt, GREEDY, stop_ids=())
    without = generate(model, prompt, GREEDY, stop_ids=(), use_cache=False)
    assert len(with_cache) == 30 and len(set(with_cache)) > 3
    assert with_cache == without
    # and a hand-written loop over full forwards, token by token
    ids = list(prompt)
    for expected in with_cache:
        assert int(model(torch.tensor([ids]))[0, -1].argmax()) == expected
        ids.append(expected)


def test_cached_logits_match_full_forward_in_chunks():
    model = tiny_model()
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    cache = KVCache(model.config, 2, 20, "cpu")
    parts = [model(ids[:, :7], kv_cache=cache), model(ids[:, 7:12], kv_cache=cache)]  # prefill, then a chunk
    parts += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(12, 20)]  # one token per step
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="full"):
        model(ids[:, :1], kv_cache=cache)


def test_top_k_keeps_exactly_the_k_largest_ties_to_the_lower_id():
    logits = torch.tensor([1.0, 5.0, 3.0, 5.0, 2.0])
    kept = lambda out: torch.isfinite(out).nonzero().flatten().tolist()
    assert kept(top_k_filter(logits, 2)) == [1, 3]
    assert kept(top_k_filter(logits, 3)) == [1, 2, 3]
    assert kept(top_k_filter(torch.tensor([2.0, 1.0, 2.0, 2.0]), 2)) == [0, 2]
    assert kept(top_k_filter(logits, 0)) == [0, 1, 2, 3, 4]
    assert top_k_filter(logits, 2)[1] == 5.0  # kept logits are unchanged


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).nonzero().flatten().tolist()
    assert kept(0.4) == [1]
    assert kept(0.6) == [1, 3]
    assert kept(0.9) == [0, 1, 3]
    assert kept(0.99) == [0, 1, 2, 3]
    assert kept(1e-6) == [1]  # always at least the most likely token
    assert kept(1.0) == [0, 1, 2, 3]
    # four equal probabilities (exactly 0.25 each): two reach p = 0.5, the lower ids win the tie
    assert torch.isfinite(top_p_filter(torch.zeros(4), 0.5)).nonzero().flatten().tolist() == [0, 1]


def test_repetition_penalty_divides_positive_multiplies_negative_seen_logits():
    logits = torch.tensor([2.0, -1.0, 0.5, -0.5, 3.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1, 3]), 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, -1.0, 3.0]  # ids 2 and 4 never seen: unchanged
    assert logits.tolist() == [2.0, -1.0, 0.5, -0.5, 3.0]  # the input is not modified
    # the penalty can change the greedy choice: 3.0 (seen) / 2 < 2.0
    cfg = GenerationConfig(do_sample=False, repetition_penalty=2.0)
    assert next_token(torch.tensor([2.0, 0.0, 3.0]), torch.tensor([2]), cfg) == 0


def test_greedy_when_temperature_zero_or_do_sample_false():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    for cfg in (GenerationConfig(temperature=0.0), GenerationConfig(do_sample=False, temperature=5.0)):
        assert all(next_token(logits, torch.tensor([], dtype=torch.long), cfg,
                              torch.Generator().manual_seed(s)) == 1 for s in range(20))


def test_sampling_draws_only_from_the_filtered_set():
    logits = torch.tensor([3.0, 2.9, 2.8, 0.0, 2.7, -1.0])
    cfg = GenerationConfig(temperature=2.0, top_k=3, top_p=1.0, repetition_penalty=1.0)
    generator = torch.Generator().manual_seed(0)
    draws = {next_token(logits, torch.tensor([], dtype=torch.long), cfg, generator) for _ in range(300)}
    assert draws == {0, 1, 2}


def test_seed_makes_sampling_reproducible():
    model = tiny_model(torch.float32)
    cfg = lambda seed: GenerationConfig(temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=25, seed=seed)
    first = generate(model, [5, 6, 7], cfg(123), stop_ids=())
    assert first == generate(model, [5, 6, 7], cfg(123), stop_ids=())
    assert first != generate(model, [5, 6, 7], cfg(124), stop_ids=())


class ScriptedModel(nn.Module):
    """Predicts script[n] as the token at position n (n = sequence length so far), per row."""

    def __init__(self, script: dict[int, int], context: int = 64):
        super().__init__()
        self.config = ModelConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                                  intermediate_size=8, max_position_embeddings=context)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.script = script

    def forward(self, input_ids, attention_mask=None, kv_cache=None, cache_rows=None, last_only=False):
        B, T = input_ids.shape
        rows = list(range(B)) if cache_rows is None else list(cache_rows)
        new = [T] * B if attention_mask is None else attention_mask.sum(-1).tolist()
        logits = torch.zeros(B, T, 16)
        for b in range(B):
            start = int(kv_cache.lengths[rows[b]]) if kv_cache is not None else 0
            logits[b, new[b] - 1, self.script.get(start + new[b], 9)] = 10.0
            if kv_cache is not None:
                kv_cache.lengths[rows[b]] += new[b]
        return logits[torch.arange(B), torch.tensor(new) - 1] if last_only else logits


def test_generation_stops_at_im_end_and_endoftext_without_yielding_them():
    stats = {}
    model = ScriptedModel({3: 5, 4: 6, 5: IM_END_ID, 6: 7})
    assert generate(model, [10, 11, 12], GREEDY, stats=stats) == [5, 6]
    assert stats["stop"] == "stop_id" and stats["new_tokens"] == 2 and stats["prompt_tokens"] == 3
    assert generate(ScriptedModel({3: 5, 4: EOT_ID}), [10, 11, 12], GREEDY) == [5]
    no_stops = generate(ScriptedModel({3: 5, 4: EOT_ID}), [10, 11, 12], GREEDY, stop_ids=())
    assert no_stops == [5, EOT_ID] + [9] * 28


def test_generation_stops_at_max_new_tokens_and_at_the_context_end():
    cfg = GenerationConfig(do_sample=False, max_new_tokens=4)
    stats = {}
    assert generate(ScriptedModel({}), [10], cfg, stats=stats) == [9] * 4 and stats["stop"] == "max_new_tokens"
    assert generate(ScriptedModel({}, context=8), [10] * 5, GREEDY, stats=stats) == [9] * 3
    assert stats["stop"] == "context"
    with pytest.raises(ValueError, match="context"):
        generate(ScriptedModel({}, context=8), [10] * 8, GREEDY)


def test_fit_to_context_cuts_from_the_left_leaving_room_to_answer():
    assert fit_to_context(list(range(10)), 64, 16) == (list(range(10)), 0)
    ids, cut = fit_to_context(list(range(100)), 64, 512)  # room: min(512, 64 // 4) = 16
    assert cut == 52 and ids == list(range(52, 100))
    ids, cut = fit_to_context(list(range(100)), 64, 4)
    assert cut == 40 and ids == list(range(40, 100))


# ---- streaming text ----

CORPUS = ("Bees make honey in the hive and fly from flower to flower. " * 4 +
          "蜜蜂在蜂巢里酿蜜，从一朵花飞到另一朵花。\n") * 3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    return Tokenizer(train_tokenizer([CORPUS], 400, path))


def test_streamer_never_emits_half_a_character(tokenizer):
    text = "Bees 蜂蜜 and 鸟🐝 fly 好"  # 鸟, 🐝, 好 never occur in training: byte-fallback tokens
    ids = tokenizer.encode(text)
    byte_ids = [i for i in ids if tokenizer.sp.is_byte(i)]
    assert len(byte_ids) >= 3 + 4 + 3  # multi-byte characters really are split across tokens
    streamer = TextStreamer(tokenizer)
    pieces = [streamer.put(i) for i in ids]
    assert "".join(pieces) + streamer.flush() == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert pieces.count("") >= 2 + 3 + 2  # held back while a character's bytes were incomplete
    for piece in pieces:
        piece.encode("utf-8")  # whole characters only (a lone surrogate would fail)
    assert "".join(stream_text(tokenizer, ids)) == text


def test_streamer_flushes_an_incomplete_sequence_as_replacement(tokenizer):
    first_byte = tokenizer.sp.piece_to_id("<0xE5>")
    streamer = TextStreamer(tokenizer)
    assert streamer.put(first_byte) == ""
    assert streamer.flush() == "\ufffd"
    # an invalid byte followed by text does not block the text
    assert "".join(stream_text(tokenizer, [first_byte] + tokenizer.encode("hive"))) == "\ufffdhive"


def test_streamed_text_of_a_generation_equals_decoding_it_whole(tokenizer):
    model = tiny_model(torch.float32, vocab_size=tokenizer.vocab_size)
    ids = list(generate_stream(model, tokenizer.encode("Bees"), GenerationConfig(seed=0, max_new_tokens=40,
                                                                                  temperature=1.0)))
    assert "".join(stream_text(tokenizer, ids)) == tokenizer.decode(ids)
