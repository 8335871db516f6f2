"""Distill stage: knowledge distillation from a teacher into the stage's input model (the student), offline on the
data's completions or on-policy on the student's own samples (GKD), on alignlab's own loop (alignlab/rl/distill.py),
full, LoRA or QLoRA.

    accelerate launch -m alignlab run recipes/smollm2_distill_lora.yaml --stage distill

Why our own loop and not TRL 1.16's DistillationTrainer (or its experimental GKDTrainer): the stage promises what
the GRPO stage promises, and the machinery that keeps those promises is alignlab's (alignlab/rl/loop.py): 2
processes equal 1 and resume equals the uninterrupted run (each sampled row has its own seeded random stream, each
step's on-policy draw its own seed; TRL samples from each process's global generator), sampling with alignlab's
sampler and its end tokens, atomic checkpoints and the NaN guard. TRL's trainers also load the teacher themselves
from a name; here the teacher is any model alignlab can load, an earlier stage included. What we give up: TRL's
vLLM generation (GPU).

Teacher: `teacher:` names an earlier stage of the recipe (its output: full weights or an adapter over the base), a
builtin:NAME, a model folder or a hub id; it is loaded frozen, in eval mode. Teacher and student must share a
tokenizer: checked from the tokenizer files before any model loads (alignlab validate does it for local teachers;
this stage for the others), with a message that says why.

Writes <stage>/model (adapter or full weights), metrics.jsonl (loss, forward_kl, reverse_kl, on_policy,
response_length, nll or teacher_nll, eos_rate per logging step; the final row: eval_forward_kl and
first_eval_forward_kl, the held-out KL before and after) and checkpoints/step-N every `train.save_steps`
(`--resume` continues from the newest complete one).
"""

from __future__ import annotations

from transformers import AutoTokenizer

from alignlab.builtin import resolve_model_name
from alignlab.contract import StageContext
from alignlab.data import DataError, build_datasets
from alignlab.models import load_causal_lm, load_frozen_model, load_tokenizer, output_tokenizer_dir
from alignlab.recipe import RecipeError
from alignlab.rl.distill import DistillTrainer, examples_of
from alignlab.stages import rl_glue
from alignlab.stages.types import teacher_tokenizer_problem


def run(ctx: StageContext):
    spec, recipe = ctx.spec, ctx.recipe
    accelerator = rl_glue.start(ctx)
    sharding = rl_glue.sharding(ctx, accelerator)

    # Tokenizers, then data: every check that needs no model first
    teacher_stage = ctx.outputs.get(spec.teacher)
    tokenizer = load_tokenizer(recipe, output_tokenizer_dir(recipe, ctx.input))
    if teacher_stage is None:  # a model outside the recipe: its tokenizer must read the student's ids alike
        teacher_path = resolve_model_name(spec.teacher)
        teacher_tokenizer = AutoTokenizer.from_pretrained(
            teacher_path, trust_remote_code=recipe.model.trust_remote_code
        )
        problem = teacher_tokenizer_problem(tokenizer, teacher_tokenizer, spec.teacher)
        if problem:
            raise RecipeError(f"stage '{spec.name}': {problem}")
    elif teacher_stage.head != "causal_lm":
        raise RecipeError(
            f"stage '{spec.name}': teacher '{spec.teacher}' is a reward model (no language-model head): name a stage "
            "that trains a language model (sft, dpo, distill, ...), a model folder or a hub id"
        )
    chat = tokenizer.chat_template is not None
    train_ds, eval_ds = build_datasets(spec.dataset, recipe, spec.type, chat)
    examples = examples_of(train_ds)
    if spec.needs_completions and any(ex.completion is None for ex in examples):
        raise DataError(
            f"stage '{spec.name}' ({spec.dataset.path}): mode {spec.mode}"
            + (f" with on_policy_share {spec.on_policy_share}" if spec.mode == "on_policy" else "")
            + " trains on the data's completions, and these rows are prompts alone. Give prompt/completion or chat "
            "rows, or set mode: on_policy (its default on_policy_share 1 needs prompts only)"
        )
    eval_examples = [ex for ex in examples_of(eval_ds) if ex.completion is not None] if eval_ds is not None else None

    # Student (trained) and teacher (frozen)
    policy, base, _ = rl_glue.load_policy(
        ctx, "Set `input:` to the language model the stage trains as the student, e.g. `input: sft`."
    )
    if teacher_stage is not None:
        teacher = load_frozen_model(recipe, teacher_stage)
    else:
        teacher = load_causal_lm(recipe, teacher_path, quantize=False).to(accelerator.device)
        teacher = teacher.eval().requires_grad_(False)

    # Train (resuming from the newest complete checkpoint when asked)
    trainer = DistillTrainer(
        accelerator=accelerator,
        policy=policy,
        teacher=teacher,
        tokenizer=tokenizer,
        examples=examples,
        eval_examples=eval_examples,
        spec=spec,
        seed=recipe.seed,
        stage_dir=ctx.stage_dir,
        sharding=sharding,
    )
    metrics = trainer.train(resume=ctx.resume)

    # Save, report
    return rl_glue.finish(ctx, accelerator, trainer.policy, tokenizer, base, trainer.step, metrics, sharding)
