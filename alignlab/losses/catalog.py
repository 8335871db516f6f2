"""What the trainers and checkers need to know about each preference loss, without torch.

One entry per loss of alignlab/losses/preference.py (a test checks they agree): its parameters besides beta with
their defaults, and the properties that change how a trainer must feed or run it. Trainers and launch checks read
these flags; none of them branches on a loss's name. `alignlab validate` checks loss parameters from here without
importing torch.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PreferenceLossInfo:
    params: dict[str, Any] = field(default_factory=dict)  # recipe parameters besides beta, with their defaults
    length_normalized: bool = False  # takes per-token average log-probs, not sums (IPO, as TRL)
    batch_statistic: bool = False  # uses a statistic of the GLOBAL batch: pass `gather` under several processes
    input_gradient_penalty: str | None = None  # parameter weighting a gradient-norm penalty on the input embeddings
    shardable: bool = True  # False: differentiates twice, which FSDP / ZeRO-3's per-module gathering does not survive
    needs_reference: bool = True  # False: reference-free; the stage loads no reference and computes no ref log-probs
    policy_logps: bool = False  # takes the policy's chosen and rejected log-probs [B] themselves, not h (ORPO)
    beta: float = 0.1  # beta when the recipe gives none (its scale depends on the loss: sums vs per-token averages)
    source: str = ""  # the paper


PREFERENCE_LOSS_INFO: dict[str, PreferenceLossInfo] = {
    "dpo": PreferenceLossInfo(source="Rafailov et al. 2023, arXiv 2305.18290"),
    "ipo": PreferenceLossInfo(length_normalized=True, source="Azar et al. 2023, arXiv 2310.12036"),
    "hinge": PreferenceLossInfo(source="SLiC-HF, Zhao et al. 2023, arXiv 2305.10425"),
    "cdpo": PreferenceLossInfo({"eps": 0.0}, source="Mitchell 2023 (label smoothing)"),
    "rdpo": PreferenceLossInfo({"eps": 0.0}, source="Chowdhury et al. 2024, arXiv 2403.00409"),
    "drdpo": PreferenceLossInfo({"beta_prime": 1.0}, source="Wu et al. 2024, arXiv 2407.07880"),
    "kldpo": PreferenceLossInfo(
        {"tau": 0.05, "w_max": 10.0, "eps": 0.0}, batch_statistic=True, source="Xu et al. 2025, arXiv 2502.01930"
    ),
    "wdpo": PreferenceLossInfo(
        {"rho": 0.01, "eps": 0.0},
        input_gradient_penalty="rho",
        shardable=False,
        source="Xu et al. 2025, arXiv 2502.01930",
    ),
    # Tulu 3's length-normalised DPO ("dpo_norm" in open-instruct), trained with beta = 5.
    "ln_dpo": PreferenceLossInfo(
        length_normalized=True, beta=5.0, source="Tulu 3, Lambert et al. 2024, arXiv 2411.15124"
    ),
    # SimPO's suggested starting point: beta = 2 and gamma / beta = 0.5 (its papers' beta range is 2 to 10).
    "simpo": PreferenceLossInfo(
        {"gamma": 1.0},
        length_normalized=True,
        needs_reference=False,
        beta=2.0,
        source="Meng et al. 2024, arXiv 2405.14734",
    ),
    # beta is ORPO's lambda (as TRL's ORPOConfig.beta); 0.1 as in TRL.
    "orpo": PreferenceLossInfo(
        length_normalized=True,
        needs_reference=False,
        policy_logps=True,
        beta=0.1,
        source="Hong et al. 2024, arXiv 2403.07691",
    ),
}


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# name -> (predicate on the value, human-readable allowed range)
PARAM_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "beta": (lambda v: _is_real(v) and v > 0 and math.isfinite(v), "beta must be a finite number > 0"),
    "eps": (lambda v: _is_real(v) and 0 <= v < 0.5, "eps must be in [0, 0.5)"),
    "tau": (lambda v: _is_real(v) and v > 0, "tau must be > 0"),
    "beta_prime": (lambda v: _is_real(v) and v > 0, "beta_prime must be > 0"),
    "rho": (lambda v: _is_real(v) and v >= 0 and math.isfinite(v), "rho must be a finite number >= 0"),
    "w_max": (lambda v: _is_real(v) and v >= 1, "w_max must be >= 1"),
    "gamma": (lambda v: _is_real(v) and v >= 0 and math.isfinite(v), "gamma must be a finite number >= 0"),
    "gather": (lambda v: v is None or callable(v), "gather must be None or a callable Tensor -> Tensor"),
}


def preference_loss_info(name: str) -> PreferenceLossInfo:
    if name not in PREFERENCE_LOSS_INFO:
        close = difflib.get_close_matches(str(name), PREFERENCE_LOSS_INFO, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown preference loss {name!r}; known losses: {', '.join(sorted(PREFERENCE_LOSS_INFO))}.{hint}"
        )
    return PREFERENCE_LOSS_INFO[name]


def validate_preference_params(name: str, beta: float, params: dict[str, Any]) -> None:
    """Raise ValueError unless ``name`` is a known loss, beta > 0, and every key of ``params`` is a parameter of
    that loss with a value in its allowed range. Needs no tensors (the recipe validator calls it early)."""
    info = preference_loss_info(name)
    accepted = dict(info.params, **({"gather": None} if info.batch_statistic else {}))
    ok, allowed = PARAM_CHECKS["beta"]
    if not ok(beta):
        raise ValueError(f"{name}: {allowed}, got beta={beta!r}")
    for key, value in params.items():
        if key not in accepted:
            shown = ", ".join(accepted) if accepted else "none besides beta"
            raise ValueError(f"{name}: unknown parameter {key!r}; {name} accepts: {shown}")
        ok, allowed = PARAM_CHECKS[key]
        if not ok(value):
            raise ValueError(f"{name}: {allowed}, got {key}={value!r}")
