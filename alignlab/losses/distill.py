"""Knowledge-distillation losses: a student's next-token distributions pulled toward a teacher's, position by
position, over the whole vocabulary (not only the token that was written).

At a position t, with the teacher's logits z_T and the student's z_S [V] and a temperature tau:

    p = softmax(z_T / tau)   (teacher),      q = softmax(z_S / tau)   (student)

    forward_kl:  KL(p || q) = sum_v p_v (log p_v - log q_v)
                 Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531): the
                 student's cross-entropy to the teacher's soft targets, less the teacher's entropy (a constant).
                 Mean-seeking: the student spreads its mass over everything the teacher finds likely.
    reverse_kl:  KL(q || p) = sum_v q_v (log q_v - log p_v)
                 Mode-seeking: the student may drop some of the teacher's modes, but puts no mass where the teacher
                 puts none (MiniLLM, Gu et al. 2024; GKD's choice on the student's own samples).
    jsd:         the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy Distillation of
                 Language Models: Learning from Self-Generated Mistakes", arXiv 2306.13649, eq. 1), with the mixture
                 m = beta p + (1 - beta) q:
                 JSD_beta(p || q) = beta KL(p || m) + (1 - beta) KL(q || m)
                 beta 0.5 is the symmetric JSD (at most ln 2). For small beta, JSD_beta = beta KL(p || q) + O(beta^2),
                 and for beta near 1, JSD_beta = (1 - beta) KL(q || p) + O((1 - beta)^2): the family runs from the
                 forward to the reverse KL (each scaled by the weight of its side), which is why beta lies strictly
                 between 0 and 1 here; forward_kl and reverse_kl are the two ends themselves.

Every divergence is multiplied by tau^2 (Hinton et al. 2015, section 2: the gradients of soft targets at temperature
tau scale as 1 / tau^2, so the factor keeps a loss's size, and its balance with an NLL term, when tau changes). At
tau = 1 nothing changes. TRL's GKDTrainer leaves the factor out; so its losses equal these divided by tau^2.

Shapes: logits [B, C, V] (the positions that predict the C completion tokens), a mask [B, C] of the tokens that
count. Both distributions are computed in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DISTILL_LOSSES = ("forward_kl", "reverse_kl", "jsd")


def kl_from_logprobs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position [..] from log-probabilities [.., V]: sum_v p_v (log p_v - log q_v). A token where
    p_v = 0 adds 0 (its exp underflows to 0, times a finite difference)."""
    return (logp.exp() * (logp - logq)).sum(dim=-1)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    name: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """[B, C, V] student and teacher logits -> [B, C] divergence of `name` between softmax(logits / temperature)
    of each, times temperature^2 (see the module docstring). The teacher's side carries no gradient."""
    if name not in DISTILL_LOSSES:
        raise ValueError(f"unknown distillation loss {name!r}; choose one of {', '.join(DISTILL_LOSSES)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in "
            "shape: both must cover the same positions and the same vocabulary"
        )
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)
    logp = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if name == "forward_kl":
        div = kl_from_logprobs(logp, logq)
    elif name == "reverse_kl":
        div = kl_from_logprobs(logq, logp)
    else:
        if not 0.0 < beta < 1.0:
            raise ValueError(
                f"jsd's beta must lie strictly between 0 and 1 (now {beta}); its ends are the losses forward_kl "
                "(beta -> 0) and reverse_kl (beta -> 1)"
            )
        # log m = log(beta p + (1 - beta) q), computed from the logs without leaving log space
        logm = torch.logsumexp(torch.stack([logp + math.log(beta), logq + math.log1p(-beta)]), dim=0)
        div = beta * kl_from_logprobs(logp, logm) + (1.0 - beta) * kl_from_logprobs(logq, logm)
    return div * temperature**2


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    name: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    num_items: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The divergence summed over the masked positions [B, C], divided by `num_items` (default: their count; a loop
    over several processes passes the global count times this process's share). Returns (loss, stats):
    stats["divergence"] is the loss's per-token mean on this batch, and stats["forward_kl"] / ["reverse_kl"] are
    KL(teacher || student) and KL(student || teacher) per token at temperature 1 (the models' own distributions,
    comparable whatever the loss and its temperature), all detached."""
    mask = mask.float()
    count = mask.sum().clamp(min=1.0)
    div = token_divergence(student_logits, teacher_logits, name=name, beta=beta, temperature=temperature)
    total = (div * mask).sum()
    with torch.no_grad():
        logq = F.log_softmax(student_logits.float(), dim=-1)  # [B, C, V]
        logp = F.log_softmax(teacher_logits.float(), dim=-1)
        stats = {
            "divergence": total.detach() / count,
            "forward_kl": (kl_from_logprobs(logp, logq) * mask).sum() / count,
            "reverse_kl": (kl_from_logprobs(logq, logp) * mask).sum() / count,
        }
    denominator = count if num_items is None else torch.as_tensor(num_items, device=div.device).clamp(min=1e-8)
    return total / denominator, stats
