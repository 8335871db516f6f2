"""A low-precision copy of the policy that an RL loop samples its responses from (`rollout.dtype: bfloat16`).

Why: sampling is half or more of an RL step on a small model (one forward per new token, a few rows at a time), and
bf16 matmuls run ~1.75x as fast on a CPU with AMX (SmolLM2-135M, bench/sampling_speed.py) and on GPUs. Training
stays in float32: the copy only samples. It holds the adapter folded into the base weights (no low-rank matmuls
beside every layer, as the generate stage samples: alignlab.models.merged_for_sampling), in `dtype`, and `refresh`
copies the policy's current weights in before each sampling pass, in place (LoRA: base + B A x scaling per adapted
layer; full fine-tuning: every trainable tensor); DoRA and other PEFT set-ups are merged by PEFT into a fresh copy.

What it changes: responses are samples of the bf16 policy, not of the float32 one the loss's ratios compare against.
The loops then take the sampling policy's log-probs from a float32 forward (recompute_logprobs), so the first
ratio of a step is exactly 1 and the clipped objective is the float32 policy's; the remaining mismatch is the bf16
rounding of the sampling distribution (what vLLM-sampled RL lives with too). QLoRA has no float32 weights to copy
from a 4-bit base, and already computes in its compute dtype: recipes are told so before any model loads.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from alignlab.models import merged_for_sampling

_PEFT_PREFIX = "base_model.model."  # a PeftModel's module names, before merge_and_unload drops the wrappers


class LowPrecisionSampler:
    """`model`: the frozen sampling copy of `policy` in `dtype`; `refresh(policy)` brings it up to date."""

    def __init__(self, policy: nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        self.model = _merged_copy(policy, dtype)
        self._params = dict(self.model.named_parameters())
        self._rule = _copy_rule(policy)
        self._lora = list(_lora_layers(policy)) if self._rule == "lora" else []  # found once: the layers stay

    @torch.no_grad()
    def refresh(self, policy: nn.Module) -> nn.Module:
        """Copy the policy's current (merged) weights into the sampling copy; returns the copy."""
        if self._rule == "lora":
            for name, layer in self._lora:
                merged = layer.get_base_layer().weight + layer.get_delta_weight(layer.active_adapters[0])
                self._params[name].copy_(merged)
        elif self._rule == "full":
            for name, p in policy.named_parameters():
                if p.requires_grad:
                    self._params[name].copy_(p)
        else:  # DoRA, modules_to_save, other tuners: PEFT's own merge, on a fresh copy
            self.model = _merged_copy(policy, self.dtype)
        return self.model


def _merged_copy(policy: nn.Module, dtype: torch.dtype) -> nn.Module:
    return merged_for_sampling(copy.deepcopy(policy)).to(dtype).eval().requires_grad_(False)


def _copy_rule(policy: nn.Module) -> str:
    """How `refresh` brings the copy up to date: "full" (a plain model: its trainable tensors, cast), "lora" (a PEFT
    model whose only trainable tensors are plain LoRA's A and B: base + B A x scaling per adapted layer, in place), or
    "rebuild" (anything else under PEFT: DoRA's magnitudes, modules_to_save, other tuners: merge a fresh copy)."""
    from peft import PeftModel

    if not isinstance(policy, PeftModel):
        return "full"
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    plain = all(".lora_A." in n or ".lora_B." in n for n in trainable)
    return "lora" if plain else "rebuild"


def _lora_layers(policy: nn.Module):
    """(the sampling copy's weight name, the policy's LoRA layer) for every layer the adapter changes."""
    from peft.tuners.lora import LoraLayer

    for name, module in policy.named_modules():
        if isinstance(module, LoraLayer):
            yield name.removeprefix(_PEFT_PREFIX) + ".weight", module
