"""Bradley-Terry pairwise loss for reward-model training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignlab.losses.preference import pair_accuracy

Tensor = torch.Tensor


def _as_vector(x: Tensor, what: str) -> Tensor:
    """[B] or [B, 1] -> [B] (reward heads usually emit [B, 1])."""
    if x.dim() == 2 and x.shape[-1] == 1:
        x = x.squeeze(-1)
    if x.dim() != 1:
        raise ValueError(f"{what} must have shape [B] or [B, 1], got {tuple(x.shape)}")
    return x


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    center_coef: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry reward-model loss:

        L = -mean_i log sigma(r_c,i - r_r,i - m_i) + eta * mean_i (r_c,i + r_r,i)^2

    Args:
        chosen_rewards, rejected_rewards: [B] or [B, 1] scalar rewards of the chosen / rejected completions.
        margin: optional [B] (or [B, 1]) per-pair margin m (Llama 2, Touvron et al. 2023, arXiv 2307.09288, eq. 2).
        center_coef: eta >= 0, the reward-centering coefficient (Eisenstein et al. 2023, arXiv 2312.09244);
            None or 0 turns it off; 0.01 is the usual value when on.

    Returns ``(loss, metrics)``: 0-dim loss, and 0-dim detached metrics "accuracy" (mean [r_c > r_r] + 1/2 [r_c ==
    r_r]: a tie counts 1/2, as in DPO's rewards/accuracies and the evaluation's preference accuracy),
    "margin" (mean r_c - r_r), "chosen_rewards", "rejected_rewards" (means).
    """
    r_c = _as_vector(chosen_rewards, "chosen_rewards")
    r_r = _as_vector(rejected_rewards, "rejected_rewards")
    if r_c.shape != r_r.shape:
        raise ValueError(f"chosen and rejected rewards differ in shape: {tuple(r_c.shape)} vs {tuple(r_r.shape)}")
    diff = r_c - r_r  # [B]
    logits = diff if margin is None else diff - _as_vector(margin, "margin").to(diff.dtype)
    loss = -F.logsigmoid(logits).mean()
    if center_coef is not None:
        if center_coef < 0:
            raise ValueError(f"center_coef must be >= 0 (or None), got {center_coef!r}")
        if center_coef > 0:
            loss = loss + center_coef * (r_c + r_r).pow(2).mean()

    diff = diff.detach()
    metrics = {
        "accuracy": pair_accuracy(r_c.detach(), r_r.detach()),
        "margin": diff.mean(),
        "chosen_rewards": r_c.detach().mean(),
        "rejected_rewards": r_r.detach().mean(),
    }
    return loss, metrics
