"""No stale results: a finished stage is reused only while the recipe still describes what it was trained with.

Every stage attempt records what it is made from (alignlab/fingerprint.py) in `<stage>/started.json` when it starts,
with the recipe in `<stage>/recipe.yaml`; the finished stage's stage_output.json carries the same record
(`origin`). On a rerun:
- a finished stage whose record still matches is reused ("already finished; skipping");
- one whose settings, data, reward function or input stage changed stops the run before anything trains, with
  a message listing each change (`key: old -> new`) and the ways on: retrain (--force), or restore the setting.
  The stages after a retrained stage are stale too: their record names the attempt of the stage they started from;
- `--force` starts the stages it runs over: their folder is emptied first (old model, checkpoints, cached
  reference log-probs), so nothing of the earlier attempt is reused or reported;
- `--resume` continues from checkpoints only when they were made with the same record: a resumed Trainer
  restores the learning-rate schedule (and PPO its KL controller) from the checkpoint, so a changed setting would
  not even take effect everywhere, while the record would claim it. An attempt that starts over deletes the
  earlier attempt's checkpoints (a later --resume would otherwise pick them up).
- the run folder's recipe.yaml is written only when a stage starts, and describes each finished stage by the
  recipe it was trained with.
Under `accelerate launch` the main process decides and tells the others (runlock.from_main).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignlab.contract import StageOutput
from alignlab.fingerprint import changes, fingerprint, new_attempt, stage_parts
from alignlab.recipe import Recipe, RecipeError

log = logging.getLogger("alignlab")
STARTED_FILE = "started.json"
RECIPE_FILE = "recipe.yaml"
NO_RECORD = "no record of the settings it was trained with (made by an older alignlab)"


class StaleStage(RecipeError):
    """A finished stage or a checkpoint no longer matches the recipe; the message lists what changed."""


@dataclass
class Plan:
    reuse: dict[str, StageOutput] = field(default_factory=dict)  # finished stages that still fit the recipe
    run: list[str] = field(default_factory=list)  # stages this run trains, in recipe order
    stale: dict[str, list[str]] = field(default_factory=dict)  # finished, out of this run's scope, no longer fit


def plan_run(recipe: Recipe, only: str | None, force: bool) -> Plan:
    """Which stages to reuse and which to run; raises StaleStage when a stage the run would reuse (or start from)
    no longer fits the recipe. `only`: --stage (the others are only read, as its inputs)."""
    plan, problems, records = Plan(), [], {}
    needed = _dependencies(recipe, only) if only else set()
    for i, spec in enumerate(recipe.stages):
        in_scope = only is None or spec.name == only
        done = records[spec.name] = StageOutput.load(recipe.run_dir / spec.name)
        if in_scope and (force or done is None):
            plan.run.append(spec.name)
            continue
        if done is None:
            continue
        why = _why_stale(recipe, i, done, records, plan.run)
        if not why:
            plan.reuse[spec.name] = done
        elif in_scope or spec.name in needed:
            problems.append((spec.name, why))
        else:
            plan.stale[spec.name] = why
            log.warning(
                "stage %s (not run now) no longer fits the recipe: %s. Retrain it: --stage %s --force",
                spec.name,
                "; ".join(why),
                spec.name,
            )
    if problems:
        raise StaleStage(_stale_message(recipe, problems))
    return plan


def start_stage(recipe: Recipe, index: int, outputs: dict[str, StageOutput], resume: bool, force: bool):
    """Record the attempt a stage is about to make; returns (its origin record, whether to resume from its
    checkpoints). Raises StaleStage when --resume meets checkpoints made with other settings."""
    spec = recipe.stages[index]
    stage_dir = recipe.run_dir / spec.name
    parts = stage_parts(recipe, spec, _refs(recipe, index, outputs))
    started = _read_json(stage_dir / STARTED_FILE)
    ckpts = stage_dir / "checkpoints"
    has_ckpts = ckpts.is_dir() and any(not p.name.startswith(".") for p in ckpts.iterdir())
    origin = {"fingerprint": fingerprint(parts), "parts": parts, "attempt": new_attempt()}
    if force and stage_dir.exists():
        log.info("stage %s: --force: starting over (removing what %s held)", spec.name, stage_dir)
        shutil.rmtree(stage_dir)
    elif resume and has_ckpts:
        if started is None:
            raise StaleStage(
                f"stage '{spec.name}': its checkpoints in {ckpts} have {NO_RECORD}, so --resume cannot tell "
                f"whether they fit the recipe. Run without --resume to start the stage over (they are deleted)."
            )
        diff = changes(started["parts"], parts)
        if diff:
            raise StaleStage(
                f"stage '{spec.name}': its checkpoints in {ckpts} were made with other settings than the recipe "
                f"now has:\n    " + "\n    ".join(diff) + "\nEither restore those settings and run with --resume "
                "again, or run without --resume to start the stage over with the new ones (its checkpoints are "
                "deleted). A checkpoint cannot take new settings: it restores the learning-rate schedule and the "
                "data order it was made with."
            )
        origin["attempt"] = started["attempt"]
    elif ckpts.exists():
        if has_ckpts:
            log.warning("stage %s: starting over; deleting the checkpoints of an earlier attempt: %s", spec.name, ckpts)
        shutil.rmtree(ckpts)
    resume = resume and has_ckpts and not force
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "stage_output.json").unlink(missing_ok=True)  # replaced only when this attempt finishes
    (stage_dir / RECIPE_FILE).write_text(_recipe_yaml(recipe))
    _write_json(stage_dir / STARTED_FILE, origin)
    write_run_recipe(recipe, spec.name)
    return origin, resume


def write_run_recipe(recipe: Recipe, running: str) -> None:
    """The run folder's recipe.yaml: the recipe, with each finished stage other than `running` as it was trained
    (its own recipe.yaml), so the file describes what the folder holds at every moment of a run."""
    raw = yaml.safe_load(_recipe_yaml(recipe))
    for i, spec in enumerate(recipe.stages):
        recorded = recipe.run_dir / spec.name / RECIPE_FILE
        if spec.name == running or StageOutput.load(recipe.run_dir / spec.name) is None or not recorded.exists():
            continue
        stages = (yaml.safe_load(recorded.read_text()) or {}).get("stages", [])
        raw["stages"][i] = next((s for s in stages if s.get("name") == spec.name), raw["stages"][i])
    header = "# What this run folder's stages were trained with (each stage's own recipe: <stage>/recipe.yaml)\n"
    (recipe.run_dir / RECIPE_FILE).write_text(header + yaml.safe_dump(raw, sort_keys=False))


# ------------------------------------------------------------------------------------------------ helpers


def stage_references(recipe: Recipe, index: int) -> dict[str, str | None]:
    """The input and the other stage references of stage `index` (its record's `references`: reward_model,
    reference, ...) that name an earlier stage (None: the base model), and the stages whose data its `stage:NAME`
    datasets read (`dataset.from_stage`)."""
    from alignlab.stages.registry import dataset_stage_refs, input_stage_name, stage_record

    spec, names = recipe.stages[index], {s.name for s in recipe.stages}
    refs = {"input": input_stage_name(recipe, index)}
    for key in stage_record(spec.type).references:
        value = getattr(spec, key, None)
        if value == "base" or value in names:
            refs[key] = None if value == "base" else value
    for key, name in dataset_stage_refs(spec).items():  # data written by an earlier stage (stage:NAME)
        if name in names:
            refs[f"{key}.from_stage"] = name
    return refs


def _refs(recipe: Recipe, index: int, records: dict[str, StageOutput | None]) -> dict:
    """stage_references with each stage's record origin (None: not finished)."""
    out = {}
    for key, name in stage_references(recipe, index).items():
        record = records.get(name) if name else None
        out[key] = None if name is None else (name, record.origin if record is not None else None)
    return out


