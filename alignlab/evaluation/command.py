"""`alignlab eval CHECKPOINT [...]`: evaluate checkpoints (run, stage, model or adapter folders, `base`, hub ids)
against a reference, with an eval stage's settings, outside a pipeline."""

from __future__ import annotations

import json
import re
from pathlib import Path

from alignlab.contract import OUTPUT_FILE, StageOutput, checkpoint_output, run_outputs
from alignlab.evaluation.evaluator import evaluate_models
from alignlab.evaluation.report import write_results
from alignlab.evaluation.stats import paired_difference
from alignlab.recipe import RecipeError


def run_cli(
    checkpoints: list[str],
    recipe_path: str | None = None,
    stage: str | None = None,
    reference: str | None = None,
    out: str | None = None,
    sets: list[str] | None = None,
) -> list[Path]:
    """`alignlab eval`: evaluate each checkpoint against the reference; returns the eval.md paths written.

    Settings are the keys of an eval stage (alignlab/stages/specs.py:EvalSpec): the recipe's eval stage (`stage`,
    else its first one), with `sets` (`key=value`, e.g. `num_prompts=50`, `dataset.path=data.jsonl`) applied on top;
    when the recipe has no eval stage, the held-out split of the built-in task its stages train on (with that task's
    reward), else `sets` must give at least `dataset.path` (default_eval_stage). The recipe is `recipe_path`, else
    the recipe.yaml of the run the first checkpoint belongs to, else a minimal one over the checkpoint's base.
    The reference is `reference` (base, a stage of that run, or any checkpoint form), else the stage's own.
    """
    from alignlab.recipe import apply_override, parse_recipe, read_yaml

    run_dir = _run_dir_of(Path(checkpoints[0]))
    source = Path(recipe_path) if recipe_path else (run_dir / "recipe.yaml" if run_dir else None)
    if source is not None:
        raw = read_yaml(source)[0]  # a clear error for a missing, non-UTF-8 or malformed file
    else:
        first = checkpoint_output(checkpoints[0])
        if first is None:
            raise RecipeError("'base' of which model? Pass --recipe (its model is the base)")
        raw = {"name": "eval", "model": {"name_or_path": first.base}, "stages": []}
    evals = [s for s in raw.get("stages", []) if s.get("type") == "eval" and stage in (None, s.get("name"))]
    if stage is not None and not evals:
        raise RecipeError(f"{source}: no eval stage named '{stage}'")
    stage_raw = dict(evals[0]) if evals else default_eval_stage(raw)
    for kv in sets or []:
        apply_override(stage_raw, kv)
    if "dataset" not in stage_raw:
        raise RecipeError(
            f"{source or 'the checkpoint'} has no eval stage and trains on no built-in task, so there are no prompts to "
            f"evaluate on: give them with --set dataset.path=PROMPTS.jsonl (a `prompt` column; add --set "
            f"reward_fn=module:function for a true reward), or pass --recipe with an eval stage."
        )
    raw["stages"] = [s for s in raw.get("stages", []) if s.get("type") != "eval"] + [stage_raw]
    recipe = parse_recipe(raw, source=source)
    spec = recipe.stages[-1]

    ref_name = reference or spec.reference
    written, results = [], []
    for ckpt in checkpoints:
        policy = checkpoint_output(ckpt)
        ckpt_run = _run_dir_of(Path(ckpt)) or run_dir
        ref = _resolve_ref(ref_name, ckpt_run)
        rm = _resolve_ref(spec.reward_model, ckpt_run) if spec.reward_model else None
        res = evaluate_models(recipe, spec, policy, ref, reward_model=rm)
        target = _out_dir(ckpt, policy, out, many=len(checkpoints) > 1)
        curves = _curves(ckpt_run) if ckpt_run else None
        written.append(write_results(res, target, curves)[1])
        results.append((target.name, res))
    if len(results) > 1:
        written.append(write_comparison(results, Path(out) if out else Path("eval-comparison")))
    return written


# Per-prompt numbers of the policy that two checkpoints evaluated on the same prompts can be paired on.
COMPARED = ("true_reward", "strict_accuracy", "mean_score", "repetition", "distinct_2", "response_length", "kl")


