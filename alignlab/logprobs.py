"""Log-probabilities of completions under a model, in one place for every stage that needs them (PPO's rollout and
epochs, the reference passes, evaluation). The DPO stage reads its log-probs off TRL's fused LM head instead
(alignlab/stages/dpo.py), so that [B, T, V] logits are never materialised in its training step.

Conventions: the logit at position t predicts token t + 1; left-padded rows get position ids that count real tokens
only (as generate() did when it sampled them); logits are divided by the sampling temperature, and upcast to float32
before the softmax.
"""

from __future__ import annotations

import torch


def completion_logits(model, input_ids, attention_mask, n_completion: int, temperature: float) -> torch.Tensor:
    """[B, C, V] float logits / temperature predicting the last C tokens of input_ids [B, P + C]."""
    # Columns of prompt padding in every row carry nothing: drop them (the rows' outputs do not change).
    start = int(attention_mask.any(dim=0).int().argmax())
    input_ids, attention_mask = input_ids[:, start:], attention_mask[:, start:]
    # Left padding: positions count real tokens only, as generate() did when it sampled the response.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=n_completion + 1,  # the lm_head runs on these positions only
    )
    return out.logits[:, :-1].float() / temperature


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, C, V], [B, C] -> [B, C] log-probs of the given tokens."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(model, input_ids, attention_mask, start: int, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs [B, T - start] of input_ids[:, start:] under the model (logits / temperature)."""
    n = input_ids.shape[1] - start
    return token_logprobs(completion_logits(model, input_ids, attention_mask, n, temperature), input_ids[:, start:])


@torch.no_grad()
def completion_logps(model, examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs [B] of each example's completion tokens, and their counts [B]. Right-padded batch."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(input_ids)
    scored = torch.zeros_like(input_ids)  # 1 = a completion token
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        scored[i, max(n_prompt, 1) : len(ids)] = 1  # token 0 has no prediction
    logps = sequence_logprobs(model, input_ids.to(device), attn.to(device), start=1)  # [B, T-1]
    mask = scored[:, 1:].to(device)
    return (logps * mask).sum(1).cpu(), mask.sum(1).cpu()
