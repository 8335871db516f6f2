"""Pure loss functions of tensors (no model, no trainer). Imports torch only.

- preference: DPO, IPO, hinge, cDPO, rDPO, Dr. DPO, KLDPO, WDPO, selected by name via ``preference_loss``.
- reward: Bradley-Terry loss for reward models.
- ppo: masked statistics, KL estimates, GAE, clipped policy / value losses, entropy, KL controllers.
"""

from alignlab.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)
from alignlab.losses.preference import (
    LENGTH_NORMALIZED_LOSSES,
    PREFERENCE_LOSSES,
    cdpo_loss,
    dpo_loss,
    drdpo_loss,
    hinge_loss,
    ipo_loss,
    kldpo_loss,
    preference_loss,
    preference_loss_params,
    rdpo_loss,
    validate_preference_params,
    wdpo_loss,
    wdpo_penalty,
)
from alignlab.losses.reward import bradley_terry_loss

__all__ = [
    "LENGTH_NORMALIZED_LOSSES",
    "PREFERENCE_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "bradley_terry_loss",
    "cdpo_loss",
    "compute_gae",
    "dpo_loss",
    "drdpo_loss",
    "entropy_from_logits",
    "hinge_loss",
    "ipo_loss",
    "kl_estimate",
    "kldpo_loss",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "preference_loss",
    "preference_loss_params",
    "rdpo_loss",
    "validate_preference_params",
    "value_loss",
    "wdpo_loss",
    "wdpo_penalty",
]
