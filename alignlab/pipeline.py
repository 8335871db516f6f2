"""Pipeline: runs a recipe's stages in order in one run directory, handing each stage the output of the one
it starts from, and skipping stages that already finished with the settings the recipe has (unless forced).

run_dir/
  recipe.yaml              the resolved recipe (after overrides), each finished stage as it was trained
  .alignlab.lock           held while a run uses the folder (alignlab/runlock.py)
  <stage>/stage_output.json  what the stage left (written last: its presence = the stage finished), with what it
                           was made from (its `origin`: a finished stage is reused only while it fits the recipe,
                           alignlab/freshness.py)
  <stage>/recipe.yaml, started.json   the recipe and record of the stage's latest attempt
  <stage>/model/           adapter or full weights (safetensors), tokenizer
  <stage>/metrics.jsonl    one JSON object per logging step
  logs/run.log
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from alignlab.freshness import plan_run, start_stage
from alignlab.outputs import StageOutput
from alignlab.recipe import Recipe, RecipeError, StageSpec
from alignlab.runlock import from_main, run_lock

log = logging.getLogger("alignlab")


class StageFailed(RuntimeError):
    """A stage stopped with a diagnosis for the user (training diverged, out of memory); the CLI prints it."""


class TrainingDiverged(StageFailed):
    """A nan or inf loss: the stage stops before the value reaches the weights, keeping the last good checkpoint."""


def checkpoint_note(last: str | Path | None) -> str:
    kept = (
        f"The last good checkpoint is {last}: run again with --resume to continue from it with the same settings, "
        f"or change the setting and run again without --resume to start the stage over."
        if last
        else "No checkpoint was written before it (train.save_steps / save_steps keep some)."
    )
    return f"{kept} No final model or stage_output.json was written."


@dataclass
class StageContext:
    recipe: Recipe
    spec: StageSpec
    stage_dir: Path
    input: StageOutput | None  # the model this stage starts from; None = the recipe's base model
    outputs: dict[str, StageOutput] = field(default_factory=dict)  # every earlier stage's output, by name
    resume: bool = False


def input_stage_name(recipe: Recipe, index: int) -> str | None:
    """Name of the stage whose model stage `index` starts from, or None for the base model."""
    spec = recipe.stages[index]
    if spec.input == "base":
        return None
    if spec.input == "previous":
        for prev in reversed(recipe.stages[:index]):
            if prev.type != "eval":  # eval stages write no model
                return prev.name
        return None
    return spec.input


def check_chain(recipe: Recipe) -> None:
    """Every stage reference points at an EARLIER stage of a fitting type."""
    seen: dict[str, str] = {}
    for i, spec in enumerate(recipe.stages):
        refs = {"input": spec.input if spec.input not in ("previous", "base") else None}
        refs["reward_model"] = getattr(spec, "reward_model", None)
        refs["reference"] = getattr(spec, "reference", None) if getattr(spec, "reference", "base") != "base" else None
        for key, ref in refs.items():
            if ref is None or (key == "reward_model" and ref not in {s.name for s in recipe.stages}):
                continue  # a reward_model that is no stage name is a path, checked by the validator
            if ref not in seen:
                later = ref in {s.name for s in recipe.stages}
                why = "comes later in the recipe" if later else "is not a stage of this recipe"
                raise RecipeError(
                    f"stages[{i}] ({spec.name}).{key} = '{ref}', which {why}. Stages can only start from earlier "
                    f"stages: {', '.join(seen) or '(none before it)'}; or 'base' for the base model."
                )
            if key == "reward_model" and seen[ref] != "reward":
                raise RecipeError(
                    f"stages[{i}] ({spec.name}).reward_model = '{ref}' is a {seen[ref]} stage, not a reward stage"
                )
            if key == "input" and seen[ref] == "eval":
                raise RecipeError(f"stages[{i}] ({spec.name}).input = '{ref}' is an eval stage, which writes no model")
        seen[spec.name] = spec.type


def run_pipeline(recipe: Recipe, only: str | None = None, resume: bool = False, force: bool = False):
    import torch
    from accelerate import PartialState

    check_chain(recipe)
    if only is not None:
        recipe.stage(only)  # raises with the list of stage names
    # On CPU, `accelerate launch --multi_gpu` needs the gloo backend chosen before anything else builds the state.
    state = PartialState(cpu=not torch.cuda.is_available())
    with run_lock(recipe.run_dir, state):  # one run per folder (alignlab/runlock.py)
        return _run_stages(recipe, state, only, resume, force)


def _run_stages(recipe: Recipe, state, only: str | None, resume: bool, force: bool) -> dict[str, StageOutput]:
    from transformers import set_seed

    from alignlab.stages import stage_runner

    run_dir = recipe.run_dir
    if state.is_main_process:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    _setup_logging(run_dir / "logs" / f"run.{state.process_index}.log", state.is_main_process)
    # Reuse only finished stages the recipe still describes; stop on changed ones (alignlab/freshness.py).
    plan = from_main(state, plan_run, recipe, only, force)

    outputs: dict[str, StageOutput] = {}
    for i, spec in enumerate(recipe.stages):
        stage_dir = run_dir / spec.name
        if spec.name in plan.reuse:
            log.info("stage %s: already finished (%s); skipping. Pass --force to run it again.", spec.name, stage_dir)
            outputs[spec.name] = plan.reuse[spec.name]
            continue
        if spec.name not in plan.run:
            continue
        src_name = input_stage_name(recipe, i)
        if src_name is not None and src_name not in outputs:
            raise RecipeError(
                f"stage '{spec.name}' starts from stage '{src_name}', which has not finished in {run_dir}. "
                f"Run it first (alignlab run RECIPE --stage {src_name}) or run the whole recipe."
            )
        log.info("stage %s (%s): starting from %s", spec.name, spec.type, src_name or "the base model")
        origin, resumes = from_main(state, start_stage, recipe, i, outputs, resume, force)
        ctx = StageContext(recipe, spec, stage_dir, outputs.get(src_name) if src_name else None, dict(outputs), resumes)
        # Every stage starts from the recipe's seed (fresh LoRA weights, score heads), on every process alike, so
        # its result does not depend on which stages ran before it in this process (--stage, a rerun, --resume).
        set_seed(recipe.seed)
        try:
            out = stage_runner(spec.type)(ctx)
        except StageFailed as e:
            raise type(e)(f"stage '{spec.name}' ({spec.type}): {e}") from e
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(e):
                raise
            raise StageFailed(f"stage '{spec.name}' ({spec.type}) {out_of_memory_message(recipe, spec, e)}") from e
        if state.is_main_process:
            out.origin = origin
            out.save(stage_dir)
        state.wait_for_everyone()
        outputs[spec.name] = out
    return outputs


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError | MemoryError) or "out of memory" in text or "can't allocate" in text


def out_of_memory_message(recipe: Recipe, spec: StageSpec, e: BaseException) -> str:
    """What ran out of memory, and the recipe settings that need less of it, with their current values."""
    if spec.type == "ppo":
        ro, hp = spec.rollout, spec.ppo
        knobs = [
            f"lower rollout.batch_size (now {ro.batch_size}) and ppo.minibatch_size (now {hp.minibatch_size})",
            f"lower rollout.max_new_tokens (now {ro.max_new_tokens})",
        ]
    elif spec.type == "eval":
        knobs = [f"lower batch_size (now {spec.batch_size})", f"lower max_new_tokens (now {spec.max_new_tokens})"]
    else:
        t = spec.train
        knobs = [
            f"lower train.per_device_batch_size (now {t.per_device_batch_size}) and raise "
            f"train.gradient_accumulation_steps (now {t.gradient_accumulation_steps}) by the same factor (same batch)",
            f"lower train.max_length (now {t.max_length})",
        ]
    if spec.type != "eval" and not recipe.model.gradient_checkpointing:
        knobs.append("set model.gradient_checkpointing: true (recomputes activations in the backward pass)")
    if recipe.peft.method != "qlora":
        knobs.append(f"use peft.method: qlora (4-bit base weights; now {recipe.peft.method})")
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"ran out of memory ({first_line}). To fit: " + "; ".join(knobs) + "."


def _setup_logging(path: Path, main_process: bool = True) -> None:
    """Every process logs to its own file; only the main one to the console (the others: warnings and errors)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("alignlab")
    root.setLevel(logging.INFO)
    root.handlers = [h for h in root.handlers if not isinstance(h, logging.FileHandler)] + [handler]
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
        root.addHandler(logging.StreamHandler())
    for h in root.handlers:
        if type(h) is logging.StreamHandler:
            h.setLevel(logging.INFO if main_process else logging.WARNING)
