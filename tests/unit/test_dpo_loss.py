import math

import pytest
import references
import torch
from references import mean_logits_reference, token_logps_reference

from nanobumble.model.dpo import batch_logps, dpo_batch_metrics, preference_loss, sequence_logps, sft_nll
from nanobumble.model.transformer import ModelConfig, Transformer

LN2 = math.log(2.0)


def random_logps(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 40 + 1) for _ in range(4)]


def log_sigmoid64(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def expected_loss(loss_type: str, pc: float, pr: float, rc: float, rr: float, beta: float, eps: float,
                  len_c: int = 1, len_r: int = 1) -> float:
    """The loss of one pair written out in Python floats (float64). len_c, len_r: the
    answers' response token counts, over which IPO averages the log-ratios (TRL's IPO)."""
    h = (pc - rc) - (pr - rr)
    d = beta * h
    if loss_type == "sigmoid":
        return -log_sigmoid64(d) * (1 - eps) - log_sigmoid64(-d) * eps
    if loss_type == "ipo":
        return ((pc - rc) / len_c - (pr - rr) / len_r - 1 / (2 * beta)) ** 2
    return max(0.0, 1 - d)


VARIANTS = [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)]


# --- preference_loss -------------------------------------------------------------------------------

def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    pi_c, pi_r, _, _ = random_logps(6)
    for beta in (0.1, 0.5):
        losses, rc, rr = preference_loss(pi_c.float(), pi_r.float(), pi_c.float(), pi_r.float(), beta)
        torch.testing.assert_close(losses, torch.full((6,), LN2), rtol=0, atol=1e-7)
        assert torch.equal(rc, torch.zeros(6)) and torch.equal(rr, torch.zeros(6))


