"""PPO building blocks for RLHF: masked statistics, KL estimates, GAE, clipped policy and value losses,
entropy, and KL-coefficient controllers.

Sources: Schulman et al. 2017 (PPO, arXiv 1707.06347), Schulman et al. 2015 (GAE, arXiv 1506.02438),
Ziegler et al. 2019 (adaptive KL, arXiv 1909.08593), Huang et al. 2024 ("The N+ Implementation Details of RLHF
with PPO", arXiv 2403.17031).

Shapes: B = batch of responses, T = response tokens, V = vocabulary. Every per-token tensor is [B, T], and
``mask`` ([B, T], float or bool) is 1 on real response tokens and 0 on padding. Padding is on the right.
Scalar results are 0-dim tensors; metrics are 0-dim detached tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor
AllSum = Callable[[Tensor], Tensor]  # sums a tensor over processes (multi-process runs)

# Guards divisions by a count of real tokens that can be 0 (a batch of empty responses): the result is 0, not nan.
_TINY = 1e-8


def masked_mean(
    x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, all_sum: AllSum | None = None
) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (over all dims, or over ``dim``). x, mask: [B, T].

    An all-zero mask gives 0. ``all_sum`` (a function summing a tensor over processes, e.g.
    ``lambda t: accelerator.reduce(t, "sum")``) makes the mean one over every process's batch; not differentiable.
    """
    mask = mask.to(x.dtype)
    total = all_sum or (lambda t: t)
    if dim is None:
        return total((x * mask).sum()) / total(mask.sum()).clamp_min(_TINY)
    return total((x * mask).sum(dim)) / total(mask.sum(dim)).clamp_min(_TINY)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, all_sum: AllSum | None = None) -> Tensor:
    """Variance of ``x`` over the masked positions, 0-dim. x, mask: [B, T]. ``all_sum``: as for masked_mean.

    With ``unbiased`` the n/(n-1) Bessel correction is applied (n = number of real tokens) when n > 1.
    """
    mask = mask.to(x.dtype)
    centered = x - masked_mean(x, mask, all_sum=all_sum)
    var = masked_mean(centered.pow(2), mask, all_sum=all_sum)
    if unbiased:
        n = all_sum(mask.sum()) if all_sum is not None else mask.sum()
        # torch.where rather than `if n > 1` avoids a host-device sync.
        var = torch.where(n > 1, var * n / (n - 1).clamp_min(1.0), var)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, all_sum: AllSum | None = None) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) with masked mean / unbiased variance; [B, T] -> [B, T].

    ``shift_mean=False`` adds the mean back (scale only), as done for rewards. Padding positions are set to 0.
    ``all_sum``: as for masked_mean (statistics over every process's batch, so a batch split over processes is
    whitened as the whole batch would be in one).
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask, all_sum=all_sum)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask, all_sum=all_sum) + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's "Approximating KL divergence").

    With logr = ref_logprobs - logprobs ([B, T]):
      k1 = -logr                       unbiased, can be negative per token
      k3 = (exp(logr) - 1) - logr      unbiased, always >= 0 (computed with expm1)
    Returns [B, T]; mask it yourself.

    Both estimate the VALUE of KL(pi || ref) without bias (k3 with less variance: log it). Only k1 works as a
    per-token penalty in the reward (detached, optimised by the policy gradient): the expected policy gradient
    of E_pi[-k] is -grad KL(pi||ref) for k1, but -(grad KL(pi||ref) - grad KL(ref||pi)) for k3, which vanishes to
    first order near pi = ref (Tang & Munos 2025, arXiv 2506.09477): a k3 reward does not hold the policy near
    the reference. k3 belongs in a differentiable loss term (GRPO), not in the reward. alignlab's PPO therefore
    always puts k1 in the reward; its `ppo.kl_estimator` only chooses the estimate logged as `kl`.
    """
    logr = ref_logprobs - logprobs
    if kind == "k1":
        return -logr
    if kind == "k3":
        return torch.expm1(logr) - logr
    raise ValueError(f"unknown KL estimator {kind!r}; known: k1, k3")


def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv 1506.02438, eq. 16), reverse recursion:

        delta_t = r_t + gamma V_{t+1} - V_t
        A_t     = delta_t + gamma lam A_{t+1}

    rewards, values, mask: [B, T], right-padded. V and A past the last real token are 0 (the value of a
    masked successor is never bootstrapped), and padded positions contribute nothing. Call under
    ``torch.no_grad()`` (or pass detached tensors): the outputs are targets.

    Returns ``(advantages, returns)``, both [B, T] and 0 where mask == 0: advantages are NOT whitened, and
    returns = advantages + values (taken before any whitening of the advantages).
    """
    mask = mask.to(values.dtype)
    rewards = rewards * mask
    values = values * mask  # V = 0 on padding, so V_{t+1} = 0 after the last real token
    seq_len = rewards.shape[-1]
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advs_reversed = []
    for t in reversed(range(seq_len)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Multiplying by mask[:, t] makes A = 0 on padding, so it is never carried back into a real token.
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t]
        advs_reversed.append(next_adv)
    advantages = torch.stack(advs_reversed[::-1], dim=1)  # [B, T]
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, eq. 7), as a loss to minimise:

        ratio = exp(logprobs - old_logprobs)
        pg    = masked_mean( max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) )

    All inputs [B, T]. Returns ``(pg, metrics)`` with "clipfrac" (fraction of real tokens where the clipped term
    is the larger one, i.e. clipping is active) and "approx_kl" (0.5 masked_mean((logprobs - old_logprobs)^2)).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask).detach(),
        "approx_kl": (0.5 * masked_mean(log_ratio.pow(2), mask)).detach(),
    }
    return loss, metrics


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (Huang et al. 2024, arXiv 2403.17031):

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        vf     = 0.5 masked_mean( max((V - R)^2, (V_clip - R)^2) )

    All inputs [B, T]. Returns ``(vf, metrics)`` with "clipfrac" (fraction of real tokens where the clipped
    error is the larger one).
    """
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err_unclipped = (values - returns).pow(2)
    err_clipped = (values_clipped - returns).pow(2)
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), mask)
    metrics = {"clipfrac": masked_mean((err_clipped > err_unclipped).to(values.dtype), mask).detach()}
    return loss, metrics


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: [B, T, V] -> [B, T].

    H = logsumexp(z) - sum_v softmax(z)_v z_v, which never takes the log of a probability.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, arXiv 1909.08593):

    e    = clip(KL / target - 1, -0.2, 0.2)
    coef = coef * (1 + e * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target!r}, horizon={horizon!r}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])


class FixedKLController:
    """Constant KL coefficient with the AdaptiveKLController interface (update is a no-op)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
