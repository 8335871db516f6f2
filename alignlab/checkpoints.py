"""Checkpoints, in one place for every stage: which checkpoint folders are complete, the newest one, rotation.

Both writers put a checkpoint together under a temporary name and rename it into place once every process has
written its part: GuardedTrainer (alignlab/stages/trl_glue.py, TRL trainers: `checkpoint-N`, Trainer's layout) and
alignlab's RL loops (alignlab/rl/: `step-N`, with a COMPLETE marker written last). A folder counts as complete when
it carries the marker, or, for a Trainer checkpoint, a readable trainer_state.json (Trainer writes it last), so a
checkpoint written in place by another tool and cut off is ignored too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

COMPLETE_MARKER = "COMPLETE"


def step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def is_complete(path: Path) -> bool:
    if (path / COMPLETE_MARKER).exists():
        return True
    try:
        json.loads((path / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def complete_checkpoints(ckpt_dir: Path, prefix: str = "checkpoint") -> list[Path]:
    """The complete `<prefix>-N` folders in `ckpt_dir`, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob(f"{prefix}-*") if p.name.rsplit("-", 1)[-1].isdigit() and is_complete(p)]
    return sorted(found, key=step_of)


def last_checkpoint(ckpt_dir: Path, prefix: str = "checkpoint") -> Path | None:
    """The newest complete checkpoint (a cut-off write is never picked), or None."""
    done = complete_checkpoints(ckpt_dir, prefix)
    return done[-1] if done else None


def prune_checkpoints(ckpt_dir: Path, limit: int | None, prefix: str) -> None:
    """Keep the newest `limit` complete checkpoints (None: all)."""
    done = complete_checkpoints(ckpt_dir, prefix)
    for old in done[:-limit] if limit else []:
        shutil.rmtree(old, ignore_errors=True)
