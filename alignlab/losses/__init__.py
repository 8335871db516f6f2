"""Pure loss functions of tensors (no model, no trainer).

- preference: DPO, IPO, hinge, cDPO, rDPO, Dr. DPO, KLDPO, WDPO, length-normalised DPO, and the reference-free
  SimPO and ORPO, selected by name via ``preference_loss``; the chosen answers' NLL (``chosen_nll``, RPO's term);
  catalog: what trainers need to know about each (torch-free).
- reward: Bradley-Terry loss for reward models.
- ppo: masked statistics, KL estimates, GAE, clipped policy / value losses, entropy, KL controllers.
- grpo: group-relative advantages (GRPO, Dr. GRPO, RLOO), clip-higher surrogate, k3 term, loss aggregations.
- sft: token NLL and NLL + token-level unlikelihood (an sft stage's `loss`).
- distill: forward KL, reverse KL and GKD's generalized JSD between a student's and a teacher's next-token
  distributions, at a temperature (a distill stage's `loss`).

The names below are imported on first use, so that `alignlab.losses.catalog` (read by recipe validation) does not
import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "distill": ("DISTILL_LOSSES", "distill_loss", "kl_from_logprobs", "token_divergence"),
    "grpo": (
        "aggregate",
        "aggregation_count",
        "clipped_surrogate",
        "group_advantages",
        "grpo_loss",
        "zero_std_groups",
    ),
    "ppo": (
        "AdaptiveKLController",
        "FixedKLController",
        "compute_gae",
        "entropy_from_logits",
        "kl_estimate",
        "masked_mean",
        "masked_var",
        "masked_whiten",
        "policy_loss",
        "value_loss",
    ),
    "preference": (
        "PREFERENCE_LOSSES",
        "cdpo_loss",
        "chosen_nll",
        "dpo_loss",
        "drdpo_loss",
        "hinge_loss",
        "ipo_loss",
        "kldpo_loss",
        "ln_dpo_loss",
        "orpo_log_odds",
        "orpo_loss",
        "preference_loss",
        "preference_loss_params",
        "rdpo_loss",
        "simpo_loss",
        "wdpo_loss",
        "wdpo_penalty",
    ),
    "catalog": ("PREFERENCE_LOSS_INFO", "preference_loss_info", "validate_preference_params"),
    "reward": ("bradley_terry_loss",),
    "sft": ("SFT_LOSSES", "sft_loss", "unlikelihood_candidates"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'alignlab.losses' has no attribute {name!r}")
    return getattr(importlib.import_module(f"alignlab.losses.{_MODULE_OF[name]}"), name)
