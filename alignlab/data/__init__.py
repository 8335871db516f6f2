"""Data builders shared by the stages: one call gives a stage its train and eval datasets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignlab.data.formats import (
    CANONICAL_COLUMNS,
    DataError,
    canonicalize,
    flip_labels,
    load_raw,
    prompt_text,
    resolve_source,
)

if TYPE_CHECKING:
    from datasets import Dataset

    from alignlab.recipe import DatasetSpec, Recipe

__all__ = ["CANONICAL_COLUMNS", "DataError", "build_datasets", "check_dataset", "flip_labels", "prompt_text"]


def build_datasets(
    spec: DatasetSpec, recipe: Recipe | None, stage_type: str, chat: bool, *, with_eval: bool = True
) -> tuple[Dataset, Dataset | None]:
    """Train and (optional) eval datasets in canonical columns for a stage of `stage_type`.

    Eval data: `eval_path`/`eval_split` when given, builtin tasks' held-out split, else `eval_fraction` of the
    training rows (seeded). Label flips (`flip_rate`) touch the training rows only.
    """
    seed = spec.seed if spec.seed is not None else (recipe.seed if recipe else 0)
    where = _where(spec, recipe)
    train = canonicalize(load_raw(spec, recipe), spec, stage_type, where, chat)
    eval_ds = None
    if with_eval:
        if spec.eval_path or spec.eval_split or resolve_source(spec.path, recipe).kind == "builtin":
            eval_ds = canonicalize(load_raw(spec, recipe, held_out=True), spec, stage_type, where + " (eval)", chat)
        elif spec.eval_fraction > 0:
            parts = train.train_test_split(test_size=spec.eval_fraction, seed=seed)
            train, eval_ds = parts["train"], parts["test"]
    if spec.max_samples:
        train = train.select(range(min(spec.max_samples, len(train))))
    if eval_ds is not None and spec.eval_max_samples:
        eval_ds = eval_ds.select(range(min(spec.eval_max_samples, len(eval_ds))))
    if spec.flip_rate > 0:
        if "chosen" not in train.column_names:
            raise DataError(f"{where}: flip_rate applies to preference data (chosen/rejected), not to this dataset")
        train, _ = flip_labels(train, spec.flip_rate, seed)
    return train, eval_ds


def check_dataset(spec: DatasetSpec, recipe: Recipe | None, stage_type: str) -> str | None:
    """Check a dataset without any model: source exists, columns fit the stage, rows well formed.
    Returns a note for what cannot be checked offline (hub ids), None when fully checked; raises DataError."""
    src = resolve_source(spec.path, recipe)
    if src.kind == "hub":
        return f"dataset '{spec.path}' is a hub id: not checked offline"
    canonicalize(load_raw(spec, recipe), spec, stage_type, _where(spec, recipe), chat=False)
    if spec.eval_path:
        if resolve_source(spec.eval_path, recipe).kind == "hub":
            return f"eval dataset '{spec.eval_path}' is a hub id: not checked offline"
        canonicalize(load_raw(spec, recipe, held_out=True), spec, stage_type, f"{spec.eval_path} (eval)", False)
    return None


def _where(spec: DatasetSpec, recipe: Recipe | None) -> str:
    src = resolve_source(spec.path, recipe)
    return src.location if src.kind == "local" else spec.path
