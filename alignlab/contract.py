"""The stage contract: what a stage is given (StageContext), what it leaves behind (StageOutput, recorded in
`<run_dir>/<stage>/stage_output.json`) and how it stops with a diagnosis (StageFailed, TrainingDiverged).

It sits below the pipeline that drives stages and below the stages themselves, so both import it and neither
imports the other. The next stage asks for the output record instead of guessing paths: that is what makes the
SFT-LoRA -> DPO-LoRA and SFT -> reward -> PPO hand-offs right by construction. The record is written last,
atomically, so its presence means the stage finished and its model is complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from alignlab.schema import RecipeError

if TYPE_CHECKING:
    from alignlab.recipe import Recipe, StageSpec

OUTPUT_FILE = "stage_output.json"
Kind = Literal["adapter", "full", "none"]


@dataclass
class StageOutput:
    stage: str
    type: str
    path: str  # the model or adapter directory ("" for stages that write no model, e.g. eval)
    kind: Kind  # adapter: PEFT adapter over `base`; full: complete weights; none: no model
    base: str  # the base model directory or id the adapter applies to (resolved, e.g. builtin -> path)
    head: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    merged_path: str | None = None
    metrics: dict = field(default_factory=dict)
    origin: dict = field(default_factory=dict)  # what it was made from (alignlab/freshness.py); {}: not recorded
    parallel: dict = field(default_factory=dict)  # {shard, world_size, params_per_rank} (alignlab/parallel.py)
    # What the pipeline measured around the stage (absent from records of older versions): the rows each of its
    # datasets gave ([{key, path, split, source, rows, eval_rows, flipped}], alignlab/data), its wall-clock
    # seconds, and the versions of the libraries it ran with. `alignlab export` writes the model card from these.
    data: list = field(default_factory=list)
    seconds: float | None = None
    versions: dict = field(default_factory=dict)

    def save(self, stage_dir: Path) -> None:
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = stage_dir / (OUTPUT_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, default=float))
        os.replace(tmp, stage_dir / OUTPUT_FILE)

    @classmethod
    def load(cls, stage_dir: Path) -> StageOutput | None:
        f = stage_dir / OUTPUT_FILE
        return cls(**json.loads(f.read_text())) if f.exists() else None


@dataclass
class StageContext:
    """Everything a stage's `run(ctx)` is given."""

    recipe: Recipe
    spec: StageSpec
    stage_dir: Path
    input: StageOutput | None  # the model this stage starts from; None = the recipe's base model
    outputs: dict[str, StageOutput] = field(default_factory=dict)  # every earlier stage's output, by name
    resume: bool = False


class StageFailed(RuntimeError):
    """A stage stopped with a diagnosis for the user (training diverged, out of memory); the CLI prints it."""


class TrainingDiverged(StageFailed):
    """A nan or inf loss: the stage stops before the value reaches the weights, keeping the last good checkpoint."""


def checkpoint_note(last: str | Path | None) -> str:
    kept = (
        f"The last good checkpoint is {last}: run again with --resume to continue from it with the same settings, "
        f"or change the setting and run again without --resume to start the stage over."
        if last
        else "No checkpoint was written before it (train.save_steps keeps some)."
    )
    return f"{kept} No final model or stage_output.json was written."


def append_final_metrics(stage_dir: Path, step: int, metrics: dict) -> None:
    """The last line of <stage>/metrics.jsonl: the stage's final metrics, marked `"final": true`."""
    with (Path(stage_dir) / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, "final": True, **metrics}, default=float) + "\n")


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric rows after `step` (a fresh run: all of them), so a resumed run's file reads like an
    uninterrupted run's."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by a kill
            pass
    kept = [r for r in rows if r.get("step", 0) <= step and not r.get("final")] if step > 0 else []
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


# ------------------------------------------------------------------------------------- stage outputs on disk


def checkpoint_output(path: str | Path) -> StageOutput | None:
    """What a checkpoint argument points at, as a StageOutput:

    `base` -> None (the recipe's base model); a stage directory (holding stage_output.json) -> that record; a run
    directory (holding recipe.yaml) -> its last finished stage with a model; an adapter directory
    (adapter_config.json) -> the adapter over its base_model_name_or_path; a model directory (config.json),
    builtin:NAME or a .gguf file (converted once, alignlab/gguf.py) -> full weights. Anything else that is not a
    local path is taken as a hub id (full weights).
    """
    from alignlab.builtin import resolve_model_name

    text = str(path)
    if text == "base":
        return None
    if text.startswith("builtin:") or text.lower().endswith(".gguf"):
        text = resolve_model_name(text)
    p = Path(text).expanduser()
    if (p / OUTPUT_FILE).exists():
        out = StageOutput.load(p)
        if out.kind == "none":
            raise RecipeError(f"{p} is the output of a {out.type} stage, which writes no model")
        return out
    if (p / "recipe.yaml").exists():
        done = [o for o in run_outputs(p).values() if o.kind != "none"]
        if not done:
            raise RecipeError(f"run directory {p} has no finished stage with a model (no */{OUTPUT_FILE})")
        return done[-1]
    if (p / "adapter_config.json").exists():
        cfg = json.loads((p / "adapter_config.json").read_text())
        head = "sequence_classification" if cfg.get("task_type") == "SEQ_CLS" else "causal_lm"
        return StageOutput(p.name, "adapter", str(p), "adapter", cfg["base_model_name_or_path"], head=head)
    if (p / "config.json").exists():
        return StageOutput(p.name, "model", str(p), "full", str(p))
    if p.exists() or text.startswith((".", "/", "~")):
        raise RecipeError(
            f"checkpoint {p}: not a run directory (recipe.yaml), stage directory ({OUTPUT_FILE}), adapter "
            f"(adapter_config.json) or model directory (config.json)"
        )
    return StageOutput(text, "model", text, "full", text)  # a hub id


def run_outputs(run_dir: Path) -> dict[str, StageOutput]:
    """The finished stages of a run directory, in recipe order."""
    import yaml

    raw = yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text()) or {}
    names = [s.get("name") or s.get("type") for s in raw.get("stages", [])]
    found = {n: StageOutput.load(Path(run_dir) / n) for n in names}
    return {n: o for n, o in found.items() if o is not None}