@pytest.mark.parametrize("loss_type,eps", VARIANTS)
def test_loss_variants_match_float64_hand_computation(loss_type, eps):
    beta = 0.2
    pc, pr, rc, rr = random_logps(16, seed=1)
    len_c, len_r = torch.randint(1, 40, (2, 16), generator=torch.Generator().manual_seed(2))
    losses, chosen_rewards, rejected_rewards = preference_loss(pc, pr, rc, rr, beta, loss_type, eps, len_c, len_r)
    want = [expected_loss(loss_type, *map(float, row), beta, eps, int(lc), int(lr))
            for *row, lc, lr in zip(pc, pr, rc, rr, len_c, len_r)]
    torch.testing.assert_close(losses, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, torch.tensor([beta * (float(a) - float(b)) for a, b in zip(pc, rc)],
                                                            dtype=torch.float64))
    torch.testing.assert_close(rejected_rewards, torch.tensor([beta * (float(a) - float(b)) for a, b in zip(pr, rr)],
                                                              dtype=torch.float64))
    # the float32 path agrees with the float64 one
    losses32, _, _ = preference_loss(pc.float(), pr.float(), rc.float(), rr.float(), beta, loss_type, eps,
                                     len_c, len_r)
    torch.testing.assert_close(losses32.double(), losses, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("loss_type,eps", VARIANTS)
def test_gradient_raises_chosen_and_lowers_rejected(loss_type, eps):
    beta = 0.1
    ref_c, ref_r = torch.tensor([-20.0, -35.0, -8.0]), torch.tensor([-22.0, -30.0, -9.0])
    # policy near the reference: |h| < 2, so the hinge (d < 1) and IPO (h < 1/(2 beta) = 5) are active
    pi_c = (ref_c + torch.tensor([0.5, -1.0, 0.0])).requires_grad_()
    pi_r = (ref_r + torch.tensor([-0.5, 0.7, 0.0])).requires_grad_()
    losses, chosen_rewards, rejected_rewards = preference_loss(pi_c, pi_r, ref_c, ref_r, beta, loss_type, eps,
                                                               torch.tensor([12, 20, 5]), torch.tensor([14, 17, 6]))
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward()
    assert (pi_c.grad < 0).all(), pi_c.grad
    assert (pi_r.grad > 0).all(), pi_r.grad


def test_hinge_is_zero_past_the_margin():
    losses, _, _ = preference_loss(torch.tensor([0.0]), torch.tensor([-20.0]), torch.tensor([0.0]),
                                   torch.tensor([0.0]), beta=0.1, loss_type="hinge")  # d = 2
    assert losses.item() == 0.0


# A 4-pair toy batch with the answer lengths of issue 12's: 5/2/8/4 (chosen) and 3/7/8/1
# (rejected) tokens. The issue does not list its log-probs; these are made up.
TOY_LENGTHS = torch.tensor([5, 2, 8, 4]), torch.tensor([3, 7, 8, 1])
TOY_LOGPS = (torch.tensor([-7.2, -2.9, -11.5, -5.1], dtype=torch.float64),   # policy, chosen
             torch.tensor([-5.6, -10.2, -12.4, -2.3], dtype=torch.float64),  # policy, rejected
             torch.tensor([-7.9, -3.1, -11.0, -6.0], dtype=torch.float64),   # reference, chosen
             torch.tensor([-5.0, -10.9, -12.0, -1.7], dtype=torch.float64))  # reference, rejected


def test_ipo_averages_the_log_ratios_per_token():
    """IPO's 1/(2 beta) target applies to per-token log-ratios: the same pair with every
    answer k times longer (k times the summed log-ratio) has the same loss."""
    pc, pr, rc, rr = TOY_LOGPS
    len_c, len_r = TOY_LENGTHS
    losses, _, _ = preference_loss(pc, pr, rc, rr, 0.1, "ipo", chosen_lengths=len_c, rejected_lengths=len_r)
    longer, _, _ = preference_loss(5 * pc, 5 * pr, 5 * rc, 5 * rr, 0.1, "ipo",
                                   chosen_lengths=5 * len_c, rejected_lengths=5 * len_r)
    torch.testing.assert_close(longer, losses, rtol=1e-12, atol=1e-12)
    # an answer cut to no tokens (log-ratio 0) counts as 0, not 0/0
    empty, _, _ = preference_loss(pc[:1], pr[:1], pc[:1], rr[:1], 0.1, "ipo", chosen_lengths=torch.tensor([0]),
                                  rejected_lengths=len_r[:1])
    assert empty.item() == pytest.approx((0 - (pr[0] - rr[0]).item() / 3 - 5) ** 2, rel=1e-12)
    with pytest.raises(ValueError, match="ipo.*chosen_lengths and rejected_lengths"):
        preference_loss(pc, pr, rc, rr, 0.1, "ipo")


def trl_dpo_loss(trl, loss_type: str, beta: float, pc, pr, rc, rr, len_c, len_r) -> torch.Tensor:
    """The loss TRL's DPOTrainer._compute_loss computes (mean over pairs) from the same
    sequence log-probs. A bare DPOTrainer with only the attributes that method reads;
    the "model" returns per-token log-probs that sum to the given sequence log-probs
    over each answer's completion_mask, and the reference log-probs are passed as
    precomputed ones."""
    from collections import defaultdict
    from types import SimpleNamespace

    n, lengths = len(pc), torch.cat([len_c, len_r])
    T = int(lengths.max()) + 2
    completion_mask = torch.zeros(2 * n, T, dtype=torch.long)
    for row, k in enumerate(lengths.tolist()):
        completion_mask[row, 1:1 + k] = 1  # one prompt token, then the answer
    sequence = torch.cat([pc, pr])
    per_token = torch.where(completion_mask[:, 1:].bool(), (sequence / lengths)[:, None], 0.0)

    class Policy(torch.nn.Module):
        def forward(self, input_ids, attention_mask, labels, use_cache, fused_lm_head):
            zeros = torch.zeros_like(per_token)
            return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    trainer = trl.DPOTrainer.__new__(trl.DPOTrainer)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    vars(trainer).update(
        model=Policy(), accelerator=accelerator, beta=beta, loss_types=[loss_type], loss_weights=[1.0],
        label_smoothing=0.0, f_divergence_type="reverse_kl", ld_alpha=None, precompute_ref_logps=True,
        use_weighting=False, aux_loss_enabled=False, _tp_size=1, _total_train_tokens=0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    inputs = {"input_ids": torch.zeros(2 * n, T, dtype=torch.long), "attention_mask": torch.ones(2 * n, T),
              "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    return trainer._compute_loss(trainer.model, inputs, return_outputs=False)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid", "hinge"])
def test_losses_match_trl_on_the_toy_batch(loss_type):
    trl = pytest.importorskip("trl")
    len_c, len_r = TOY_LENGTHS
    for beta in (0.1, 0.5):
        ours, _, _ = preference_loss(*TOY_LOGPS, beta, loss_type, chosen_lengths=len_c, rejected_lengths=len_r)
        theirs = trl_dpo_loss(trl, loss_type, beta, *TOY_LOGPS, len_c, len_r)
        torch.testing.assert_close(ours.mean(), theirs, rtol=1e-12, atol=1e-12)


def test_ipo_on_the_toy_batch_by_hand():
    """The same numbers without TRL: float64 formula, and what summed log-ratios gave before."""
    pc, pr, rc, rr = (t.tolist() for t in TOY_LOGPS)
    len_c, len_r = (t.tolist() for t in TOY_LENGTHS)
    per_token = [((a - b) / m - (c - d) / k - 5.0) ** 2 for a, c, b, d, m, k in zip(pc, pr, rc, rr, len_c, len_r)]
    summed = [((a - b) - (c - d) - 5.0) ** 2 for a, c, b, d in zip(pc, pr, rc, rr)]
    ours, _, _ = preference_loss(*TOY_LOGPS, 0.1, "ipo", chosen_lengths=TOY_LENGTHS[0],
                                 rejected_lengths=TOY_LENGTHS[1])
    assert ours.mean().item() == pytest.approx(sum(per_token) / 4, rel=1e-12)
    assert sum(per_token) / 4 == pytest.approx(22.318, abs=1e-3)
    assert sum(summed) / 4 == pytest.approx(20.550, abs=1e-3)  # the summed form: not TRL's


def test_label_smoothing_is_refused_where_it_would_be_ignored():
    from nanobumble.base.errors import ConfigError
    from nanobumble.run.config import DPOConfig, parse_config

    for loss_type in ("ipo", "hinge"):
        with pytest.raises(ConfigError, match="label_smoothing.*pref_loss.*" + loss_type):
            parse_config(["--pref_loss", loss_type, "--label_smoothing", "0.1"], DPOConfig)
        parse_config(["--pref_loss", loss_type, "--label_smoothing", "0"], DPOConfig)  # 0 is fine
        x = torch.zeros(2)
        with pytest.raises(ValueError, match="label_smoothing.*sigmoid"):
            preference_loss(x, x, x, x, 0.1, loss_type, 0.1, torch.ones(2), torch.ones(2))
    assert parse_config(["--label_smoothing", "0.1"], DPOConfig).label_smoothing == 0.1  # sigmoid: cDPO


def test_unknown_loss_type_lists_the_valid_ones():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge.*'dpo'"):
        preference_loss(x, x, x, x, 0.1, loss_type="dpo")


# --- token_logps_reference -----------------------------------------------------------------------------------

def reference_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    safe = labels.clamp(min=0)
    return torch.where(labels != -100, logp.gather(-1, safe[..., None]).squeeze(-1), 0.0)


def random_batch(B: int, T: int, V: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 4
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    labels[0, :3] = -100
    return logits, labels


@pytest.mark.parametrize("chunk_elements", [1 << 24, 50])  # one chunk per row; several chunks per row
def test_token_logps_matches_float64_log_softmax(monkeypatch, chunk_elements):
    monkeypatch.setattr(references, "CHUNK_ELEMENTS", chunk_elements)
    logits, labels = random_batch(3, 9, 37)
    logits.requires_grad_()
    logps, mask = token_logps_reference(logits, labels)
    assert logps.dtype == torch.float32 and mask.dtype == torch.bool
    assert torch.equal(mask, labels != -100)
    assert (logps[~mask] == 0).all() and (logps[0, :3] == 0).all()
    want = reference_token_logps(logits.detach(), labels)
    torch.testing.assert_close(logps.double(), want, rtol=1e-5, atol=1e-5)

    # the hand-written backward against autograd through float64 log_softmax
    weights = torch.randn(3, 9)
    (logps * weights).sum().backward()
    x64 = logits.detach().double().requires_grad_()
    (reference_token_logps(x64, labels) * weights.double()).sum().backward()
    torch.testing.assert_close(logits.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    assert (logits.grad[0, :3] == 0).all()  # ignored positions get no gradient


def test_token_logps_bf16_and_noncontiguous_logits(monkeypatch):
    monkeypatch.setattr(references, "CHUNK_ELEMENTS", 64)
    logits, labels = random_batch(2, 8, 41, seed=3)
    logits = logits.bfloat16()[:, :-1]  # a slice as a trainer would take it: not contiguous
    labels = labels[:, 1:]
    assert not logits.is_contiguous()
    logits.requires_grad_()
    logps, mask = token_logps_reference(logits, labels)
    assert logps.dtype == torch.float32
    # computed in fp32 from the bf16 values, so it matches float64 on those exact values closely
    torch.testing.assert_close(logps.double(), reference_token_logps(logits.detach(), labels), rtol=1e-5, atol=1e-5)
    logps.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_token_logps_gradcheck_float64():
    logits, labels = random_batch(2, 4, 7, seed=5)
    logits = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: token_logps_reference(x, labels)[0], (logits,))


def test_token_logps_rejects_bad_labels():
    logits = torch.zeros(1, 3, 5)
    with pytest.raises(ValueError, match="label 5 at row 0, position 2"):
        token_logps_reference(logits, torch.tensor([[0, -100, 5]]))
    with pytest.raises(ValueError, match="does not match"):
        token_logps_reference(logits, torch.zeros(1, 4, dtype=torch.long))


# --- sequence_logps (LD-DPO) -----------------------------------------------------------------------

def test_sequence_logps_with_ld_alpha_by_hand():
    F_, T_ = False, True
    # two pairs: rows c0, c1, r0, r1. Values at unmasked positions are junk that must not count.
    logps = torch.tensor([
        [-9.0, -1.0, -2.0, -3.0, -9.0, -9.0],   # c0: 3 response tokens
        [-1.0, -1.0, -1.0, -1.0, -9.0, -9.0],   # c1: 4 response tokens
        [-9.0, -0.5, -1.0, -1.5, -2.0, -4.0],   # r0: 5 response tokens
        [-9.0, -2.0, -9.0, -3.0, -9.0, -9.0],   # r1: 2 response tokens, not adjacent
    ])
    mask = torch.tensor([
        [F_, T_, T_, T_, F_, F_],
        [T_, T_, T_, T_, F_, F_],
        [F_, T_, T_, T_, T_, T_],
        [F_, T_, F_, T_, F_, F_],
    ])
    plain = torch.tensor([-6.0, -4.0, -9.0, -5.0])
    assert torch.equal(sequence_logps(logps, mask), plain)
    assert torch.equal(sequence_logps(logps, mask, ld_alpha=None), plain)
    assert torch.equal(sequence_logps(logps, mask, ld_alpha=1.0), plain)
    # pair 0 shares 3 tokens: r0 = -0.5 - 1 - 1.5 + 0.5 * (-2 - 4) = -6
    # pair 1 shares 2 tokens: c1 = -1 - 1 + 0.5 * (-1 - 1) = -3
    assert torch.equal(sequence_logps(logps, mask, ld_alpha=0.5), torch.tensor([-6.0, -3.0, -6.0, -5.0]))
    # ld_alpha = 0: only the shared length counts
    assert torch.equal(sequence_logps(logps, mask, ld_alpha=0.0), torch.tensor([-6.0, -2.0, -3.0, -5.0]))
    with pytest.raises(ValueError, match="odd"):
        sequence_logps(logps[:3], mask[:3], ld_alpha=0.5)


# --- metrics and the SFT term ----------------------------------------------------------------------

def test_metrics_by_hand():
    chosen = torch.tensor([1.0, -1.0, 0.5])
    rejected = torch.tensor([0.0, 2.0, 0.5])  # right, wrong, a tie (not counted as right)
    losses = torch.tensor([0.25, 1.5, 0.75])
    policy = torch.tensor([-10.0, -20.0, -30.0, -11.0, -21.0, -31.0])
    row_logits = torch.tensor([0.5, 1.0, 1.5, -1.0, -2.0, 0.0])
    m = dpo_batch_metrics(losses, chosen, rejected, policy, row_logits)
    want = {"preference_loss": 2.5, "rewards/chosen": 0.5, "rewards/rejected": 2.5, "rewards/accuracies": 1.0,
            "rewards/margins": -2.0, "logps/chosen": -60.0, "logps/rejected": -63.0, "logits/chosen": 3.0,
            "logits/rejected": -3.0}
    assert set(m) == set(want)
    for key, value in want.items():
        assert m[key].dtype == torch.float32 and m[key].item() == value, key


def test_mean_logits_by_hand(monkeypatch):
    monkeypatch.setattr(references, "CHUNK_ELEMENTS", 2)  # one position per chunk
    logits = torch.tensor([[[1.0, 3.0], [5.0, 7.0], [100.0, 100.0]],
                           [[0.0, 2.0], [-4.0, -6.0], [8.0, 8.0]]]).bfloat16()
    mask = torch.tensor([[True, True, False], [False, True, False]])
    got = mean_logits_reference(logits, mask)
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.tensor([4.0, -5.0]))  # (1+3+5+7)/4 and (-4-6)/2
    assert torch.equal(mean_logits_reference(logits, torch.zeros(2, 3, dtype=torch.bool)), torch.zeros(2))


def test_sft_nll_by_hand():
    logps = torch.tensor([[-1.0, -2.0, -7.0], [-3.0, -9.0, -9.0], [-50.0, -50.0, -50.0], [-50.0, -50.0, -50.0]])
    mask = torch.tensor([[True, True, False], [True, False, False], [True] * 3, [True] * 3])
    assert sft_nll(logps, mask, n=2).item() == 2.0  # (1 + 2 + 3) / 3 chosen response tokens


# --- through a tiny Transformer --------------------------------------------------------------------

def test_tiny_transformer_as_its_own_reference_gives_ln2():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=64, max_position_embeddings=32))
    n, T = 3, 12
    input_ids = torch.randint(0, 61, (2 * n, T))
    labels = torch.full((2 * n, T), -100)
    labels[:, :-1] = input_ids[:, 1:]
    labels[:, :4] = -100  # the prompt
    labels[1, 9:] = -100  # responses of different lengths
    labels[n + 2, 6:] = -100

    pi, logps, mask, row_logits = batch_logps(model, input_ids, labels, ld_alpha=0.7)
    with torch.no_grad():
        ref, _, _, _ = batch_logps(model, input_ids, labels, ld_alpha=0.7)
    losses, chosen_rewards, rejected_rewards = preference_loss(pi[:n], pi[n:], ref[:n], ref[n:], beta=0.1)
    torch.testing.assert_close(losses, torch.full((n,), LN2), rtol=0, atol=1e-7)
    assert (chosen_rewards == 0).all() and (rejected_rewards == 0).all()

    # the plain sums agree with the model's own cross-entropy, row by row
    plain = sequence_logps(logps, mask)
    with torch.no_grad():
        want = torch.stack([-model(input_ids[i:i + 1], labels[i:i + 1], reduction="sum") for i in range(2 * n)])
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-4)

    # the loss reaches the parameters, and the metrics come out finite
    (losses.mean() + 0.5 * sft_nll(logps, mask, n)).backward()
    assert model.embed_tokens.weight.grad is not None and model.embed_tokens.weight.grad.abs().sum() > 0
    metrics = dpo_batch_metrics(losses, chosen_rewards, rejected_rewards, pi, row_logits)
    torch.testing.assert_close(metrics["preference_loss"], torch.tensor(n * LN2), rtol=0, atol=1e-6)
    assert metrics["rewards/accuracies"].item() == 0.0
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_batch_logps_equals_the_logits_path_values_and_gradients(kernels):
    """batch_logps never builds the [2n, T, V] logits; it must give what token_logps_reference
    on the materialised logits gives (the way it was computed before), gradients included."""
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_position_embeddings=32)
    n, T = 2, 10
    input_ids = torch.randint(0, 61, (2 * n, T))
    labels = torch.full((2 * n, T), -100)
    labels[:, :-1] = input_ids[:, 1:]
    labels[:, :3] = -100
    labels[0, 7:] = -100
    weights = torch.randn(2 * n)  # any use of the sequence log-probs downstream

    results = []
    for path in ("chunked", "logits"):
        model = Transformer(cfg)
        model.kernels = kernels
        for param in model.parameters():
            param.data.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(2)))
        if path == "chunked":
            seq, logps, mask, row_logits = batch_logps(model, input_ids, labels, ld_alpha=0.6)
        else:
            logits = model(input_ids)
            logps, mask = token_logps_reference(logits, labels)
            seq, row_logits = sequence_logps(logps, mask, 0.6), mean_logits_reference(logits, mask)
        (seq * weights).sum().backward()
        results.append((seq.detach(), logps.detach(), mask, row_logits,
                        {name: p.grad for name, p in model.named_parameters()}))
    (seq_a, logps_a, mask_a, logits_a, grads_a), (seq_b, logps_b, mask_b, logits_b, grads_b) = results
    assert torch.equal(mask_a, mask_b)
    torch.testing.assert_close(logps_a, logps_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seq_a, seq_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-5, atol=1e-6)
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)