def compare(first: dict, other: dict) -> dict:
    """Paired differences other - first of the policy's per-prompt numbers (alignlab.evaluation.stats): the two
    evaluations must cover the same prompts in the same order (settings.prompts_sha256)."""
    if first["settings"].get("prompts_sha256") != other["settings"].get("prompts_sha256"):
        raise RecipeError(
            f"cannot pair {first['policy']} with {other['policy']}: they were evaluated on different prompts"
        )
    a, b = first["per_prompt"], other["per_prompt"]
    out = {"num_prompts": other["num_prompts"]}
    for key in COMPARED:
        if key in a and key in b:
            out[key] = paired_difference(b[key], a[key])
    return out


def write_comparison(results: list[tuple[str, dict]], out_dir: Path) -> Path:
    """comparison.json and comparison.md: every checkpoint after the first against the first, on the same
    prompts (paired differences with 95% intervals). Returns the .md path."""
    from alignlab.evaluation.report import finite

    (name0, first), rows = results[0], []
    table = {name: compare(first, res) for name, res in results[1:]}
    lines = [
        f"## Paired comparison with {name0} ({first['policy']})",
        "",
        f"{first['num_prompts']} prompts, the same for every checkpoint; each value is checkpoint - {name0}, "
        "averaged over prompts, with its 95% interval.",
        "",
        "| checkpoint | " + " | ".join(k for k in COMPARED if any(k in t for t in table.values())) + " |",
    ]
    keys = [k for k in COMPARED if any(k in t for t in table.values())]
    lines.append("|---|" + "---:|" * len(keys))
    for name, diffs in table.items():
        cells = [_diff_cell(diffs.get(k)) for k in keys]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += rows
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.json").write_text(json.dumps(finite({"baseline": name0, "against": table}), indent=2))
    (out_dir / "comparison.md").write_text("\n".join(lines) + "\n")
    return out_dir / "comparison.md"


def _diff_cell(d: dict | None) -> str:
    if d is None:
        return ""
    lo, hi = d["ci"]
    if lo is None or hi is None or lo != lo or hi != hi:  # nan: one prompt
        return f"{d['value']:+.4g}"
    return f"{d['value']:+.4g} [{lo:+.3g}, {hi:+.3g}]"


def default_eval_stage(raw: dict) -> dict:
    """Eval-stage settings for a recipe that has none: when its stages train on a built-in task (builtin:arith,
    builtin:constraints), that task's held-out `eval` prompts scored by its exact reward; else no dataset (the caller
    asks for --set dataset.path)."""
    from alignlab.builtin.tasks import BUILTIN_TASKS

    for spec in raw.get("stages", []):
        path = str((spec.get("dataset") or {}).get("path", "")) if isinstance(spec, dict) else ""
        task = BUILTIN_TASKS.get(path.removeprefix("builtin:")) if path.startswith("builtin:") else None
        if task is not None and task.reward is not None and "eval" in task.splits:
            return {"name": "eval", "type": "eval", "dataset": {"path": path, "split": "eval"}, "reward_fn": path}
    return {"name": "eval", "type": "eval"}


def _run_dir_of(path: Path) -> Path | None:
    """The run folder `path` is in (itself, or up to two levels up). A stage folder holds a recipe.yaml too (its
    latest attempt's), so a run folder is one with a recipe.yaml that is not a stage's (no started.json)."""
    for p in [path, *list(path.parents)[:2]]:
        if (p / "recipe.yaml").exists() and not (p / "started.json").exists() and not (p / OUTPUT_FILE).exists():
            return p
    return None


def _resolve_ref(name: str, run_dir: Path | None) -> StageOutput | None:
    if name == "base":
        return None
    if run_dir is not None and (run_dir / name / OUTPUT_FILE).exists():
        return StageOutput.load(run_dir / name)
    return checkpoint_output(name)


def _curves(run_dir: Path) -> dict[str, Path]:
    return {n: run_dir / n / "metrics.jsonl" for n, o in run_outputs(run_dir).items() if o.kind != "none"}


def _out_dir(ckpt: str, policy: StageOutput | None, out: str | None, many: bool) -> Path:
    """--out (a sub-folder per checkpoint when there are several); else <stage dir>/eval for a stage or run (its
    evaluated stage), <dir>-eval beside a model or adapter folder, ./eval-<name> for base or a hub id."""
    p = Path(ckpt).expanduser()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", p.name if p.exists() else ckpt).strip("-") or "checkpoint"
    if out is not None:
        return Path(out) / name if many else Path(out)
    if (p / OUTPUT_FILE).exists():
        return p / "eval"
    if (p / "recipe.yaml").exists():
        return p / policy.stage / "eval"
    if p.exists():
        return p.with_name(p.name + "-eval")
    return Path(f"eval-{name}")
