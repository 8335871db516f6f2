"""Finding a stage type's record (alignlab/stages/record.py says what a record holds; the catalogue
alignlab/stages/types.py registers them), and the stage chain: which earlier stages a stage's keys name, and the
checks that they exist, come earlier and have the right type. A new stage type is a spec class, one runner module
and one record in the catalogue; nothing else branches on a type's name.

Torch-free on purpose (pydantic and the standard library only): `alignlab validate` reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignlab.schema import RecipeError, StageSpec
from alignlab.stages.record import MODEL_OR_PATH, StageType
from alignlab.stages.types import STAGE_TYPES, input_stage_name

if TYPE_CHECKING:
    from alignlab.recipe import Recipe

__all__ = ["STAGE_DATA", "check_chain", "dataset_stage_refs", "input_stage_name", "stage_record", "stage_references"]


def stage_types() -> dict[str, StageType]:
    """Every stage type's record, by name (the catalogue, alignlab/stages/types.py)."""
    return STAGE_TYPES


def stage_record(name: str) -> StageType:
    """The record of stage type `name`."""
    types = stage_types()
    if name not in types:
        raise RecipeError(f"unknown stage type '{name}'; known types: {', '.join(sorted(types))}")
    return types[name]


# --------------------------------------------------------------------------------------------- the stage chain


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
                continue  # e.g. a reward_model or teacher that is no stage name is a path, checked by the validator
            if ref not in seen:
                why = "comes later in the recipe" if ref in names else "is not a stage of this recipe"
                raise RecipeError(
                    f"stages[{i}] ({spec.name}).{key} = '{ref}', which {why}. Stages can only start from earlier "
                    f"stages: {', '.join(seen) or '(none before it)'}; or 'base' for the base model."
                )
            any_model = wanted in (None, MODEL_OR_PATH)
            if not any_model and seen[ref] != wanted:
                raise RecipeError(
                    f"stages[{i}] ({spec.name}).{key} = '{ref}' is {_a(seen[ref])} stage, not {_a(wanted)} stage"
                )
            if any_model and not stage_record(seen[ref]).writes_model:
                raise RecipeError(
                    f"stages[{i}] ({spec.name}).{key} = '{ref}' is {_a(seen[ref])} stage, which writes no model"
                )
        seen[spec.name] = spec.type


def _check_data_refs(spec: StageSpec, index: int, names: set[str], earlier: dict[str, StageSpec]) -> None:
    record = stage_record(spec.type)
    writers = sorted(t for t, r in stage_types().items() if r.writes_data)
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
