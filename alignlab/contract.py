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
        f"The last good checkpoint is {last}: change the setting and run again with --resume to continue from it."
        if last
        else "No checkpoint was written before it (train.save_steps / save_steps keep some)."
    )
    return f"{kept} No final model or stage_output.json was written."


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
