"""Eval stage: did alignment work? The stage's input model (the policy) against a reference on the same prompts.

    accelerate launch -m alignlab run recipes/quickstart.yaml --stage eval

Policy: the stage's input (by default the previous stage's model; `input: base` for the base model).
Reference: `reference: base` (the recipe's base model, the default) or the name of an earlier stage. Measures the
task's true reward (`reward_fn`; with builtin:constraints also strict and per-kind accuracy), a reward model's
score (`reward_model`), the win rate against the reference, the KL to it (on samples at temperature 1), repetition
and length of both models' answers, DPO's implicit-reward accuracy on held-out pairs (`preference_dataset`),
perplexity on held-out SFT data (`sft_dataset`) and NLL on a fixed held-out text (`nll_dataset`), each with a 95%
interval; what each number is exactly, and the eval.json keys: alignlab/evaluation/__init__.py.

Writes <run>/<stage>/eval.json, eval.md (printed at the end of `alignlab run`) and plots/*.png of the earlier
stages' training curves. Runs on the main process only, other processes waiting; sharded (`parallel.shard: fsdp2`)
every process runs the same evaluation, each holding 1/N of the weights (alignlab/parallel.py), and the main one
writes.
"""

from __future__ import annotations

from accelerate import PartialState

from alignlab.contract import StageContext, StageOutput, checkpoint_output
from alignlab.evaluation.evaluator import evaluate_models, numeric
from alignlab.evaluation.report import write_results
from alignlab.models import resolve_base
from alignlab.parallel import Sharding
from alignlab.recipe import RecipeError


def run(ctx: StageContext) -> StageOutput:
    spec, recipe = ctx.spec, ctx.recipe
    state = PartialState()

    # Inputs: the policy, the reference and the reward model, from earlier stages (or a path for the reward model).
    if ctx.input is not None and ctx.input.head != "causal_lm":
        raise RecipeError(
            f"stage '{spec.name}' would evaluate '{ctx.input.stage}', a reward model, as a policy; set its "
            f"`input` to the policy's stage (and `reward_model: {ctx.input.stage}` to score with it)"
        )
    reference = None if spec.reference == "base" else ctx.outputs[spec.reference]
    reward_model = None
    if spec.reward_model:
        rm = ctx.outputs.get(spec.reward_model)
        reward_model = rm if rm is not None else checkpoint_output(recipe.resolve_path(spec.reward_model))
    curves = {n: ctx.stage_dir.parent / n / "metrics.jsonl" for n, o in ctx.outputs.items() if o.kind != "none"}

    # Evaluate and write the report: on the main process with whole models, or, sharded, on every process at once
    # (the same prompts everywhere, each process holding 1/N of the weights), the main one writing.
    sharding = Sharding(recipe.parallel_for(spec), state, f"stage '{spec.name}'")
    results = {}
    if sharding.enabled or state.is_main_process:
        results = evaluate_models(
            recipe,
            spec,
            ctx.input,
            reference,
            reward_model=reward_model,
            sharding=sharding if sharding.enabled else None,
        )
    if state.is_main_process:
        write_results(results, ctx.stage_dir, curves)
    state.wait_for_everyone()
    return StageOutput(
        spec.name, "eval", path="", kind="none", base=resolve_base(recipe), metrics=numeric(results),
        parallel={"shard": sharding.mode, "world_size": sharding.world_size},
    )  # fmt: skip
