"""Stage types: name -> the module that runs it. Each module has `run(ctx: StageContext) -> StageOutput` and
reads top to bottom: build inputs, build trainer, train, save, report. Imported only when the stage runs."""

from __future__ import annotations

import importlib
from collections.abc import Callable

STAGES: dict[str, str] = {
    "sft": "alignlab.stages.sft",
    "dpo": "alignlab.stages.dpo",
    "reward": "alignlab.stages.reward",
    "ppo": "alignlab.stages.ppo",
    "eval": "alignlab.stages.eval",
}


def stage_runner(type_name: str) -> Callable:
    return importlib.import_module(STAGES[type_name]).run
