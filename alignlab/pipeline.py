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
  logs/run.<rank>.log       everything the console showed and more (alignlab/console.py)
"""

from __future__ import annotations

import logging
import time

from alignlab import console
from alignlab.contract import StageContext, StageFailed, StageOutput
from alignlab.data import data_taken
from alignlab.freshness import plan_run, start_stage
from alignlab.recipe import Recipe, RecipeError, StageSpec
from alignlab.runlock import from_main, run_lock
from alignlab.stages.registry import check_chain, input_stage_name, stage_record

log = logging.getLogger("alignlab")


def run_pipeline(recipe: Recipe, only: str | None = None, resume: bool = False, force: bool = False):
    import torch
    from accelerate import PartialState

    check_chain(recipe)
    if only is not None:
        recipe.stage(only)  # raises with the list of stage names
    # On CPU, `accelerate launch --multi_gpu` needs the gloo backend chosen before anything else builds the state.
    state = PartialState(cpu=not torch.cuda.is_available())
    with run_lock(recipe.run_dir, state):  # one run per folder (alignlab/runlock.py)
        try:
            return _run_stages(recipe, state, only, resume, force)
        except BaseException as e:  # the error that stopped the run, with its traceback, into logs/run.<rank>.log
            log.error("run stopped: %s: %s", type(e).__name__, e, exc_info=True, extra=console.FILE_ONLY)
            raise


def _run_stages(recipe: Recipe, state, only: str | None, resume: bool, force: bool) -> dict[str, StageOutput]:
    from transformers import set_seed

    run_dir = recipe.run_dir
    if state.is_main_process:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    console.setup(run_dir / "logs" / f"run.{state.process_index}.log", state.is_main_process)
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
        started = time.perf_counter()
        origin, resumes = from_main(state, start_stage, recipe, i, outputs, resume, force)
        ctx = StageContext(recipe, spec, stage_dir, outputs.get(src_name) if src_name else None, dict(outputs), resumes)
        # Every stage starts from the recipe's seed (fresh LoRA weights, score heads), on every process alike, so
        # its result does not depend on which stages ran before it in this process (--stage, a rerun, --resume).
        set_seed(recipe.seed)
        try:
            with data_taken(spec) as taken:
                out = stage_record(spec.type).run(ctx)
        except StageFailed as e:
            raise type(e)(f"stage '{spec.name}' ({spec.type}): {e}") from e
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(e):
                raise
            raise StageFailed(f"stage '{spec.name}' ({spec.type}) {out_of_memory_message(recipe, spec, e)}") from e
        if state.is_main_process:
            out.origin = origin
            out.data, out.seconds, out.versions = taken, round(time.perf_counter() - started, 1), library_versions()
            out.save(stage_dir)
        state.wait_for_everyone()
        outputs[spec.name] = out
        log.info("stage %s: finished in %s", spec.name, console.duration(time.perf_counter() - started))
    return outputs


LIBRARIES = ("alignlab", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")


def library_versions() -> dict[str, str]:
    """The installed versions of the libraries a stage's result depends on (those installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def is_out_of_memory(e: BaseException) -> bool:
    import torch

    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError | MemoryError) or "out of memory" in text or "can't allocate" in text


def out_of_memory_message(recipe: Recipe, spec: StageSpec, e: BaseException) -> str:
    """What ran out of memory, and the recipe settings that need less of it, with their current values."""
    record = stage_record(spec.type)
    knobs = record.memory_knobs(spec)
    if record.writes_model and not recipe.model.gradient_checkpointing:
        knobs.append("set model.gradient_checkpointing: true (recomputes activations in the backward pass)")
    if recipe.peft.method != "qlora":
        knobs.append(f"use peft.method: qlora (4-bit base weights; now {recipe.peft.method})")
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"ran out of memory ({first_line}). To fit: " + "; ".join(knobs) + "."
