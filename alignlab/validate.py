"""`alignlab validate`: everything that can be checked about a recipe without loading a model.

Schema and keys, stage chain, loss parameters, data files, columns and rows, reward functions, TRL
argument names, model paths. What needs the network (hub ids) is reported as not checked offline, not
as an error.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from alignlab.data import DataError, check_dataset
from alignlab.pipeline import check_chain
from alignlab.recipe import Recipe, RecipeError, load_recipe

TRL_CONFIGS = {"sft": "SFTConfig", "dpo": "DPOConfig", "reward": "RewardConfig"}


def validate_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, list[str]]:
    """Returns the recipe and notes (things not checked offline). Raises RecipeError listing every problem."""
    recipe = load_recipe(path, overrides)
    check_chain(recipe)
    problems: list[str] = []
    notes: list[str] = []
    model_note = check_model_source(recipe.model.name_or_path, recipe)
    if model_note:
        notes.append(model_note)
    if recipe.peft.quantized and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("peft.method: qlora needs bitsandbytes, which is not installed (pip install bitsandbytes)")
    stage_names = {s.name for s in recipe.stages}
    for i, spec in enumerate(recipe.stages):
        where = f"stages[{i}] ({spec.name})"
        for key in ("dataset", "preference_dataset", "sft_dataset"):
            ds = getattr(spec, key, None)
            if ds is None:
                continue
            kind = {"preference_dataset": "dpo", "sft_dataset": "sft"}.get(key, spec.type)
            try:
                note = check_dataset(ds, recipe, kind)
            except DataError as e:
                problems.append(f"{where}.{key}: {e}")
            else:
                if note:
                    notes.append(f"{where}.{key}: {note}")
        fn = getattr(spec, "reward_fn", None)
        if fn:
            try:
                load_reward_fn(fn)
            except ValueError as e:
                problems.append(f"{where}.reward_fn: {e}")
        rm = getattr(spec, "reward_model", None)
        if rm and rm not in stage_names:
            note = check_model_source(rm, recipe)
            if note:
                notes.append(f"{where}.reward_model: {note}")
        if spec.type in TRL_CONFIGS:
            import trl

            from alignlab.stages.common import check_extra_args

            try:
                check_extra_args(getattr(trl, TRL_CONFIGS[spec.type]), spec.train, where)
            except ValueError as e:
                problems.append(str(e))
    if problems:
        raise RecipeError(f"{recipe.source}: invalid recipe:\n  - " + "\n  - ".join(problems))
    return recipe, notes


def check_model_source(name: str, recipe: Recipe) -> str | None:
    """builtin:NAME must be known; a local path must hold a config.json; anything else is a hub id."""
    if name.startswith("builtin:"):
        from alignlab.builtin import BUILTIN_MODELS

        if name.split(":", 1)[1] not in BUILTIN_MODELS:
            raise RecipeError(f"model '{name}': unknown builtin model; known: {', '.join(BUILTIN_MODELS)}")
        return None
    p = recipe.resolve_path(name)
    if p.exists() or name.startswith((".", "/", "~")):
        if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
            raise RecipeError(f"model path {p} has no config.json: point model.name_or_path at a saved model folder")
        return None
    return f"model '{name}' is a hub id: not checked offline"


def load_reward_fn(ref: str):
    """Import `module:function` (only ever called for a function the recipe names)."""
    if ":" not in ref:
        raise ValueError(f"'{ref}' must look like package.module:function")
    mod_name, fn_name = ref.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import module '{mod_name}' ({e}); is it on PYTHONPATH?") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"module '{mod_name}' has no function '{fn_name}'")
    return fn
