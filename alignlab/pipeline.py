"""Pipeline: runs a recipe's stages in order in one run directory, handing each stage the output of the one
it starts from, and skipping stages that already finished (unless forced).

run_dir/
  recipe.yaml              the resolved recipe (after overrides)
  <stage>/stage_output.json  what the stage left (written last: its presence = the stage finished)
  <stage>/model/           adapter or full weights (safetensors), tokenizer
  <stage>/metrics.jsonl    one JSON object per logging step
  logs/run.log
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignlab.outputs import StageOutput
from alignlab.recipe import Recipe, RecipeError, StageSpec

log = logging.getLogger("alignlab")


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

    from alignlab.stages import stage_runner

    check_chain(recipe)
    # On CPU, `accelerate launch --multi_gpu` needs the gloo backend chosen before anything else builds the state.
    state = PartialState(cpu=not torch.cuda.is_available())
    run_dir = recipe.run_dir
    if state.is_main_process:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json", serialize_as_any=True), sort_keys=False))
    state.wait_for_everyone()
    _setup_logging(run_dir / "logs" / f"run.{state.process_index}.log")
    if only is not None:
        recipe.stage(only)  # raises with the list of stage names

    outputs: dict[str, StageOutput] = {}
    for i, spec in enumerate(recipe.stages):
        stage_dir = run_dir / spec.name
        done = StageOutput.load(stage_dir)
        if only is not None and spec.name != only:
            if done:
                outputs[spec.name] = done
            continue
        if done and not force:
            log.info("stage %s: already finished (%s); skipping. Pass --force to run it again.", spec.name, stage_dir)
            outputs[spec.name] = done
            continue
        src_name = input_stage_name(recipe, i)
        if src_name is not None and src_name not in outputs:
            raise RecipeError(
                f"stage '{spec.name}' starts from stage '{src_name}', which has not finished in {run_dir}. "
                f"Run it first (alignlab run RECIPE --stage {src_name}) or run the whole recipe."
            )
        log.info("stage %s (%s): starting from %s", spec.name, spec.type, src_name or "the base model")
        ctx = StageContext(recipe, spec, stage_dir, outputs.get(src_name) if src_name else None, dict(outputs), resume)
        out = stage_runner(spec.type)(ctx)
        if state.is_main_process:
            out.save(stage_dir)
        state.wait_for_everyone()
        outputs[spec.name] = out
    return outputs


def _setup_logging(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("alignlab")
    root.setLevel(logging.INFO)
    root.handlers = [h for h in root.handlers if not isinstance(h, logging.FileHandler)] + [handler]
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
        root.addHandler(logging.StreamHandler())