def _why_stale(recipe: Recipe, index: int, done: StageOutput, records: dict, runs: list[str]) -> list[str]:
    refs = stage_references(recipe, index)
    rerun = [f"{k}: stage '{n}' is trained again in this run" for k, n in refs.items() if n in runs]
    if rerun:
        return rerun
    if not done.origin:
        return [NO_RECORD]
    return changes(done.origin["parts"], stage_parts(recipe, recipe.stages[index], _refs(recipe, index, records)))


def _dependencies(recipe: Recipe, name: str) -> set[str]:
    """The stages `name` reads, directly or through others."""
    index = {s.name: i for i, s in enumerate(recipe.stages)}
    todo, seen = [name], set()
    while todo:
        for ref in stage_references(recipe, index[todo.pop()]).values():
            if ref is not None and ref not in seen:
                seen.add(ref)
                todo.append(ref)
    return seen


def _stale_message(recipe: Recipe, problems: list[tuple[str, list[str]]]) -> str:
    lines = [
        f"{recipe.run_dir}: finished stages were trained with other settings than the recipe now has, so their "
        f"results are not reused:"
    ]
    for name, why in problems:
        lines.append(f"  stage '{name}' ({recipe.run_dir / name}):")
        lines += [f"    {w}" for w in why]
    first = problems[0][0]
    lines += [
        "To go on, either",
        f"  - retrain: add --force (retrains every stage of the recipe), or --stage {first} --force (that stage only; "
        f"the stages that start from it are then stale in turn); or",
        f"  - restore the settings above ({recipe.run_dir}/<stage>/{RECIPE_FILE} holds the recipe each stage was "
        f"trained with).",
    ]
    return "\n".join(lines)


def _recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json", serialize_as_any=True), sort_keys=False)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
