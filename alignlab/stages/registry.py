"""Stage types: one record each, holding everything the rest of alignlab knows about a type of stage.

A record names the type's recipe keys (its spec class), the module that runs it, the data formats it reads, the
TRL config its `train.extra` keys are checked against, whether it writes a model, which earlier stages its keys
may name, and the settings that lower its memory. The pipeline, the validator, the data layer and the error
messages read these records and never branch on a type's name, so a new stage type is one runner module plus
one registration (`@stage_type(...)` on its spec class in alignlab/stages/specs.py).

Torch-free on purpose (pydantic and the standard library only): `alignlab validate` reads it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from alignlab.schema import RecipeError, StageSpec

if TYPE_CHECKING:
    from alignlab.recipe import Recipe


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
    # spec attribute that may name an earlier stage -> the type that stage must have (None: any model-writing stage)
    references: dict[str, str | None] = field(default_factory=dict)
    memory_knobs: Callable[[Any], list[str]] = lambda spec: []  # "lower X (now N)" advice for out-of-memory errors
    check: Callable[[Recipe, int], str | None] | None = None  # a type-specific recipe check (validate)
    # why the stage cannot run under DeepSpeed (alignlab's own loops: they shard themselves under FSDP, parallel.py)
    not_under_deepspeed: str | None = None

    def run(self, ctx):
        return importlib.import_module(self.runner).run(ctx)

    @property
    def formats(self) -> tuple[str, ...]:
        """The formats of the stage's main `dataset`."""
        return self.datasets.get("dataset", ())


STAGE_TYPES: dict[str, StageType] = {}


def stage_type(name: str, **record: Any) -> Callable[[type[StageSpec]], type[StageSpec]]:
    """Register the decorated spec class as stage type `name`, with the rest of its record."""

    def deco(cls: type[StageSpec]) -> type[StageSpec]:
        STAGE_TYPES[name] = StageType(name=name, spec=cls, **record)
        return cls

    return deco


def stage_record(name: str) -> StageType:
    """The record of stage type `name`. The types register when alignlab.stages.specs is imported, which importing
    alignlab.recipe (hence any Recipe) does."""
    if name not in STAGE_TYPES:
        raise RecipeError(f"unknown stage type '{name}'; known types: {', '.join(sorted(STAGE_TYPES))}")
    return STAGE_TYPES[name]


# --------------------------------------------------------------------------------------------- the stage chain


def input_stage_name(recipe: Recipe, index: int) -> str | None:
    """Name of the stage whose model stage `index` starts from, or None for the base model."""
    spec = recipe.stages[index]
    if spec.input == "base":
        return None
    if spec.input == "previous":
        for prev in reversed(recipe.stages[:index]):
            if stage_record(prev.type).writes_model:
                return prev.name
        return None
    return spec.input


def stage_references(spec: StageSpec) -> dict[str, str]:
    """The earlier stages a stage's keys name: {"input": ..., "reward_model": ..., ...} (set keys only)."""
    refs = {"input": spec.input} if spec.input not in ("previous", "base") else {}
    for key in stage_record(spec.type).references:
        value = getattr(spec, key, None)
        if value is not None and value != "base":
            refs[key] = value
    return refs


STAGE_DATA = "stage:"  # a dataset path `stage:NAME`: the data an earlier stage NAME wrote (alignlab/data)


def dataset_stage_refs(spec: StageSpec) -> dict[str, str]:
    """{"dataset": NAME, "dataset.eval_path": NAME, "dataset.mix[1]": NAME, ...}: the stage's datasets (a
    mixture's sources) read from an earlier stage's data (`path` or `eval_path` = stage:NAME)."""
    out = {}
    for key in stage_record(spec.type).datasets:
        ds = getattr(spec, key, None)
        for name, source in ds.named_sources(key) if ds is not None else []:
            for attr, suffix in (("path", ""), ("eval_path", ".eval_path")):
                value = getattr(source, attr, None)
                if isinstance(value, str) and value.startswith(STAGE_DATA):
                    out[name + suffix] = value[len(STAGE_DATA) :]
    return out


def check_chain(recipe: Recipe) -> None:
    """Every stage reference points at an EARLIER stage of a fitting type; every `stage:NAME` dataset at an earlier
    stage that writes data in a format the reading stage accepts."""
    names = {s.name for s in recipe.stages}
    seen: dict[str, str] = {}
    specs: dict[str, StageSpec] = {}
    for i, spec in enumerate(recipe.stages):
        _check_data_refs(spec, i, names, specs)
        specs[spec.name] = spec
        record = stage_record(spec.type)
        for key, ref in stage_references(spec).items():
            wanted = record.references.get(key)
            if wanted is not None and ref not in names:
                continue  # e.g. a reward_model that is no stage name is a path, checked by the validator
            if ref not in seen:
                why = "comes later in the recipe" if ref in names else "is not a stage of this recipe"
                raise RecipeError(
                    f"stages[{i}] ({spec.name}).{key} = '{ref}', which {why}. Stages can only start from earlier "
                    f"stages: {', '.join(seen) or '(none before it)'}; or 'base' for the base model."
                )
            if wanted is not None and seen[ref] != wanted:
                raise RecipeError(
                    f"stages[{i}] ({spec.name}).{key} = '{ref}' is {_a(seen[ref])} stage, not {_a(wanted)} stage"
                )
            if wanted is None and not stage_record(seen[ref]).writes_model:
                raise RecipeError(
                    f"stages[{i}] ({spec.name}).{key} = '{ref}' is {_a(seen[ref])} stage, which writes no model"
                )
        seen[spec.name] = spec.type


def _check_data_refs(spec: StageSpec, index: int, names: set[str], earlier: dict[str, StageSpec]) -> None:
    record = stage_record(spec.type)
    writers = sorted(t for t, r in STAGE_TYPES.items() if r.writes_data)
    for key, ref in dataset_stage_refs(spec).items():
        where = f"stages[{index}] ({spec.name}).{key if key.endswith('eval_path') else key + '.path'}"
        source = earlier.get(ref)
        if source is None:
            why = "comes later in the recipe" if ref in names else "is not a stage of this recipe"
            data_stages = [n for n, s in earlier.items() if stage_record(s.type).writes_data]
            raise RecipeError(
                f"{where} = '{STAGE_DATA}{ref}', but stage '{ref}' {why}. A '{STAGE_DATA}NAME' dataset is the data an "
                f"EARLIER stage wrote ({' or '.join(writers)} stages): {', '.join(data_stages) or 'none before it'}."
            )
        writes = stage_record(source.type).writes_data
        if writes is None:
            raise RecipeError(
                f"{where} = '{STAGE_DATA}{ref}', but '{ref}' is {_a(source.type)} stage, which writes no dataset; "
                f"'{STAGE_DATA}NAME' reads the data of {' or '.join(_a(w) for w in writers)} stage"
            )
        fmt = writes(source)
        accepted = record.datasets[key.split(".")[0]]
        if fmt not in accepted:
            raise RecipeError(
                f"{where} = '{STAGE_DATA}{ref}': stage '{ref}' writes {fmt} data, which {_a(spec.type)} stage's "
                f"{key.split('.')[0]} cannot read (it reads {' or '.join(accepted)})"
            )


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" or word == "sft" else f"a {word}"  # "an sft": ess-eff-tee
