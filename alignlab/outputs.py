"""What a stage leaves behind, recorded in `<run_dir>/<stage>/stage_output.json`.

The next stage asks for this record instead of guessing paths: that is what makes the SFT-LoRA -> DPO-LoRA
and SFT -> reward -> PPO hand-offs right by construction. The record is written last, atomically, so its
presence means the stage finished and its model is complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

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

    def save(self, stage_dir: Path) -> None:
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = stage_dir / (OUTPUT_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, default=float))
        os.replace(tmp, stage_dir / OUTPUT_FILE)

    @classmethod
    def load(cls, stage_dir: Path) -> StageOutput | None:
        f = stage_dir / OUTPUT_FILE
        return cls(**json.loads(f.read_text())) if f.exists() else None


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
