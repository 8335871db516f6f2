"""The reference policy's log-probs for the RL loops (PPO's KL penalty, GRPO's KL term and collapse watch): the
stage's input model, frozen, without a second backbone under PEFT.

- continuing an adapter (e.g. after a LoRA SFT stage): its frozen copy, adapter "ref" on the same backbone
  (models.load_stage_model(ref_adapter=True) loads it), so the reference is the SFT model, not the raw base;
- a fresh adapter (a base or full-weights input under LoRA / QLoRA): the same model with the adapter disabled;
- full fine-tuning: a frozen copy of the input weights (a second model in memory).
"""

from __future__ import annotations

import torch

from alignlab.logprobs import completion_logits, token_logprobs
from alignlab.models import REF_ADAPTER, load_causal_lm
from alignlab.rl.loop import disable_dropout


def reference_logprobs(recipe, policy, input_path: str, temperature: float, device, sharding=None):
    """(input_ids, attention_mask, C) -> [B, C] log-probs of the last C tokens under the reference policy.
    `sharding` (alignlab.parallel.Sharding): a full-weights reference is sharded like the policy (its own FSDP2 root,
    each layer gathered when it runs); under PEFT the reference is the policy's own (sharded) modules."""
    if not hasattr(policy, "peft_config"):
        # Full fine-tuning: the reference is a frozen copy of the input weights.
        ref = load_causal_lm(recipe, input_path).eval().requires_grad_(False)
        disable_dropout(ref)
        if sharding is not None and sharding.enabled:
            sharding.shard(ref)  # each unit moved to the device as it is sharded
        else:
            ref.to(device)
    else:
        ref = policy

    @torch.no_grad()
    def logprobs(input_ids, attention_mask, n):
        if ref is not policy:
            logits = completion_logits(ref, input_ids, attention_mask, n, temperature)
        elif REF_ADAPTER in policy.peft_config:  # continuing an SFT adapter: its frozen copy
            policy.set_adapter(REF_ADAPTER, inference_mode=True)
            try:
                logits = completion_logits(policy, input_ids, attention_mask, n, temperature)
            finally:
                policy.set_adapter("default")  # trainable again (and "ref" frozen)
        else:  # a fresh adapter: the model under it
            with policy.disable_adapter():
                logits = completion_logits(policy, input_ids, attention_mask, n, temperature)
        return token_logprobs(logits, input_ids[:, -n:])

    return logprobs
