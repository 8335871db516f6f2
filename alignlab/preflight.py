"""What `alignlab run` checks just before it starts, beyond `alignlab validate`: that the models and datasets a recipe
names by hub id can be had. Validation stays offline and only notes hub ids as not checked; a run needs them, and
without this check a missing one ends, after the run directory is written (and maybe after earlier stages ran), in
a traceback from deep inside transformers or datasets (19 frames for a model id with no network).

A hub model counts as available when the hub cache holds a snapshot of it; otherwise its config.json is fetched
(one small file, which loading would fetch anyway). Each failure is one line: the key, the id, why, and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from alignlab.data import DataError
from alignlab.data.formats import resolve_source
from alignlab.recipe import RecipeError
from alignlab.stages.registry import stage_record

if TYPE_CHECKING:
    from alignlab.recipe import Recipe


def check_hub_sources(recipe: Recipe, only: str | None = None) -> None:
    """Raise RecipeError naming every hub model or dataset of `recipe` (of stage `only` and the base model, for
    `--stage`) that cannot be had: offline and not in the cache, no network, no such repository, gated, unknown
    revision."""
    problems = [f"{key}: {p}" for key, name, rev in hub_models(recipe, only) if (p := hub_model_problem(name, rev))]
    problems += [f"{key}: {p}" for key, name in hub_datasets(recipe, only) if (p := hub_dataset_problem(name))]
    if problems:
        raise RecipeError(
            f"{recipe.source}: cannot get what the recipe names on the hub:\n  - " + "\n  - ".join(problems)
        )


def is_hub_id(name: str, recipe: Recipe) -> bool:
    """Not builtin:NAME and not a local path (as alignlab.validate.check_model_source tells them apart)."""
    return not name.startswith(("builtin:", ".", "/", "~")) and not recipe.resolve_path(name).exists()


def hub_models(recipe: Recipe, only: str | None = None) -> list[tuple[str, str, str | None]]:
    """(recipe key, hub id, revision) of every model the recipe (or its stage `only`) names by hub id."""
    spec = recipe.model
    found = [("model.name_or_path", spec.name_or_path, spec.revision), ("model.tokenizer", spec.tokenizer, None)]
    names = {s.name for s in recipe.stages}
    for i, stage in enumerate(recipe.stages):
        if only is not None and stage.name != only:
            continue
        for key, wanted in stage_record(stage.type).references.items():  # a reward_model or teacher by name
            value = getattr(stage, key, None)
            if value and wanted is not None and value not in names:
                found.append((f"stages[{i}] ({stage.name}).{key}", value, None))
    return [(key, name, rev) for key, name, rev in found if name and is_hub_id(name, recipe)]


def hub_datasets(recipe: Recipe, only: str | None = None) -> list[tuple[str, str]]:
    """(recipe key, hub id) of every dataset the recipe (or its stage `only`) names by hub id."""
    found = []
    for i, stage in enumerate(recipe.stages):
        if only is not None and stage.name != only:
            continue
        for key in stage_record(stage.type).datasets:
            ds = getattr(stage, key, None)
            for name, source in ds.named_sources(key) if ds is not None else []:
                for sub, path in (("path", source.path), ("eval_path", source.eval_path)):
                    try:
                        hub = bool(path) and resolve_source(path, recipe).kind == "hub"
                    except DataError:
                        hub = False  # a local file problem, reported by validation
                    if hub:
                        found.append((f"stages[{i}] ({stage.name}).{name}.{sub}", path))
    return found


def hub_model_problem(name: str, revision: str | None = None) -> str | None:
    """Why hub model `name` cannot be loaded, or None when it can (cached, or its config.json downloads)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return None
    not_local = (
        f"'{name}' is no local folder (no such path from here or from the recipe's folder), so it is read as a hub id"
    )
    try:
        hf_hub_download(name, "config.json", revision=revision)
    except HFValidationError:
        return f"{not_local}, and it is not a valid one either. Fix the path of the model folder."
    except LocalEntryNotFoundError:  # before EntryNotFoundError, its parent class
        why = (
            "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)"
            if constants.HF_HUB_OFFLINE
            else "the hub cannot be reached (no network?)"
        )
        return (
            f"{not_local}; it is not in the hub cache ({constants.HF_HUB_CACHE}) and {why}. Download it where there "
            f"is network (`hf download {name}`) and copy the cache here, or point the key at a local model folder."
        )
    except GatedRepoError:  # before RepositoryNotFoundError, its parent class
        return (
            f"hub model '{name}' is gated: accept its terms on https://huggingface.co/{name} and log in "
            f"(hf auth login)."
        )
    except RepositoryNotFoundError:
        return f"{not_local}, but the hub has no model '{name}' (or it is private: log in with `hf auth login`)."
    except RevisionNotFoundError:
        return f"hub model '{name}' has no revision '{revision}'. Fix model.revision."
    except EntryNotFoundError:
        return None  # the repository exists; it has no config.json (e.g. GGUF files only)
    except OSError as e:  # network errors (requests' are OSErrors), a read-only cache
        return f"cannot download '{name}' from the hub: {e}"
    return None


def hub_dataset_problem(name: str) -> str | None:
    """Why hub dataset `name` cannot be loaded, or None when its builder can be made (cached, or reachable)."""
    from datasets import load_dataset_builder

    try:
        load_dataset_builder(name)
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError...: say which and why
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (
            f"'{name}' is no local file or folder, so it is read as a hub dataset id, and `datasets` cannot get it "
            f"({first}). Fix the path, or download the dataset where there is network and copy the cache here."
        )
    return None
