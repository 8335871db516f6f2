"""Pairwise preference losses (DPO, its robust and length-normalised variants, reference-free SimPO and ORPO),
selected by name from a registry.

Almost every loss is a small pure function of the per-pair log-ratio difference

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]        shape [B]

plus the KL strength ``beta`` and the loss's own keyword-only parameters. A reference-free loss (catalog flag
``needs_reference=False``: simpo, orpo) is given no reference, and h is then the policy's own difference
log pi(y_w|x) - log pi(y_l|x). A loss with the catalog flag ``policy_logps`` (orpo) takes the policy's chosen and
rejected log-probs [B] themselves instead of h. Each returns ``(loss, extra_metrics)``: a 0-dim loss (mean over the
batch unless stated) and a dict of extra 0-dim detached metrics (usually empty).

``PREFERENCE_LOSSES`` maps a name to its function; the accepted parameters and their defaults are read from the
function's signature, so adding a loss means writing one function and one registry line, never an if/elif on names.
``preference_loss`` is the entry point the stages call: it validates, computes h and the reward metrics, and
dispatches. Formulas and sources: the docstring of each function, and docs/algorithms.md ("Preference losses").

Notation: l(z) = -log sigma(z), computed as softplus(-z) (never log(sigmoid(z)), which underflows to -inf).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from alignlab.losses.catalog import PARAM_CHECKS as _PARAM_CHECKS  # noqa: F401  (the range checks)
from alignlab.losses.catalog import preference_loss_info, validate_preference_params

Tensor = torch.Tensor
Metrics = dict[str, Tensor]


def _nll_sigmoid(z: Tensor) -> Tensor:
    """l(z) = -log sigma(z) = softplus(-z), elementwise; exact for large |z|."""
    return F.softplus(-z)


def _cdpo_per_pair(h: Tensor, beta: float, eps: float) -> Tensor:
    """Per-pair cDPO loss (1-eps) l(beta h) + eps l(-beta h), shape [B]; eps = 0 gives per-pair DPO."""
    z = beta * h
    return (1.0 - eps) * _nll_sigmoid(z) + eps * _nll_sigmoid(-z)


# ---------------------------------------------------------------------------------------------------------------
# The losses. Signature: fn(h [B], beta, *, <params with defaults>) -> (loss [], extra metrics).
# ---------------------------------------------------------------------------------------------------------------


def dpo_loss(h: Tensor, beta: float) -> tuple[Tensor, Metrics]:
    """DPO, Rafailov et al. 2023 (arXiv 2305.18290, eq. 7): L = mean_i l(beta h_i).

    h: [B] log-ratio differences. Returns a 0-dim loss. At pi = pi_ref (h = 0), L = ln 2.
    """
    return _nll_sigmoid(beta * h).mean(), {}


def ipo_loss(h: Tensor, beta: float) -> tuple[Tensor, Metrics]:
    """IPO, Azar et al. 2023 (arXiv 2310.12036, eq. 17): L = mean_i (h_i - 1/(2 tau))^2, with tau = beta.

    h: [B]. The function uses the log-probs it is given; the IPO stage passes length-averaged log-probs
    (as TRL does), see docs/algorithms.md. At h = 0, L = (1/(2 beta))^2.
    """
    return (h - 1.0 / (2.0 * beta)).pow(2).mean(), {}


def hinge_loss(h: Tensor, beta: float) -> tuple[Tensor, Metrics]:
    """Hinge / SLiC, Zhao et al. 2023 (arXiv 2305.10425): L = mean_i max(0, 1 - beta h_i).

    h: [B]. At h = 0, L = 1.
    """
    return torch.relu(1.0 - beta * h).mean(), {}


def cdpo_loss(h: Tensor, beta: float, *, eps: float = 0.0) -> tuple[Tensor, Metrics]:
    """Conservative DPO / label smoothing, Mitchell 2023 note ("A note on DPO with noisy preferences"):

    L = mean_i [(1-eps) l(beta h_i) + eps l(-beta h_i)],  eps in [0, 0.5) the assumed label-flip rate.
    h: [B]. eps = 0 is DPO.
    """
    return _cdpo_per_pair(h, beta, eps).mean(), {}


def rdpo_loss(h: Tensor, beta: float, *, eps: float = 0.0) -> tuple[Tensor, Metrics]:
    """Robust DPO, Chowdhury, Kini, Natarajan 2024 (arXiv 2403.00409), unbiased under flip rate eps:

    L = mean_i [(1-eps) l(beta h_i) - eps l(-beta h_i)] / (1 - 2 eps),  eps in [0, 0.5).
    h: [B]. Unbiased: (1-eps) L(h) + eps L(-h) = l(beta h). A single term can be negative (it subtracts
    eps l(-beta h)), so the loss is NOT bounded below by 0. eps = 0 is DPO.
    """
    z = beta * h
    per_pair = ((1.0 - eps) * _nll_sigmoid(z) - eps * _nll_sigmoid(-z)) / (1.0 - 2.0 * eps)
    return per_pair.mean(), {}


def drdpo_loss(h: Tensor, beta: float, *, beta_prime: float = 1.0) -> tuple[Tensor, Metrics]:
    """Dr. DPO, Wu et al. 2024 (arXiv 2407.07880): L = -beta' log( mean_i exp(-l_i / beta') ),

    with l_i = l(beta h_i) the per-pair DPO loss and beta' > 0. h: [B]. beta' -> inf gives mean DPO;
    small beta' down-weights high-loss (likely flipped) pairs.

    Computed, with c = min_i l_i (detached) and x_i = -(l_i - c) / beta' <= 0, as the identity

        L = c - beta' log1p( mean_i expm1(x_i) )

    which is exact in float32 for every beta': expm1 never overflows (x <= 0), the argument of log1p stays in
    (-1, 0] (x = 0 for the smallest loss), and nothing cancels. The plain -beta' (logsumexp(-l / beta') - log B)
    does cancel for large beta': logsumexp ~ log B - mean(l) / beta', so its float32 rounding (~1e-7) is
    multiplied by beta' (at beta' = 1e6 it gave 0.834 where mean DPO is 0.866). The gradient is the soft-min
    weight softmax(-l / beta')_i on each l_i (c is detached; L does not depend on it).
    """
    per_pair = _nll_sigmoid(beta * h)
    center = per_pair.detach().min()
    x = -(per_pair - center) / beta_prime  # [B], <= 0
    return center - beta_prime * torch.log1p(torch.expm1(x).mean()), {}


def kldpo_loss(
    h: Tensor,
    beta: float,
    *,
    tau: float = 0.05,
    w_max: float = 10.0,
    eps: float = 0.0,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Metrics]:
    """KLDPO (KL-ball distributionally robust DPO), Xu et al. 2025 (arXiv 2502.01930;
    per-minibatch form of the authors' OpenRLHF code):

        l_i  = (1-eps) l(beta h_i) + eps l(-beta h_i)           base per-pair loss (DPO when eps = 0), [B]
        lbar = mean of detached l over the GLOBAL batch         gather(l.detach()) when gather is given
        w_i  = min(exp((l_i - lbar) / tau), w_max)              detached, NOT renormalised
        L    = mean_i (w_i l_i) over the local batch

    h: [B]. tau > 0 (e.g. 0.05); tau -> inf gives the base loss. ``gather`` is a callable Tensor [B] -> Tensor
    [N] that concatenates the detached per-pair losses of all processes (e.g. ``accelerator.gather``);
    None means a single process. Extra metrics: kldpo/weight_mean, kldpo/weight_max, kldpo/weight_min.
    """
    per_pair = _cdpo_per_pair(h, beta, eps)
    detached = per_pair.detach()
    global_losses = gather(detached) if gather is not None else detached
    lbar = global_losses.mean()
    # Clamp the exponent rather than the exp: exp of a large exponent is inf; min(inf, w_max) would still be
    # w_max, but never forming inf keeps the weights (and anything logged from them) finite.
    weights = torch.exp(((detached - lbar) / tau).clamp(max=math.log(w_max)))
    loss = (weights * per_pair).mean()
    metrics = {
        "kldpo/weight_mean": weights.mean(),
        "kldpo/weight_max": weights.max(),
        "kldpo/weight_min": weights.min(),
    }
    return loss, metrics


def wdpo_loss(h: Tensor, beta: float, *, rho: float = 0.01, eps: float = 0.0) -> tuple[Tensor, Metrics]:
    """WDPO base term ONLY (Wasserstein-ball DRO DPO, Xu et al. 2025, arXiv 2502.01930):

    returns mean_i [(1-eps) l(beta h_i) + eps l(-beta h_i)] (DPO when eps = 0). h: [B].
    The robust part, rho * mean_i R_i, needs the input embeddings and is added by the stage with
    :func:`wdpo_penalty`; ``rho`` (>= 0) is accepted and validated here so that one params dict describes
    the method, but it is not used by this function.
    """
    del rho  # used by the stage via wdpo_penalty
    return _cdpo_per_pair(h, beta, eps).mean(), {}


def ln_dpo_loss(h: Tensor, beta: float) -> tuple[Tensor, Metrics]:
    """Length-normalised DPO, as trained by Tulu 3 (Lambert et al. 2024, arXiv 2411.15124; "dpo_norm" in
    open-instruct): L = mean_i l(beta h_i), with h built from PER-TOKEN AVERAGE log-probs

        h_i = (log pi(y_w|x) - log pi_ref(y_w|x)) / |y_w|  -  (log pi(y_l|x) - log pi_ref(y_l|x)) / |y_l|

    (catalog flag length_normalized: the stage divides each side by its completion-token count). Averaging removes
    DPO's pull toward longer chosen answers; the log-ratios shrink by the length, hence a larger beta (Tulu 3: 5).
    h: [B]. At h = 0, L = ln 2.
    """
    return _nll_sigmoid(beta * h).mean(), {}


def simpo_loss(h: Tensor, beta: float, *, gamma: float = 1.0) -> tuple[Tensor, Metrics]:
    """SimPO, Meng et al. 2024 (arXiv 2405.14734, eq. 6): L = mean_i l(beta h_i - gamma), no reference model,

    with h_i = avg_logp(y_w|x) - avg_logp(y_l|x) the difference of the policy's PER-TOKEN AVERAGE log-probs
    (catalog flags: length_normalized, needs_reference=False). gamma >= 0 is the target reward margin: the loss
    keeps pushing until the scaled margin beta h exceeds gamma. h: [B]. At h = 0, L = softplus(gamma).
    """
    return _nll_sigmoid(beta * h - gamma).mean(), {}


# |avg log-prob| below this is under float32 log_softmax's resolution, and at 0 the odds p / (1 - p) are infinite.
_ORPO_MAX_AVG_LOGP = -1e-6
_LN2 = math.log(2.0)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, elementwise, accurate everywhere (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): log(-expm1(x)) near 0 (where 1 - exp(x) cancels), log1p(-exp(x)) far from it (where
    expm1 rounds to -1). Each branch is evaluated on inputs clamped to its own side of -ln 2, so the branch that
    torch.where discards is finite too and never sends a nan into the gradient (0 * inf = nan)."""
    near = torch.log(-torch.expm1(x.clamp(min=-_LN2)))
    far = torch.log1p(-torch.exp(x.clamp(max=-_LN2)))
    return torch.where(x > -_LN2, near, far)


def orpo_log_odds(avg_logps: Tensor) -> Tensor:
    """log odds(y|x) = log(p / (1 - p)) with p = exp(avg_logp) the geometric-mean token probability; [B] -> [B].

    = avg_logp - log(1 - exp(avg_logp)), via _log1mexp. avg_logp is capped at -1e-6 first (p < 1): a confident
    model's float32 log-probs round to exactly 0, where the odds are infinite; the cap changes nothing above float32
    resolution and stops the gradient 1 / (1 - p) there.
    """
    x = avg_logps.clamp(max=_ORPO_MAX_AVG_LOGP)
    return x - _log1mexp(x)


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, beta: float) -> tuple[Tensor, Metrics]:
    """ORPO, Hong et al. 2024 (arXiv 2403.07691, eqs. 6-7), no reference model:

        L = mean_i [ NLL_i  +  lambda * l(log odds(y_w|x_i) - log odds(y_l|x_i)) ],    lambda = beta

    chosen_logps, rejected_logps: [B] PER-TOKEN AVERAGE log-probs of the policy (catalog flags policy_logps,
    length_normalized, needs_reference=False). NLL_i = -chosen_logps_i is the SFT loss on the chosen answer (its
    per-token mean); odds(y|x) = p / (1 - p) with p = exp(avg log-prob) (see orpo_log_odds). beta is the paper's
    lambda, as in TRL's ORPOConfig. TRL averages the NLL over all chosen tokens of the batch; here each answer's
    mean counts once, like the odds term. Extra metrics: orpo/nll (mean NLL), orpo/log_odds_ratio (mean).
    """
    log_odds_ratio = orpo_log_odds(chosen_logps) - orpo_log_odds(rejected_logps)  # [B]
    nll = -chosen_logps  # [B]
    loss = (nll + beta * _nll_sigmoid(log_odds_ratio)).mean()
    return loss, {"orpo/nll": nll.detach().mean(), "orpo/log_odds_ratio": log_odds_ratio.detach().mean()}


PREFERENCE_LOSSES: dict[str, Callable[..., tuple[Tensor, Metrics]]] = {
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "cdpo": cdpo_loss,
    "rdpo": rdpo_loss,
    "drdpo": drdpo_loss,
    "kldpo": kldpo_loss,
    "wdpo": wdpo_loss,
    "ln_dpo": ln_dpo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}

# ---------------------------------------------------------------------------------------------------------------
# Parameter validation (shared by every loss that takes a parameter of that name).
# ---------------------------------------------------------------------------------------------------------------


def _check_name(name: str) -> Callable[..., tuple[Tensor, Metrics]]:
    if name not in PREFERENCE_LOSSES:
        close = difflib.get_close_matches(str(name), PREFERENCE_LOSSES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown preference loss {name!r}; known losses: {', '.join(sorted(PREFERENCE_LOSSES))}.{hint}"
        )
    return PREFERENCE_LOSSES[name]


def preference_loss_params(name: str) -> dict[str, Any]:
    """Accepted parameters of loss ``name`` (besides beta) with their defaults, e.g. {'eps': 0.0} for rdpo."""
    fn = _check_name(name)
    return {
        p.name: p.default for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def preference_loss(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float | None = None,
    **params: Any,
) -> tuple[Tensor, Metrics]:
    """Compute preference loss ``name`` (a key of PREFERENCE_LOSSES) on a batch of pairs.

    All inputs are [B] completion log-probs: sums, or per-token averages for the losses whose catalog entry says
    ``length_normalized`` (the caller divides; this function takes what it is given). A reference-free loss
    (catalog ``needs_reference=False``: simpo, orpo) takes ``ref_chosen_logps = ref_rejected_logps = None`` and
    its "log-ratios" are the policy's own log-probs; every other loss requires both. ``beta``: None takes the
    loss's catalog default (0.1; ln_dpo 5, simpo 2). Returns ``(loss, metrics)``: ``loss`` is 0-dim, and
    ``metrics`` maps a name to a 0-dim DETACHED tensor (call ``.item()`` to log):
      rewards/chosen     mean beta (pi_c - ref_c)          (reference-free: mean beta pi_c, as TRL's CPO/ORPO)
      rewards/rejected   mean beta (pi_r - ref_r)
      rewards/margins    mean of chosen minus rejected reward
      rewards/accuracies mean of 1 [chosen reward > rejected reward] + 1/2 [chosen reward == rejected reward]
                         (a tie counts 1/2, as in the evaluation's preference_accuracy: a policy equal to its
                         reference scores 0.5, chance level, where TRL's strict > shows 0)
    plus the loss's own extras (kldpo: kldpo/weight_mean, kldpo/weight_max, kldpo/weight_min; orpo: orpo/nll,
    orpo/log_odds_ratio). For ``wdpo`` only the base term is returned; the stage adds rho * wdpo_penalty(...).mean().
    """
    info = preference_loss_info(name)
    beta = info.beta if beta is None else beta
    validate_preference_params(name, beta, params)
    refs = (ref_chosen_logps, ref_rejected_logps)
    if info.needs_reference and any(r is None for r in refs):
        raise ValueError(
            f"{name} compares the policy with a reference model: pass ref_chosen_logps and ref_rejected_logps "
            f"(got None). Reference-free losses: {', '.join(_reference_free())}"
        )
    if not info.needs_reference and any(r is not None for r in refs):
        raise ValueError(
            f"{name} uses no reference model: pass ref_chosen_logps = ref_rejected_logps = None (the stage loads no "
            f"reference for it, so reference log-probs here would be ignored)"
        )
    tensors = (policy_chosen_logps, policy_rejected_logps, *(r for r in refs if r is not None))
    shapes = {t.shape for t in tensors}
    if len(shapes) != 1 or policy_chosen_logps.dim() != 1:
        raise ValueError(
            f"preference_loss expects {len(tensors)} 1-D log-prob tensors of equal shape [B], got {shapes}"
        )

    if info.needs_reference:
        chosen_logratios = policy_chosen_logps - ref_chosen_logps  # [B]
        rejected_logratios = policy_rejected_logps - ref_rejected_logps  # [B]
    else:  # reference-free: the policy's own log-probs play the log-ratios' part
        chosen_logratios, rejected_logratios = policy_chosen_logps, policy_rejected_logps
    fn = PREFERENCE_LOSSES[name]
    if info.policy_logps:
        loss, extra = fn(policy_chosen_logps, policy_rejected_logps, beta, **params)
    else:
        loss, extra = fn(chosen_logratios - rejected_logratios, beta, **params)  # h: [B]

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics: Metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": pair_accuracy(chosen_rewards, rejected_rewards),
    }
    metrics.update({k: v.detach() for k, v in extra.items()})
    return loss, metrics


def _reference_free() -> list[str]:
    return [n for n in PREFERENCE_LOSSES if not preference_loss_info(n).needs_reference]


def pair_accuracy(chosen: Tensor, rejected: Tensor) -> Tensor:
    """mean_i ([chosen_i > rejected_i] + 1/2 [chosen_i == rejected_i]), 0-dim; chosen, rejected: [B] rewards.

    Ties count 1/2 (no preference expressed is chance level, not an error): the one convention of alignlab's
    training metrics (preference losses, Bradley-Terry) and its evaluation (metrics/preference_accuracy).
    """
    return ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean()


def chosen_nll(chosen_logps: Tensor, chosen_tokens: Tensor) -> Tensor:
    """The chosen answers' negative log-likelihood per token, averaged over pairs, 0-dim: mean_i -log pi(y_w,i | x_i)
    / |y_w,i|, with chosen_logps [B] the summed completion log-probs and chosen_tokens [B] their token counts. A dpo
    stage's `nll_alpha` adds alpha times it to the preference loss: RPO (Pang et al. 2024, arXiv 2404.19733, who
    divide by prompt + answer tokens; here only the answer's are trained, so only they count, as in TRL's
    rpo_alpha). It keeps the likelihood of the chosen answers from falling while the margin grows, which plain DPO
    on near-identical pairs lets happen (the chosen answer loses probability to text neither answer contains)."""
    return (-chosen_logps / chosen_tokens.clamp(min=1)).mean()


def wdpo_penalty(total_loss: Tensor, inputs_embeds: Tensor, create_graph: bool = True) -> Tensor:
    """WDPO gradient-norm regulariser R, shape [B] (Xu et al. 2025, arXiv 2502.01930, WDPO).

    WDPO's Wasserstein-ball DRO objective is replaced by its first-order approximation, a gradient-norm penalty
    on the input embeddings:

        g_i = d(sum_j l_j) / d(input embeddings of pair i)
        R_i = ||g_i||^2 summed over sequence and hidden dims, chosen row i plus rejected row i
        L   = mean_i (l_i + rho R_i)                    (the stage adds rho * R.mean() to the base loss)

    Args:
        total_loss: 0-dim loss whose gradient is taken. To match the paper's g_i pass the SUM of the per-pair
            base losses (e.g. ``loss * B`` when ``loss`` is the batch mean; the mean gives R / B^2).
        inputs_embeds: [2B, T, H] leaf of the graph the model ran on (``model(inputs_embeds=...)``), with the
            batch laid out as [chosen rows; rejected rows]: rows 0..B-1 chosen, rows B..2B-1 rejected.
        create_graph: keep the graph of g so that R is differentiable (True while training, False to log).

    Double backprop does not work through the fused SDPA attention kernels: load the model with
    ``attn_implementation="eager"`` or run inside ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``.
    """
    if inputs_embeds.dim() < 1 or inputs_embeds.shape[0] % 2:
        raise ValueError(
            f"inputs_embeds must be [2B, ...] (chosen rows then rejected), got {tuple(inputs_embeds.shape)}"
        )
    (grad,) = torch.autograd.grad(total_loss, inputs_embeds, create_graph=create_graph)
    sq_norms = grad.pow(2).flatten(1).sum(dim=1)  # [2B]
    half = inputs_embeds.shape[0] // 2
    return sq_norms[:half] + sq_norms[half:]  # [B]
