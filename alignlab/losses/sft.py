"""SFT losses on a causal LM's logits: token NLL, and NLL plus token-level unlikelihood.

Unlikelihood (Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training", arXiv 1908.04319, eq. 4):
at every trained position t, besides raising log p(x_t), push down the probability of each token already written
earlier in the same response (each such token once, the target x_t itself excluded):

    L_t = -log p(x_t | x_<t) - alpha * sum_{c in C_t} log(1 - p(c | x_<t)),  C_t = {x_s : s < t} minus {x_t}

Only trained positions (labels != ignore_index: the completion) form C_t, so copying a keyword from the prompt is
not penalised, only repeating oneself. A model that loops ("simple simple simple ...") has put high probability on
a token it already wrote: the term is large exactly there, and near zero where a response does not repeat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# log(1 - p) is clamped at log(1e-5), as in the paper's code: a candidate the model is sure of costs 11.5, not inf.
MIN_ONE_MINUS_P = 1e-5


def shifted_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, T, V] and labels [B, T] (unshifted, ignore_index on untrained tokens) -> the logits that predict
    each next token [B, T-1, V], its target [B, T-1] (0 where ignored) and the mask of trained positions [B, T-1]."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    return logits, labels.masked_fill(~mask, 0), mask


def unlikelihood_candidates(targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool: cand[b, t, s] says token targets[b, s] is in C_t: s < t, both trained, targets[b, s] is the
    first trained occurrence of its token in the row (a token counts once however often it came) and differs from
    targets[b, t]."""
    T = targets.shape[1]
    same = targets[:, :, None] == targets[:, None, :]  # [B, T, T]: same[b, i, j] = targets i and j equal
    before = torch.ones(T, T, dtype=torch.bool, device=targets.device).tril(-1)  # before[i, j] = j < i
    seen_earlier = (same & before & mask[:, None, :]).any(dim=-1)  # [B, T]: token at s came at a trained s' < s
    first = mask & ~seen_earlier
    return before & first[:, None, :] & mask[:, :, None] & ~same


def token_unlikelihood(logp: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token unlikelihood [B, T]: -sum_{c in C_t} log(1 - p(c | x_<t)), 0 where mask is 0. logp [B, T, V] are
    the log-probabilities predicting targets [B, T] (each position's own token); mask [B, T] marks the tokens of the
    response (C_t draws only on them). Shared by the sft loss and grpo's `unlikelihood` term."""
    mask = mask.bool()
    cand = unlikelihood_candidates(targets, mask)
    T = targets.shape[1]
    p = logp.gather(-1, targets[:, None, :].expand(-1, T, -1)).exp()  # p[b, t, s] = p(targets[b, s] | x_<t)
    return -(torch.log((1 - p).clamp(min=MIN_ONE_MINUS_P)) * cand).sum(dim=-1)


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    name: str = "nll",
    alpha: float = 1.0,
    num_items: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed per-token loss of `name` ("nll" or "unlikelihood") over the trained positions, divided by `num_items`
    (default: their count; the trainer passes the count over every accumulated micro-batch and process). Returns
    (loss, stats) with stats["nll"] and stats["unlikelihood"], each a mean per trained token of this batch."""
    if name not in SFT_LOSSES:
        raise ValueError(f"unknown SFT loss {name!r}; choose one of {', '.join(SFT_LOSSES)}")
    logits, targets, mask = shifted_targets(logits, labels)
    logp = F.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1) * mask  # [B, T]
    count = mask.sum().clamp(min=1)
    total = nll.sum()
    stats = {"nll": total.detach() / count, "unlikelihood": torch.zeros((), device=logits.device)}
    if name == "unlikelihood":
        ul = token_unlikelihood(logp, targets, mask).sum()
        total = total + alpha * ul
        stats["unlikelihood"] = ul.detach() / count
    denominator = count if num_items is None else torch.as_tensor(num_items, device=logits.device).clamp(min=1)
    return total / denominator, stats


SFT_LOSSES = ("nll", "unlikelihood")
