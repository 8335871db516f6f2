"""What alignlab knows about a type of stage: its record (StageType), and what a record's fields use.

A record names the type's recipe keys (its spec class), the module that runs it, the data formats it reads, the
TRL config its `train.extra` keys are checked against, whether it writes a model, which earlier stages its keys
may name, and the settings that lower its memory. The pipeline, the validator, the data layer and the error
messages read these records and never branch on a type's name. The records themselves are registered in one place,
the catalogue alignlab/stages/types.py; alignlab/stages/registry.py finds them and follows the stage chain.

Torch-free on purpose (the standard library only): `alignlab validate` reads it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from alignlab.recipe import Recipe
    from alignlab.schema import StageSpec


@dataclass(frozen=True)
class Workload:
    """What one process of a stage computes at once, for `alignlab plan` (alignlab/plan.py)."""

    rows: int  # rows per forward and backward of training (0: the stage trains nothing)
    length: int  # tokens per row
    sampled: int = 0  # rows sampled at once (their KV cache)
    scored: int | None = None  # tokens per row whose logits the loss keeps (None: every token)
    reference: bool = False  # a frozen reference forward: a copy of the weights unless LoRA shares the backbone

    @property
    def trains(self) -> bool:
        return self.rows > 0


@dataclass(frozen=True)
class StageType:
    name: str
    spec: type[StageSpec]
    runner: str  # module whose `run(ctx: StageContext) -> StageOutput` runs the stage
    # spec attribute holding a DatasetSpec -> the data formats it accepts, preferred first when auto-detecting
    datasets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    trl_config: str | None = None  # TRL config class (trl.<name>) whose fields train.extra may set
    writes_model: bool = True  # False: the stage measures (eval) or writes data (generate), and hands no model on
    # the data format of the dataset the stage writes (read later as `dataset: {path: "stage:NAME"}`); None: none
    writes_data: Callable[[Any], str] | None = None
    # spec attribute that may name an earlier stage -> the type that stage must have (None: any model-writing stage;
    # MODEL_OR_PATH: any model-writing stage, or a model folder / hub id when no stage has that name)
    references: dict[str, str | None] = field(default_factory=dict)
    memory_knobs: Callable[[Any], list[str]] = lambda spec: []  # "lower X (now N)" advice for out-of-memory errors
    check: Callable[[Recipe, int], str | None] | None = None  # a type-specific recipe check (validate)
    # why the stage cannot run under DeepSpeed (alignlab's own loops: they shard themselves under FSDP, parallel.py)
    not_under_deepspeed: str | None = None
    # the stage's keys that change how it logs, checkpoints or shows its work and never its result (its fingerprint
    # leaves them out: alignlab/fingerprint.py); a function of the spec, as a key may matter only with another set
    log_only: Callable[[Any], frozenset[str]] = lambda spec: LOGGING_KEYS
    # (spec, prompt length) -> what one process computes at once (alignlab plan's memory estimate)
    workload: Callable[[Any, int], Workload] = lambda spec, prompt_length: Workload(0, prompt_length)

    def run(self, ctx):
        return importlib.import_module(self.runner).run(ctx)

    @property
    def formats(self) -> tuple[str, ...]:
        """The formats of the stage's main `dataset`."""
        return self.datasets.get("dataset", ())


MODEL_OR_PATH = "model or path"  # a `references` value: see StageType.references

# `train:` keys that only say how often metrics are written and checkpoints kept, and where metrics go
LOGGING_KEYS = frozenset({"train.logging_steps", "train.report_to", "train.save_steps", "train.save_total_limit"})
