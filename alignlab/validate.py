"""`alignlab validate`: everything that can be checked about a recipe without loading a model.

Schema and keys, stage chain, loss parameters, data files, columns and rows, reward functions, TRL
argument names, model paths; with the model's config and tokenizer (no weights): LoRA target modules, chat
templates for chat data, prompt lengths against train.max_length; with `--accelerate-config`, the launch
settings (alignlab/accelerate_checks.py). What needs the network (hub ids) is reported as not checked offline, not
as an error. `alignlab run` runs the same checks first, so a bad recipe fails before any output is written.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from pathlib import Path

from alignlab.builtin.models import built_model_path
from alignlab.data import DataError, check_dataset
from alignlab.gguf import gguf_source
from alignlab.input_checks import (
    chat_template_problem,
    is_hub_id_syntax,
    model_folder_problem,
    output_dir_problem,
    unusable_text,
)
from alignlab.recipe import Recipe, RecipeError, load_recipe
from alignlab.rewards import check_revise_fn, check_reward_fn
from alignlab.schema import reward_fn_refs
from alignlab.stages.registry import check_chain, stage_record


def validate_recipe(
    path: str | Path, overrides: list[str] | None = None, accelerate_config: str | Path | None = None
) -> tuple[Recipe, list[str]]:
    """Returns the recipe and notes (things not checked offline, and "warning: ..." lines). Raises RecipeError
    listing every problem."""
    recipe = load_recipe(path, overrides)
    unusable = unusable_text(recipe.model_dump(serialize_as_any=True), recipe.run_dir)
    if unusable:  # first: the checks below would fail on such paths with OSError (name too long) or ValueError
        raise RecipeError(f"{recipe.source}: invalid recipe:\n  - " + "\n  - ".join(unusable))
    problems: list[str] = []
    notes: list[str] = list(recipe.load_notes)
    try:
        check_chain(recipe)
    except RecipeError as e:
        problems.append(str(e))
    local_model = False
    gguf = gguf_source(recipe)
    try:
        model_note = check_gguf_source(recipe, gguf) if gguf else check_model_source(recipe.model.name_or_path, recipe)
    except RecipeError as e:
        problems.append(str(e) if gguf else f"model.name_or_path: {e}")
    else:
        local_model = model_note is None
        notes += [model_note] if model_note else []
    if recipe.model.trust_remote_code:
        notes.append(
            f"warning: model.trust_remote_code is on: Python code shipped with {recipe.model.name_or_path} "
            f"will run on this machine. Turn it off unless you have read that code."
        )
    if recipe.peft.quantized and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("peft.method: qlora needs bitsandbytes, which is not installed (pip install bitsandbytes)")
    problem = output_dir_problem(recipe.run_dir)
    problems += [problem] if problem else []
    template = recipe.model.chat_template and recipe.resolve_path(recipe.model.chat_template)
    bad_template = chat_template_problem(template) if template and template.is_file() else None
    problems += [bad_template] if bad_template else []  # and no checks that would render it
    tokenizer, arch = model_files(recipe, problems, notes) if local_model and not bad_template else (None, None)
    if arch is not None and recipe.peft.enabled:
        from alignlab.models import check_target_modules

        try:
            check_target_modules(recipe, arch)
        except ValueError as e:
            problems.append(str(e))
    stage_names = {s.name for s in recipe.stages}
    for i, spec in enumerate(recipe.stages):
        where = f"stages[{i}] ({spec.name})"
        record = stage_record(spec.type)
        train = getattr(spec, "train", None)
        for key, formats in record.datasets.items():
            ds = getattr(spec, key, None)
            if ds is None:
                continue
            max_length = getattr(train, "max_length", None) if key == "dataset" else None
            masks = key == "dataset" and getattr(spec, "completion_only_loss", False)  # SFT on assistant turns
            try:
                note = check_dataset(ds, recipe, spec.type, tokenizer, max_length, formats, assistant_masks=masks)
            except DataError as e:
                problems.append(f"{where}.{key}: {e}")
            else:
                if note:
                    notes.append(f"{where}.{key}: {note}")
        fns = getattr(spec, "reward_fn", None)
        for j, fn in enumerate(reward_fn_refs(fns)):
            try:
                check_reward_fn(fn, spec.dataset, recipe, spec.type)
            except ValueError as e:
                problems.append(f"{where}.reward_fn{'' if isinstance(fns, str) else f'[{j}].fn'}: {e}")
        if getattr(spec, "revise_fn", None):
            try:
                check_revise_fn(spec.revise_fn, spec.dataset, recipe, spec.type)
            except ValueError as e:
                problems.append(f"{where}.revise_fn: {e}")
        for key, wanted in record.references.items():  # a reward_model or teacher named by path, not by stage
            value = getattr(spec, key, None)
            if not value or wanted is None or value in stage_names:
                continue
            try:
                note = check_model_source(value, recipe)
            except RecipeError as e:
                problems.append(f"{where}.{key}: {e}")
            else:
                if note:
                    notes.append(f"{where}.{key}: {note}")
        problem = record.check(recipe, i) if record.check else None
        if problem:
            problems.append(f"{where}: {problem}")
        if record.trl_config and spec.train.extra:  # trl (and with it torch) is imported only when needed
            import trl

            from alignlab.stages.trl_glue import check_extra_args

            try:
                check_extra_args(getattr(trl, record.trl_config), spec.train, where)
            except ValueError as e:
                problems.append(str(e))
        if record.trl_config:
            schedulers = scheduler_names()
            if spec.train.lr_scheduler not in schedulers:
                close = difflib.get_close_matches(spec.train.lr_scheduler, schedulers, n=1)
                hint = f"Did you mean '{close[0]}'?" if close else f"Known: {', '.join(schedulers)}."
                problems.append(f"{where}.train.lr_scheduler: unknown scheduler '{spec.train.lr_scheduler}'. {hint}")
    if problems:
        raise RecipeError(f"{recipe.source}: invalid recipe:\n  - " + "\n  - ".join(problems))
    if accelerate_config is not None:
        from alignlab.accelerate_checks import check_launch, load_launch_config

        notes += check_launch(recipe, load_launch_config(accelerate_config))
    return recipe, notes


def scheduler_names() -> list[str]:
    """The values of transformers' SchedulerType, read from its source without importing it (the module imports
    torch, and validation stays torch-free)."""
    import ast

    spec = importlib.util.find_spec("transformers")
    source = Path(spec.submodule_search_locations[0]) / "trainer_utils.py"
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == "SchedulerType":
            return [
                stmt.value.value
                for stmt in node.body
                if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant)
            ]
    raise RecipeError(f"cannot read the scheduler names from {source} (a transformers release alignlab does not know)")


def model_files(recipe: Recipe, problems: list[str], notes: list[str]):
    """The tokenizer and the architecture on the meta device (no weights read) of a local or built-in base model,
    for the checks that need them; (None, None) for hub ids (not checked offline) or a builtin not built yet."""
    spec = recipe.model
    if spec.chat_template and not recipe.resolve_path(spec.chat_template).is_file():
        problems.append(f"model.chat_template: file not found: {spec.chat_template} (a Jinja chat template file)")
        return None, None
    name = spec.name_or_path
    gguf, gguf_file = gguf_source(recipe), None
    if gguf is not None:
        from alignlab.gguf import converted_gguf_path

        path = converted_gguf_path(gguf, build=False)
        if path is None:  # not converted yet: tokenizer and config from the GGUF's metadata (no tensors read)
            path, gguf_file = gguf.parent, gguf.name
    elif name.startswith("builtin:"):
        builtin = name.split(":", 1)[1]
        path = built_model_path(builtin)
        if path is None:
            notes.append(f"model '{name}' is not built yet (alignlab builtin {builtin}): model checks not run")
            return None, None
    else:
        path = recipe.resolve_path(name)
        if not (path / "config.json").is_file():
            return None, None  # a hub id (noted already) or an adapter folder
    if spec.tokenizer and not recipe.resolve_path(spec.tokenizer).exists():
        return None, None  # a hub tokenizer id: not checked offline
    from alignlab.models import load_tokenizer, meta_model

    try:
        return load_tokenizer(recipe, str(path), gguf_file), meta_model(recipe, str(path), gguf_file)
    except (OSError, ValueError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
        problems.append(
            f"model.name_or_path: cannot read the config or tokenizer in {path}: {first_line}. A model folder holds "
            f"what save_pretrained writes (config.json, weights, tokenizer files); set model.tokenizer when the "
            f"tokenizer is elsewhere."
        )
        return None, None


def check_model_source(name: str, recipe: Recipe) -> str | None:
    """builtin:NAME must be known; a local path must hold a config.json; anything else is a hub id."""
    if name.startswith("builtin:"):
        from alignlab.builtin import builtin_model_names

        if name.split(":", 1)[1] not in builtin_model_names():
            raise RecipeError(f"model '{name}': unknown builtin model; known: {', '.join(builtin_model_names())}")
        return None
    p = recipe.resolve_path(name)
    if p.exists() or name.startswith((".", "/", "~")):
        if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
            raise RecipeError(f"model path {p} has no config.json: point model.name_or_path at a saved model folder")
        problem = model_folder_problem(
            p, needs_tokenizer=name != recipe.model.name_or_path or not recipe.model.tokenizer
        )
        if problem:
            raise RecipeError(problem)
        return None
    if not is_hub_id_syntax(name):
        raise RecipeError(
            f"'{name}' is no local folder (no such path from here or from the recipe's folder) and no valid hub id "
            f"(owner/name). Fix the path of the model folder."
        )
    return f"model '{name}' is a hub id: not checked offline"


def check_gguf_source(recipe: Recipe, path: Path) -> None:
    """A GGUF base model (model.name_or_path a .gguf file, or a folder plus model.gguf_file): the file exists, is
    GGUF and holds an architecture transformers reads (alignlab.gguf.check_gguf_file; no tensors read)."""
    from alignlab.gguf import ModelSourceError, check_gguf_file, is_gguf_name

    spec = recipe.model
    key = "model.name_or_path"
    if spec.gguf_file:
        key = "model.gguf_file"
        folder = recipe.resolve_path(spec.name_or_path)
        if spec.name_or_path.startswith("builtin:") or is_gguf_name(spec.name_or_path) or not folder.is_dir():
            raise RecipeError(
                f"model.gguf_file is '{spec.gguf_file}', so model.name_or_path must be the local folder holding "
                f"it, but '{spec.name_or_path}' is not a folder. Point model.name_or_path at the folder, or at the "
                f".gguf file itself and remove model.gguf_file."
            )
    try:
        check_gguf_file(path, key)
    except ModelSourceError as e:
        raise RecipeError(str(e)) from None
