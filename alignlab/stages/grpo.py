"""GRPO stage: critic-free RL with verifiable rewards (GRPO, Dr. GRPO, RLOO, DAPO's fixes) on alignlab's own loop
(alignlab/rl/grpo.py, on accelerate), full, LoRA or QLoRA.

    accelerate launch -m alignlab run recipes/sft_grpo_arith.yaml --stage grpo

Why our own loop and not TRL 1.16's GRPOTrainer (which has loss_type grpo / dr_grpo / dapo, epsilon_high,
reward_weights, num_iterations, and vLLM generation on GPUs): what this stage promises is what TRL's loop does not
give, and the rollout machinery that gives it is already alignlab's (PPO's, alignlab/rl/ppo.py):
- 2 processes equal 1, resume equals the uninterrupted run: every response has its own seeded random stream
  (generation.RowSeededSampler) and a prompt's group stays on one process. TRL's RepeatSampler spreads a prompt's
  generations over processes and samples from each process's global generator, so what is sampled depends on
  the number of processes, and a resumed run samples other responses than the uninterrupted one did.
- the sampling policy's log-probs come free off the sampling pass (TRL runs an extra forward for them whenever
  num_iterations > 1 or the generation batch spans several optimizer steps);
- RLOO's leave-one-out advantage, per-component reward logging, DAPO's drop of flat groups as loss weights, the
  collapse watch with stop_if, the NaN guard and atomic checkpoints would all be overrides of a 3,400-line trainer;
- the reference hand-off is the one PPO and DPO use (the SFT adapter's frozen copy after a LoRA SFT stage).
What we give up: TRL's vLLM generation (GPU), its other loss types (bnpo, cispo, sapo, ...) and sequence-level
importance sampling. bench/grpo_vs_trl.py compares speed and memory at the same configuration.

Policy: the input model (e.g. the SFT model). Reference (only loaded or run when something uses it: beta > 0, the
collapse watch, stop_if.kl): the input model, frozen, without a second backbone under PEFT (alignlab/rl/reference.py):
continuing an SFT adapter, its frozen copy (adapter "ref"); with a fresh adapter, the model with the adapter
disabled; with full fine-tuning, a frozen copy of the input weights. Reward: `reward_fn` (module:function or
builtin:TASK, called with the prompts' user texts and the responses, one float each; or a list of weighted
components) and/or `reward_model` (an earlier reward stage or a model directory), summed with their weights.

Writes <stage>/model (adapter or full weights; the "ref" copy is not saved), metrics.jsonl (reward and each
reward/<component>, reward_std, zero_std_groups, response_length, eos_rate, entropy, repetition, kl, policy_loss,
clip_low_frac, clip_high_frac, approx_kl, ratio per logging step), samples.jsonl (the watch's samples) and
checkpoints/step-N every `train.save_steps` (`--resume` continues from the newest complete one).
"""

from __future__ import annotations

from alignlab.contract import StageContext
from alignlab.rewards import reward_fn_scorer
from alignlab.rl.grpo import GRPOTrainer, RewardComponent
from alignlab.rl.reference import reference_logprobs
from alignlab.schema import RewardFnSpec
from alignlab.stages import rl_glue


def run(ctx: StageContext):
    spec, recipe = ctx.spec, ctx.recipe
    accelerator = rl_glue.start(ctx)
    sharding = rl_glue.sharding(ctx, accelerator)

    # Policy and reference (one backbone under PEFT)
    policy, base, tokenizer = rl_glue.load_policy(
        ctx,
        "Set `input:` to the stage whose policy GRPO trains, e.g. `input: sft`, and name the reward model with "
        "`reward_model: {input}`.",
    )
    wants_reference = spec.beta > 0 or spec.watch_steps is not None or (spec.stop_if and spec.stop_if.kl)
    reference = (
        reference_logprobs(recipe, policy, base, spec.rollout.temperature, accelerator.device, sharding)
        if wants_reference
        else None
    )
    prompts = rl_glue.load_prompts(ctx, tokenizer)

    # Reward components
    fns = [RewardFnSpec(fn=spec.reward_fn)] if isinstance(spec.reward_fn, str) else spec.reward_fn or []
    rewards = [RewardComponent(c.fn, c.weight, reward_fn_scorer(c.fn)) for c in fns]
    if spec.reward_model is not None:
        _, scorer = rl_glue.load_reward_scorer(ctx, accelerator.device, spec.rollout.forward_batch_size or 32)
        rewards.append(RewardComponent("reward_model", spec.reward_model_weight, scorer))

    # Train (resuming from the newest complete checkpoint when asked)
    trainer = GRPOTrainer(
        accelerator=accelerator,
        policy=policy,
        tokenizer=tokenizer,
        prompts=prompts,
        rewards=rewards,
        reference=reference,
        spec=spec,
        seed=recipe.seed,
        stage_dir=ctx.stage_dir,
        sharding=sharding,
    )
    metrics = trainer.train(resume=ctx.resume)

    # Save, report
    return rl_glue.finish(
        ctx, accelerator, trainer.policy, tokenizer, base, trainer.step, metrics, sharding, trainer.unwrapped
    )
