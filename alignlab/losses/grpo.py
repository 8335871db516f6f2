"""Critic-free RL on groups of sampled responses: group-relative advantages (GRPO, Dr. GRPO, RLOO), the clipped
policy-gradient loss with separate low / high clip ranges (DAPO's clip-higher), an optional k3 KL term to the
reference, and the three ways of reducing per-token losses to one number.

Sources (formulas: docs/algorithms.md, "GRPO, Dr. GRPO, RLOO, DAPO"):
- GRPO, Shao et al. 2024 (DeepSeekMath, arXiv 2402.03300, eq. 3): A_i = (r_i - mean(r)) / std(r), the same for
  every token of response i; per-token clipped surrogate, averaged per response, then over responses; beta * k3.
- Dr. GRPO, Liu et al. 2025 (arXiv 2503.20783, sec. 3.1): A_i = r_i - mean(r) (no std division), token sums
  divided by a constant (the maximum response length), not by each response's own length.
- RLOO, Ahmadian et al. 2024 (arXiv 2402.14740, eq. 6): A_i = r_i - (sum_j r_j - r_i) / (G - 1), which equals
  G / (G - 1) (r_i - mean(r)): Dr. GRPO's advantage scaled by G / (G - 1).
- DAPO, Yu et al. 2025 (arXiv 2503.14476): token-level mean over every token of the batch (eq. 12); clip-higher
  (eps_high > eps_low, eq. 10); dynamic sampling drops groups whose rewards are all equal (`zero_std_groups`).
- Token-level unlikelihood, Welleck et al. 2019 (arXiv 1908.04319, eq. 4), on the sampled responses (optional,
  `ul_alpha`): -sum_{c in C_t} log(1 - pi(c | x_<t)) per token, C_t the tokens the response already wrote
  (alignlab.losses.sft.token_unlikelihood); against the greedy loops a sharpened policy can fall into.

Shapes: N groups of G responses each; B = N x G responses laid out group by group (rows g*G ... g*G + G - 1 are
group g); T response tokens. Per-token tensors are [B, T] with ``mask`` [B, T] 1 on real response tokens;
per-response tensors are [B]; rewards and advantages by group are [N, G]. Scalars are 0-dim tensors.
"""

from __future__ import annotations

from typing import Literal

import torch

from alignlab.losses.ppo import kl_estimate

Tensor = torch.Tensor
Advantage = Literal["grpo", "dr_grpo", "rloo"]
LossAgg = Literal["sequence_mean", "token_mean", "constant"]
ADVANTAGES: tuple[str, ...] = ("grpo", "dr_grpo", "rloo")
LOSS_AGGREGATIONS: tuple[str, ...] = ("sequence_mean", "token_mean", "constant")

# Added to GRPO's std: a group whose rewards are all equal has std 0 and advantages 0 / eps = 0 (not nan). 1e-4 as
# in TRL 1.16's GRPOTrainer; the DeepSeekMath paper leaves it unspecified.
GRPO_STD_EPS = 1e-4
_TINY = 1e-8  # guards divisions by counts that can be 0 (every group dropped): the result is 0, not nan


