"""What the stages on alignlab's own RL loops (alignlab/stages/ppo.py, grpo.py) share around their trainers: the
accelerator with its trackers and seed, the policy with its tokenizer, the prompts, a reward model's scorer, and
the end: the final model saved, the final metrics row, the trackers closed. Each stage keeps what differs: its
reference (always for PPO, only when used for GRPO), its reward (PPO: one scorer and a value head; GRPO: weighted
components) and its trainer.
"""

from __future__ import annotations

from accelerate import Accelerator
from transformers import set_seed

from alignlab.contract import StageContext, StageOutput, append_final_metrics
from alignlab.data import build_datasets
from alignlab.models import check_target_modules, load_stage_model, load_tokenizer, save_stage_model
from alignlab.parallel import Sharding
from alignlab.recipe import RecipeError
from alignlab.rewards import load_reward_model, reward_model_scorer
from alignlab.stages.trl_glue import available_trackers


def start(ctx: StageContext) -> Accelerator:
    """The stage's Accelerator (trackers from `train.report_to`, those installed), with the recipe's seed set."""
    spec, recipe = ctx.spec, ctx.recipe
    trackers = available_trackers(spec.train.report_to)
    accelerator = Accelerator(log_with=None if trackers == "none" else trackers, project_dir=str(ctx.stage_dir))
    if trackers != "none":
        accelerator.init_trackers(f"{recipe.name}-{spec.name}")
    set_seed(recipe.seed)
    return accelerator


def sharding(ctx: StageContext, accelerator: Accelerator) -> Sharding:
    """The stage's sharding (`parallel`: the stage's own, else the recipe's) on this run's processes."""
    return Sharding(ctx.recipe.parallel_for(ctx.spec), accelerator, f"stage '{ctx.spec.name}'")


def load_policy(ctx: StageContext, fix: str):
    """(policy, base, tokenizer): the input model to train, on one backbone with the reference under PEFT (the input
    adapter's frozen copy "ref" when it continues one: alignlab/rl/reference.py), and its base model's path.
    `fix`: what the error says to do when the input is a reward model; `{input}` in it names that stage."""
    spec, recipe = ctx.spec, ctx.recipe
    if ctx.input is not None and ctx.input.head != "causal_lm":
        raise RecipeError(
            f"stage '{spec.name}' ({spec.type}) would start from '{ctx.input.stage}', a reward model (no language-model "
            f"head). {fix.format(input=ctx.input.stage)}"
        )
    policy, base = load_stage_model(recipe, ctx.input, ref_adapter=True)
    check_target_modules(recipe, policy)
    if recipe.model.gradient_checkpointing and hasattr(policy, "peft_config"):
        policy.enable_input_require_grads()
    return policy, base, load_tokenizer(recipe, base)


def load_prompts(ctx: StageContext, tokenizer) -> list:
    """The training prompts (chat messages, or plain text when the tokenizer has no chat template)."""
    chat = tokenizer.chat_template is not None
    train_ds, _ = build_datasets(ctx.spec.dataset, ctx.recipe, ctx.spec.type, chat, with_eval=False)
    return list(train_ds["prompt"])


def load_reward_scorer(ctx: StageContext, device, batch_size: int):
    """(reward model, scorer): the stage's `reward_model` (an earlier stage's name or a model directory) on `device`,
    and (prompts, responses) -> [B] scores from it, `batch_size` rows a forward."""
    source = ctx.outputs.get(ctx.spec.reward_model, ctx.spec.reward_model)
    reward_model, reward_tokenizer = load_reward_model(ctx.recipe, source)
    reward_model.to(device)
    return reward_model, reward_model_scorer(reward_model, reward_tokenizer, batch_size)


def finish(
    ctx: StageContext, accelerator, policy, tokenizer, base: str, step: int, metrics: dict, sharding: Sharding,
    trained=None,
) -> StageOutput:  # fmt: skip
    """Save the trained policy (main process: the adapter without "ref", or full weights, gathered from the shards
    when sharded; merged when the stage says so), append the final metrics row, record the sharding (`trained`: the
    module the trainer held, policy and value head), wait for every process and close the trackers."""
    out = StageOutput(
        stage=ctx.spec.name,
        type=ctx.spec.type,
        path=str(ctx.stage_dir / "model"),
        kind="adapter" if hasattr(policy, "peft_config") else "full",
        base=base,
        metrics=metrics,
        parallel=sharding.record(trained if trained is not None else policy),
    )
    # Every process takes part in the gather; an adapter needs only its own (trainable) tensors, not the base's.
    whole = sharding.full_state(policy, trainable_only=out.kind == "adapter") if sharding.enabled else None
    if accelerator.is_main_process:
        save_stage_model(ctx.recipe, ctx.spec, policy, tokenizer, out, ctx.stage_dir, state_dict=whole)
        append_final_metrics(ctx.stage_dir, step, metrics)
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): it would also end the process group
        tracker.finish()
    return out
