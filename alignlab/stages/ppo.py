"""PPO stage: RLHF with PPO on alignlab's own loop (alignlab/rl/ppo.py, on accelerate), full, LoRA or QLoRA.

    accelerate launch -m alignlab run recipes/sft_reward_ppo.yaml --stage ppo

Policy: the input model (e.g. the SFT model). Reference: the input model, frozen, without a second backbone
under PEFT: continuing an SFT adapter, the reference is a frozen copy of it (adapter "ref"); with a fresh adapter
it is the model with the adapter disabled; with full fine-tuning it is a frozen copy of the input weights.
Value function: a linear head on the policy's last hidden state (same backbone), initialised from the reward
model's score head when the hidden sizes match. Reward: an earlier reward stage / a reward model directory
(`reward_model`), which scores prompt + response (chat-templated like its training pairs) on the last real
token; or a Python function (`reward_fn: module:function`, called with the prompts' user texts and the
response texts, returning one float per response). The score goes on the last real response token.

Writes <stage>/model (adapter or full weights; the "ref" copy is not saved), <stage>/value_head.safetensors,
metrics.jsonl (score, kl, entropy, clipfrac, approx_kl, value_loss, response_length, eos_rate, ... per logging
step) and checkpoints/step-N every `save_steps` (`--resume` continues from the newest complete one).
"""

from __future__ import annotations

import logging

import torch
from safetensors.torch import save_file
from torch import nn

from alignlab.contract import StageContext
from alignlab.rewards import reward_fn_scorer
from alignlab.rl.ppo import PolicyWithValueHead, PPOTrainer
from alignlab.rl.reference import reference_logprobs
from alignlab.stages import rl_glue

log = logging.getLogger("alignlab")


def run(ctx: StageContext):
    spec, recipe = ctx.spec, ctx.recipe
    accelerator = rl_glue.start(ctx)
    sharding = rl_glue.sharding(ctx, accelerator)

    # Policy and reference (one backbone under PEFT)
    policy, base, tokenizer = rl_glue.load_policy(
        ctx, "Set `input:` to the stage whose policy PPO trains, e.g. `input: sft`."
    )
    reference = reference_logprobs(recipe, policy, base, spec.rollout.temperature, accelerator.device, sharding)
    prompts = rl_glue.load_prompts(ctx, tokenizer)

    # Reward, and the value head (from the reward model's score head when it fits)
    model = PolicyWithValueHead(policy, policy.get_output_embeddings().in_features)
    if spec.reward_model is not None:
        reward_model, score_fn = rl_glue.load_reward_scorer(ctx, accelerator.device, spec.forward_batch_size)
        init_value_head(model.value_head, reward_model)
    else:
        score_fn = reward_fn_scorer(spec.reward_fn)

    # Train (resuming from the newest complete checkpoint when asked)
    trainer = PPOTrainer(
        accelerator=accelerator,
        model=model,
        tokenizer=tokenizer,
        prompts=prompts,
        score_fn=score_fn,
        reference=reference,
        spec=spec,
        seed=recipe.seed,
        stage_dir=ctx.stage_dir,
        sharding=sharding,
    )
    metrics = trainer.train(resume=ctx.resume)

    # Save (the value head beside the model), report
    model = trainer.unwrapped
    value_state = sharding.full_state(model.value_head)  # gathered on the main process when sharded
    if accelerator.is_main_process:
        value_state = {k: v.detach().contiguous() for k, v in value_state.items()}
        save_file(value_state, str(ctx.stage_dir / "value_head.safetensors"))
    return rl_glue.finish(ctx, accelerator, model.policy, tokenizer, base, trainer.step, metrics, sharding, model)


def init_value_head(value_head: nn.Linear, reward_model) -> None:
    """Copy the reward model's score head (a Linear to 1 output) into the value head when the shapes match."""
    heads = [
        m
        for name, m in reward_model.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == 1 and "lora_" not in name and "original_module" not in name
    ]
    if not heads or heads[-1].weight.shape != value_head.weight.shape:
        log.info("ppo: the reward model's score head does not fit the value head; starting the value head at 0")
        return
    with torch.no_grad():
        value_head.weight.copy_(heads[-1].weight.float())
        value_head.bias.copy_(heads[-1].bias.float() if heads[-1].bias is not None else torch.zeros(1))
