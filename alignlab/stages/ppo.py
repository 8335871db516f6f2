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
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn
from transformers import set_seed

from alignlab.contract import StageContext, StageOutput, append_final_metrics
from alignlab.data import build_datasets
from alignlab.models import (
    check_target_modules,
    load_stage_model,
    load_tokenizer,
    save_stage_model,
)
from alignlab.recipe import RecipeError
from alignlab.rewards import load_reward_model, reward_fn_scorer, reward_model_scorer
from alignlab.rl.ppo import PolicyWithValueHead, PPOTrainer
from alignlab.rl.reference import reference_logprobs
from alignlab.stages.trl_glue import available_trackers

log = logging.getLogger("alignlab")


def run(ctx: StageContext):
    spec, recipe = ctx.spec, ctx.recipe
    trackers = available_trackers(spec.report_to)
    accelerator = Accelerator(log_with=None if trackers == "none" else trackers, project_dir=str(ctx.stage_dir))
    if trackers != "none":
        accelerator.init_trackers(f"{recipe.name}-{spec.name}")
    set_seed(recipe.seed)

    # Policy and reference (one backbone under PEFT)
    if ctx.input is not None and ctx.input.head != "causal_lm":
        raise RecipeError(
            f"stage '{spec.name}' (ppo) would start from '{ctx.input.stage}', a reward model (no language-model "
            f"head). Set `input:` to the stage whose policy PPO trains, e.g. `input: sft`."
        )
    policy, base = load_stage_model(recipe, ctx.input, ref_adapter=True)
    check_target_modules(recipe, policy)
    if recipe.model.gradient_checkpointing and hasattr(policy, "peft_config"):
        policy.enable_input_require_grads()
    tokenizer = load_tokenizer(recipe, base)
    reference = reference_logprobs(recipe, policy, base, spec.rollout.temperature, accelerator.device)

    # Prompts
    train_ds, _ = build_datasets(spec.dataset, recipe, "ppo", tokenizer.chat_template is not None, with_eval=False)
    prompts = list(train_ds["prompt"])

    # Reward, and the value head (from the reward model's score head when it fits)
    model = PolicyWithValueHead(policy, policy.get_output_embeddings().in_features)
    if spec.reward_model is not None:
        source = ctx.outputs.get(spec.reward_model, spec.reward_model)
        reward_model, reward_tokenizer = load_reward_model(recipe, source)
        reward_model.to(accelerator.device)
        score_fn = reward_model_scorer(reward_model, reward_tokenizer, spec.forward_batch_size)
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
    )
    metrics = trainer.train(resume=ctx.resume)

    # Save, report
    model = trainer.unwrapped
    is_peft = hasattr(model.policy, "peft_config")
    out = StageOutput(
        stage=spec.name,
        type=spec.type,
        path=str(ctx.stage_dir / "model"),
        kind="adapter" if is_peft else "full",
        base=base,
        metrics=metrics,
    )
    if accelerator.is_main_process:
        save_stage_model(recipe, spec, model.policy, tokenizer, out, ctx.stage_dir)
        value_state = {k: v.detach().contiguous() for k, v in model.value_head.state_dict().items()}
        save_file(value_state, str(ctx.stage_dir / "value_head.safetensors"))
        append_final_metrics(ctx.stage_dir, trainer.step, metrics)
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): it would also end the process group
        tracker.finish()
    return out


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