def group_advantages(rewards: Tensor, kind: str, eps: float = GRPO_STD_EPS) -> Tensor:
    """Advantages [N, G] of rewards [N, G] (row = one prompt's G responses), relative to their own group:

        grpo:    A_i = (r_i - mean(r)) / (std(r) + eps)   std with Bessel's correction (divide by G - 1), as TRL
        dr_grpo: A_i = r_i - mean(r)
        rloo:    A_i = r_i - (sum_j r_j - r_i) / (G - 1)  (leave-one-out mean of the OTHER responses)

    A group of equal rewards gets advantages 0 under every variant. Needs G >= 2 (a group of one has no baseline).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, group size], got shape {tuple(rewards.shape)}")
    size = rewards.shape[1]
    if size < 2:
        raise ValueError(f"a group needs at least 2 responses to have a baseline, got {size}")
    mean = rewards.mean(dim=1, keepdim=True)
    if kind == "grpo":
        return (rewards - mean) / (rewards.std(dim=1, keepdim=True) + eps)
    if kind == "dr_grpo":
        return rewards - mean
    if kind == "rloo":
        return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (size - 1)
    raise ValueError(f"unknown advantage {kind!r}; known: {', '.join(ADVANTAGES)}")


def zero_std_groups(rewards: Tensor) -> Tensor:
    """[N] bool: the groups of rewards [N, G] whose rewards are all exactly equal. Their advantages are 0 under every
    variant, so they add no policy gradient, only weight in the loss's denominator (and KL terms): DAPO's dynamic
    sampling drops them."""
    return rewards.amax(dim=1) == rewards.amin(dim=1)


def aggregation_count(mask: Tensor, how: str, weights: Tensor | None = None) -> Tensor:
    """What `aggregate` divides by (before the constant max_length), 0-dim: the number of (weighted) responses for
    sequence_mean and constant, of (weighted) real tokens for token_mean. Summed over processes it gives the
    global denominator (a trainer scales each process's loss by its share of it)."""
    weights = torch.ones(mask.shape[0], dtype=mask.dtype, device=mask.device) if weights is None else weights
    if how in ("sequence_mean", "constant"):
        return weights.to(mask.dtype).sum()
    if how == "token_mean":
        return (mask.sum(dim=1) * weights.to(mask.dtype)).sum()
    raise ValueError(f"unknown loss aggregation {how!r}; known: {', '.join(LOSS_AGGREGATIONS)}")


def aggregate(per_token: Tensor, mask: Tensor, how: str, max_length: int, weights: Tensor | None = None) -> Tensor:
    """Reduce per-token losses [B, T] to a scalar. With n_i the real tokens of response i and w_i its weight
    (1, or 0 for a dropped response; default all 1):

        sequence_mean: sum_i w_i (sum_t l_it / n_i) / sum_i w_i           GRPO: mean per response, then over responses
        token_mean:    sum_i w_i sum_t l_it / sum_i w_i n_i               DAPO: every token of the batch weighs the same
        constant:      sum_i w_i sum_t l_it / (sum_i w_i * max_length)    Dr. GRPO: no per-response length division

    sequence_mean gives each token of a short response more weight than one of a long response (for a wrong answer,
    a lighter push down per token when it is long: the length bias Dr. GRPO points out); token_mean and constant do
    not. All weights 0 gives 0.
    """
    mask = mask.to(per_token.dtype)
    w = torch.ones(mask.shape[0], dtype=per_token.dtype, device=mask.device) if weights is None else weights
    w = w.to(per_token.dtype)
    sums = (per_token * mask).sum(dim=1)  # [B]
    count = aggregation_count(mask, how, w).clamp_min(_TINY)
    if how == "sequence_mean":
        return (w * sums / mask.sum(dim=1).clamp_min(1.0)).sum() / count
    if how == "token_mean":
        return (w * sums).sum() / count
    if how == "constant":
        return (w * sums).sum() / (count * max_length)
    raise ValueError(f"unknown loss aggregation {how!r}; known: {', '.join(LOSS_AGGREGATIONS)}")


def clipped_surrogate(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token clipped surrogate loss [B, T] (PPO eq. 7 with DAPO's asymmetric range, eq. 10):

        rho = exp(logprobs - old_logprobs)
        l   = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)        A = advantages[i] on every token of i

    Returns (l, clipped_low, clipped_high): the two [B, T] bool masks of tokens where clipping is active (the clipped
    term is the minimum, so the token gives no gradient): rho < 1 - clip_low with A < 0, rho > 1 + clip_high with
    A > 0. advantages: [B].
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None].to(ratio.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    active = clipped < unclipped
    return loss, active & (adv < 0), active & (adv > 0)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    loss_agg: str,
    max_length: int,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    weights: Tensor | None = None,
    unlikelihood: Tensor | None = None,
    ul_alpha: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO-family loss to minimise: per token the clipped surrogate (`clipped_surrogate`) plus, when beta > 0,
    beta * k3(pi, ref), with k3 = exp(ref - logp) - (ref - logp) - 1 >= 0 (differentiable through logp: a LOSS term,
    where k3's gradient is right; as a detached reward it would not pull pi toward ref, see losses.ppo.kl_estimate),
    plus, when ul_alpha > 0, ul_alpha * unlikelihood (per token [B, T], with grad: losses.sft.token_unlikelihood on
    the sampled responses, Welleck et al. 2019), then reduced by `aggregate(loss_agg)`.

    logprobs (with grad), old_logprobs (the sampling policy's), ref_logprobs, mask: [B, T]; advantages, weights:
    [B]. Metrics (0-dim, detached, token means over weighted real tokens): clip_low_frac, clip_high_frac,
    approx_kl (0.5 mean (logp - old)^2), ratio (mean rho), with ref_logprobs kl (mean k3 per token) and, with
    unlikelihood, its mean per token.
    """
    mask = mask.to(logprobs.dtype)
    per_token, low, high = clipped_surrogate(logprobs, old_logprobs, advantages, clip_low, clip_high)
    kl = None
    if ref_logprobs is not None:
        kl = kl_estimate(logprobs, ref_logprobs, "k3")  # [B, T]
        if beta > 0:
            per_token = per_token + beta * kl
    elif beta > 0:
        raise ValueError("beta > 0 needs ref_logprobs (the KL term is to the reference)")
    if ul_alpha > 0:
        if unlikelihood is None:
            raise ValueError("ul_alpha > 0 needs the per-token unlikelihood term")
        per_token = per_token + ul_alpha * unlikelihood
    loss = aggregate(per_token, mask, loss_agg, max_length, weights)

    w = torch.ones(mask.shape[0], dtype=mask.dtype, device=mask.device) if weights is None else weights.to(mask.dtype)
    tokens = mask * w[:, None]
    n = tokens.sum().clamp_min(_TINY)
    with torch.no_grad():
        log_ratio = logprobs - old_logprobs
        metrics = {
            "clip_low_frac": (low.to(mask.dtype) * tokens).sum() / n,
            "clip_high_frac": (high.to(mask.dtype) * tokens).sum() / n,
            "approx_kl": (0.5 * log_ratio.pow(2) * tokens).sum() / n,
            "ratio": (torch.exp(log_ratio) * tokens).sum() / n,
        }
        if kl is not None:
            metrics["kl"] = (kl * tokens).sum() / n
        if unlikelihood is not None:
            metrics["unlikelihood"] = (unlikelihood * tokens).sum() / n
    return loss, {k: v.detach() for k, v in metrics.items()}
