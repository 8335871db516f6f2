"""The RL loops' low-precision sampling copy (alignlab/rl/sampler.py, `rollout.dtype`), on the built-in tiny model:

- LoRA: after the adapter moves (as a training step moves it), `refresh` makes the copy's every weight equal, bit for
  bit, to merge_and_unload of the policy as it is now, cast to bf16; the inactive "ref" adapter (the SFT adapter's
  frozen copy) is not folded in; its logits are the float32 policy's to bf16 precision;
- full fine-tuning: the copy is the policy cast to bf16 after each refresh;
- DoRA and modules_to_save (no in-place rule): the copy is PEFT's merge of the policy as it is now;
- recipes: rollout.dtype with a 4-bit base, or with rollout.recompute_logprobs false, is refused before any model loads.
"""

import copy

import pytest
import torch

from alignlab.recipe import RecipeError


def _lora_policy(path, adapters=("default",), **extra):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, **extra)
    model = get_peft_model(base, config)
    for name in adapters[1:]:
        model.add_adapter(name, config)
    _move(model)
    return model


@torch.no_grad()
def _move(model, scale=0.05):
    """What a few optimizer steps do: every trainable tensor moves (LoRA's B starts at 0, so the delta starts at 0)."""
    for p in model.parameters():
        if p.requires_grad:
            p.add_(scale * torch.randn_like(p))


def _expected(policy, dtype=torch.bfloat16):
    return dict(copy.deepcopy(policy).merge_and_unload().to(dtype).named_parameters())


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_lora_copy_is_the_merged_policy_after_every_refresh(tiny_model_path):
    from alignlab.rl.sampler import LowPrecisionSampler

    policy = _lora_policy(tiny_model_path, adapters=("default", "ref"))
    policy.set_adapter("default")
    sampler = LowPrecisionSampler(policy, torch.bfloat16)
    ids = torch.randint(5, 200, (2, 12))
    for _ in range(2):  # built, then after the adapter moved again (merge_and_unload folds in the active one only)
        model = sampler.refresh(policy)
        own = dict(model.named_parameters())
        expected = _expected(policy)
        assert own.keys() == expected.keys()
        assert all(own[k].dtype == torch.bfloat16 and torch.equal(own[k], expected[k]) for k in own)
        # the copy samples the policy: logits within bf16 rounding of the float32 policy's
        full, low = _logits(policy, ids), _logits(model, ids)
        assert (full - low).abs().max() < 0.1 * full.abs().max()
        _move(policy)


def test_full_copy_is_the_policy_in_bf16(tiny_model_path):
    from transformers import AutoModelForCausalLM

    from alignlab.rl.sampler import LowPrecisionSampler

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    sampler = LowPrecisionSampler(policy, torch.bfloat16)
    _move(policy)
    model = sampler.refresh(policy)
    own = dict(model.named_parameters())
    assert all(torch.equal(own[k], p.to(torch.bfloat16)) for k, p in policy.named_parameters())
    assert model is sampler.model  # refreshed in place, not rebuilt


@pytest.mark.parametrize(
    "extra", [{"use_dora": True}, {"modules_to_save": ["lm_head"]}], ids=["dora", "modules_to_save"]
)
def test_other_peft_setups_are_merged_by_peft(tiny_model_path, extra):
    """DoRA's magnitudes and a fully trained module have no in-place rule: the copy is PEFT's own merge, redone."""
    from alignlab.rl.sampler import LowPrecisionSampler

    policy = _lora_policy(tiny_model_path, **extra)
    sampler = LowPrecisionSampler(policy, torch.bfloat16)
    _move(policy)
    own, expected = dict(sampler.refresh(policy).named_parameters()), _expected(policy)
    assert own.keys() == expected.keys() and all(torch.equal(own[k], expected[k]) for k in own)


def _grpo_raw(**kw):
    stage = {"name": "grpo", "type": "grpo", "dataset": {"path": "builtin:arith", "split": "sft", "size": 16},
             "reward_fn": "builtin:arith", "train": {"max_steps": 1}, "rollout": {"dtype": "bfloat16"}, **kw}  # fmt: skip
    return {"name": "t", "model": {"name_or_path": "builtin:tiny-llama"}, "stages": [stage]}


def test_rollout_dtype_with_a_4bit_base_is_refused(write_recipe):
    from alignlab.validate import validate_recipe

    raw = {**_grpo_raw(), "peft": {"method": "qlora"}}
    with pytest.raises(RecipeError, match=r"stages\[0\] \(grpo\): rollout.dtype: bfloat16 casts .* qlora base"):
        validate_recipe(write_recipe(raw))


def test_rollout_dtype_needs_recomputed_logprobs(write_recipe):
    from alignlab.validate import validate_recipe

    raw = _grpo_raw(rollout={"dtype": "bfloat16", "recompute_logprobs": False})
    with pytest.raises(RecipeError, match=r"rollout.dtype: bfloat16 .* remove rollout.recompute_logprobs: false"):
        validate_recipe(write_recipe(raw))
