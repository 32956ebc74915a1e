"""Sequence log-probabilities and the DPO loss family.

A DPO batch holds 2n rows: the n chosen responses first, then the n rejected
ones, row i and row n+i answering the same prompt. `labels` are next-token
targets (labels[b, t] is the token that logits[b, t] should predict), with -100
on every position that is not a response token.

    batch_logps: model -> per-token log-probs (minus the model's per-token loss,
                 never the full [2n, T, V] logits) -> sequence_logps (optionally
                 LD-DPO weighted)
    -> preference_loss(policy vs. reference) -> dpo_batch_metrics

With the log-ratios r_c = log pi(y_c) - log ref(y_c), r_r = log pi(y_r) - log ref(y_r)
(sums over the response tokens), h = r_c - r_r and d = beta * h:

    sigmoid  -logsigmoid(d) (1 - eps) - logsigmoid(-d) eps     (DPO; eps = label smoothing, cDPO)
    ipo      (r_c / |y_c| - r_r / |y_r| - 1 / (2 beta))^2      (IPO, per-token log-ratios)
    hinge    relu(1 - d)                                        (SLiC)

IPO's target 1/(2 beta) is met by log-ratios averaged over each answer's tokens
(|y| = its response token count), as TRL and LLaMA-Factory define it: on sums the
loss and its gradient would grow with the answer's length, and a beta from a
published IPO recipe would mean something else here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanobumble.model.layers import IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def sequence_logps(logps: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None = None) -> torch.Tensor:
    """[B] sum of each row's response-token log-probs.

    ld_alpha (LD-DPO): in each pair (i, n+i) the first min(len_chosen, len_rejected)
    response tokens of both rows count fully, and the tokens beyond that (only the
    longer response has any) are weighted by ld_alpha, so that a long answer is not
    preferred or punished merely for its length."""
    if ld_alpha is None or ld_alpha == 1.0:
        return (logps * mask).sum(-1)
    B = logps.shape[0]
    if B % 2:
        raise ValueError(f"ld_alpha needs chosen/rejected pairs, got an odd batch of {B} rows")
    n = B // 2
    lengths = mask.sum(-1)  # response tokens per row
    shared = torch.minimum(lengths[:n], lengths[n:]).repeat(2)  # [B]: the pair's common length
    rank = mask.cumsum(-1)  # 1, 2, ... over the response tokens of a row
    weight = torch.where(rank <= shared[:, None], 1.0, float(ld_alpha)).to(logps.dtype)
    return (logps * weight * mask).sum(-1)


def preference_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
                    rejected_lengths: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses [n], chosen_rewards [n], rejected_rewards [n]) from sequence log-probs of
    the policy and the reference model. Rewards are beta * (policy - reference), detached.

    chosen_lengths, rejected_lengths [n]: response tokens of each answer (mask.sum(-1)
    of the chosen and of the rejected rows). Only IPO uses them, and it requires them."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if label_smoothing and loss_type != "sigmoid":  # it would be silently ignored
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' only, got {loss_type!r}")
    chosen_ratio = pi_chosen - ref_chosen
    rejected_ratio = pi_rejected - ref_rejected
    d = beta * (chosen_ratio - rejected_ratio)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(d) * (1 - label_smoothing) - F.logsigmoid(-d) * label_smoothing
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type 'ipo' needs chosen_lengths and rejected_lengths (response tokens per answer)")
        # clamp: an answer cut to nothing has a log-ratio of 0, and 0 / 1 keeps it 0
        h = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - d)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


@torch.no_grad()
def dpo_batch_metrics(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                      policy_logps: torch.Tensor, row_mean_logits: torch.Tensor,
                      reference_logps: torch.Tensor | None = None, lengths: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:
    """Sums over this batch's n pairs, as fp32 scalars: all-reduce them across ranks and
    steps, then divide each by the global number of pairs to log means.
    "preference_loss" is the preference loss alone (a training step's "loss" adds the
    sft_weight term, logged as "nll_loss": sft_nll, TRL's name).

    policy_logps and row_mean_logits are [2n] (chosen rows, then rejected rows).
    Given the reference's log-probs and the answers' token counts (both [2n]),
    also drift/chosen and drift/rejected: how far the policy moved each answer's
    mean log-prob per token from the reference's (negative: less likely now)."""
    n = losses.shape[0]
    if policy_logps.shape[0] != 2 * n or row_mean_logits.shape[0] != 2 * n:
        raise ValueError(f"{n} pairs, but {policy_logps.shape[0]} policy log-probs and "
                         f"{row_mean_logits.shape[0]} mean logits (want {2 * n} each)")
    sums = {
        "preference_loss": losses,
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy_logps[:n],
        "logps/rejected": policy_logps[n:],
        "logits/chosen": row_mean_logits[:n],
        "logits/rejected": row_mean_logits[n:],
    }
    if reference_logps is not None and lengths is not None:
        drift = (policy_logps.detach().float() - reference_logps.float()) / lengths.clamp(min=1).float()
        sums["drift/chosen"], sums["drift/rejected"] = drift[:n], drift[n:]
    return {key: value.detach().float().sum() for key, value in sums.items()}


def displacement_warning(chosen_drift: float, cfg) -> str | None:
    """The likelihood-displacement warning, or None: DPO can raise the margin by
    pushing both answers down, the preferred one with them, which makes the model
    worse on new prompts while its reward accuracy looks fine. chosen_drift is the
    chosen answers' mean log-prob per token minus the reference's, in nats."""
    if cfg.max_chosen_logp_drop <= 0 or chosen_drift >= -cfg.max_chosen_logp_drop:
        return None
    return (f"warning: likelihood displacement: on the validation pairs the chosen answers' mean log-prob per "
            f"token is {-chosen_drift:.2f} nats below the reference's (max_chosen_logp_drop "
            f"{cfg.max_chosen_logp_drop}): the preferred answers are being pushed down along with the rejected "
            f"ones, which usually makes the model worse on new prompts however good the reward accuracy looks. "
            f"Usual remedies: a lower learning_rate (now {cfg.learning_rate:g}), a higher pref_beta (now "
            f"{cfg.pref_beta:g}), sft_weight > 0 (now {cfg.sft_weight:g}), fewer num_epochs (now {cfg.num_epochs:g})")


def sft_nll(logps: torch.Tensor, mask: torch.Tensor, n: int, num_tokens: float | None = None) -> torch.Tensor:
    """Negative log-likelihood of the n chosen rows' response tokens, divided by
    num_tokens: by default their count here, so a mean per token; in training the
    count over the whole global batch, so every chosen token weighs the same
    (the sft_weight term: loss = preference_loss + sft_weight * nll_loss, logged under
    TRL's names, nll_loss being this NLL before the weight, as TRL's CPO/ORPO log it)."""
    if num_tokens is None:
        num_tokens = mask[:n].sum().clamp(min=1)
    return -(logps[:n] * mask[:n]).sum() / num_tokens


def batch_logps(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                ld_alpha: float | None = None, position_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass over a DPO batch: (sequence logps [2n], token logps [2n, T],
    mask [2n, T], mean logits [2n]). The token log-probs are minus the model's
    per-token cross-entropy, computed a chunk of tokens at a time from the hidden
    states: the [2n x T x V] logits are never materialised, in the forward pass or
    in backward (tests/references.py has the same math on given logits)."""
    mask = labels != IGNORE_INDEX
    losses, position_mean_logits = model(input_ids, labels, position_ids=position_ids, reduction="none")
    logps = -losses  # log softmax(logits)[label]; 0 where the label is ignored
    row_mean_logits = (position_mean_logits * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return sequence_logps(logps, mask, ld_alpha), logps, mask, row_mean_logits.detach()
