"""Log-probabilities of completions under a model, in one place for every stage that needs them (PPO's rollout and
epochs, the reference passes, evaluation). The DPO stage reads its log-probs off TRL's fused LM head instead
(alignlab/stages/dpo.py), so that [B, T, V] logits are never materialised in its training step.

Conventions: the logit at position t predicts token t + 1; left-padded rows get position ids that count real tokens
only (as generate() did when it sampled them); logits are divided by the sampling temperature, and upcast to float32
before the softmax.

Memory: logits are rows x positions x vocabulary floats, and a real vocabulary is large (SmolLM2 49,152, Llama 3
128,256, Qwen2.5 151,936). The no-grad scoring here (`sequence_logprobs`, `completion_logps`: evaluation) runs
the model on row chunks of at most `MAX_LOGITS` logits (256 MB in float32) and only over the positions it scores,
whatever the batch size and sequence lengths: the evaluation's default 32 rows of 1,000-token SFT rows under
SmolLM2 would otherwise hold 32 x 1,000 x 49,152 x 4 B = 6.3 GB of logits, twice (the logits and their log-softmax).
"""

from __future__ import annotations

import torch

MAX_LOGITS = 2**26  # logits elements per no-grad forward (float32: 256 MB)


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


def sequence_logprobs(
    model, input_ids, attention_mask, start: int, temperature: float = 1.0, max_logits: int = MAX_LOGITS
) -> torch.Tensor:
    """Per-token log-probs [B, T - start] of input_ids[:, start:] under the model (logits / temperature), computed on
    row chunks of at most `max_logits` logits ([rows, T - start + 1, V]; one row at least). For no-grad scoring."""
    n = input_ids.shape[1] - start
    rows = max(1, max_logits // ((n + 1) * vocab_size(model)))
    return torch.cat(
        [
            token_logprobs(completion_logits(model, ids, mask, n, temperature), ids[:, start:])
            for ids, mask in zip(input_ids.split(rows), attention_mask.split(rows))
        ]
    )


def vocab_size(model) -> int:
    """Rows of the output embedding: the width of the logits (can exceed config.vocab_size, e.g. padded to 64)."""
    return model.get_output_embeddings().weight.shape[0]


@torch.no_grad()
def completion_logps(
    model, examples: list[tuple[list[int], int]], pad_id: int, max_logits: int = MAX_LOGITS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs [B] of each example's completion tokens, and their counts [B]. Right-padded batch; scored
    from the first column any row's completion starts at (the prompt columns before it need no logits)."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(input_ids)
    scored = torch.zeros_like(input_ids)  # 1 = a completion token
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        scored[i, max(n_prompt, 1) : len(ids)] = 1  # token 0 has no prediction
    start = max(1, min(max(n_prompt, 1) for _, n_prompt in examples))
    input_ids, attn = input_ids.to(device), attn.to(device)
    logps = sequence_logprobs(model, input_ids, attn, start, max_logits=max_logits)  # [B, T - start]
    mask = scored[:, start:].to(device)
    return (logps * mask).sum(1).cpu(), mask.sum(1).cpu()
