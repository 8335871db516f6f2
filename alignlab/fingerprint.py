"""Stage fingerprints: what a stage was made from, recorded so a rerun can tell whether it still fits the recipe.

A stage's *parts* are a flat mapping of readable keys to JSON values, everything that changes its result:
  <key>.<sub>              each key of the stage's resolved spec (train.learning_rate, loss.beta, dataset.path, ...)
                           except those that change no result: NOT_RESULT_KEYS, and those its stage type declares
                           (its record's `log_only`: train.logging_steps, train.report_to, ...)
  seed, model.<key>, peft.<key>   the recipe-level keys every stage depends on
  model.content            digest of a local base model folder (names, sizes, contents); hub ids and builtin
                           models by name only; likewise model.tokenizer.content, model.chat_template.content
  <dataset>.content        sha256 of the data files' bytes, or of the rows a builtin: task generates;
  <dataset>.eval_content   the same for the held-out data (eval_path, eval_split, a builtin task's held-out split)
  input, reward_model, reference, teacher   the earlier stage it starts from / scores with / learns from: its
                           name, fingerprint and the attempt (one training run, by start time) that made it, so
                           retraining that stage, even with the same settings, makes this one stale too; a
                           reward_model or teacher given as a model folder: its path and <key>.content, as model
  <dataset>.from_stage     the same for the stage whose data a `stage:NAME` dataset reads (and <dataset>.content
                           digests that data file)
  reward_fn.source         sha256 of the source file of the module `reward_fn` lives in
The fingerprint is the sha256 of the parts' canonical JSON. Nested recipe sections become dotted keys, so a
message can say `train.learning_rate: 0.001 -> 0.002`; free-form mappings (train.extra, dataset.columns, a loss's
parameters as `loss.params`) and optional sections (peft.quantization) stay one value each.

Not covered: datasets from the hub (recorded by id and split: their content is not read), code changes in
alignlab, transformers or TRL, and modules the reward function itself imports.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from alignlab.recipe import DatasetSpec, Recipe, StageSpec
from alignlab.schema import reward_fn_refs
from alignlab.stages.registry import stage_record

# Keys of every stage and recipe that change how a run is computed or named, never what it trains or measures;
# each stage type declares its own such keys in its record (`log_only`: how it logs, checkpoints or shows).
# model.gradient_checkpointing: recomputes activations (same values, dropout included) to save memory.
NOT_RESULT_KEYS = frozenset(
    {
        "name",  # the stage folder's name: a renamed stage is another folder
        "model.gradient_checkpointing",
        "parallel",  # sharded = unsharded (as N processes = 1): the same computation in other float sums
    }
)


def not_result_keys(spec: StageSpec) -> frozenset[str]:
    """The keys of stage `spec` that change no result: NOT_RESULT_KEYS and those its stage type declares."""
    return NOT_RESULT_KEYS | stage_record(spec.type).log_only(spec)


LARGE_FILE = 32 * 2**20  # bytes: bigger files (model weights) are digested by size and their first and last MiB


def stage_parts(recipe: Recipe, spec: StageSpec, refs: dict[str, tuple[str, dict | None] | None]) -> dict[str, Any]:
    """The parts of stage `spec` (see the module docstring). `refs`: for each of input / reward_model /
    reference that names an earlier stage, (its name, its record's origin: {} when it has none, None when it has
    not finished); None for the base model. Returns JSON-normal values (lists, not tuples)."""
    parts: dict[str, Any] = {"seed": recipe.seed}
    parts.update(_flatten(recipe.model, "model."))
    parts["model.content"] = model_digest(recipe, recipe.model.name_or_path)
    if recipe.model.tokenizer:
        parts["model.tokenizer.content"] = model_digest(recipe, recipe.model.tokenizer)
    if recipe.model.chat_template:
        parts["model.chat_template.content"] = model_digest(recipe, recipe.model.chat_template)
    parts.update(_flatten(recipe.peft, "peft."))
    own = _flatten(spec, "")
    for key in ("input", *stage_record(spec.type).references):
        own.pop(key, None)
    parts.update(own)
    for key, ref in refs.items():
        parts[key] = None if ref is None else _ref_part(*ref)
    for key in stage_record(spec.type).references:  # a reward_model or teacher named by path, not by stage
        value = getattr(spec, key, None)
        if value and key not in refs:
            parts[key] = value
            parts[f"{key}.content"] = model_digest(recipe, value)
    for name in type(spec).model_fields:
        value = getattr(spec, name)
        if isinstance(value, DatasetSpec):
            parts.update(dataset_digests(value, recipe, name))
    fns = reward_fn_refs(getattr(spec, "reward_fn", None))
    if fns:  # one string: one digest (as before lists were allowed); a list: one per component
        parts["reward_fn.source"] = (
            reward_fn_digest(fns[0]) if isinstance(spec.reward_fn, str) else [reward_fn_digest(fn) for fn in fns]
        )
    if getattr(spec, "revise_fn", None):
        parts["revise_fn.source"] = reward_fn_digest(spec.revise_fn, revise=True)
    skip = not_result_keys(spec)
    parts = {k: v for k, v in parts.items() if k not in skip}
    return json.loads(json.dumps(parts))


def recipe_settings(recipe: Recipe) -> dict[str, Any]:
    """What a recipe trains and measures, read from its keys alone: model, peft and each stage's resolved keys,
    less the recipe's name, seed and output folder and the keys that change no result (not_result_keys). Runs of
    two recipes with equal settings differ by their seed only. Data and code are not digested (stage_parts is)."""
    parts = {**_flatten(recipe.model, "model."), **_flatten(recipe.peft, "peft.")}
    parts["stages"] = [
        {k: v for k, v in _flatten(spec, "").items() if k not in not_result_keys(spec)} for spec in recipe.stages
    ]
    return json.loads(json.dumps({k: v for k, v in parts.items() if k not in NOT_RESULT_KEYS}))


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def new_attempt() -> str:
    """An id for one training attempt: its start time (readable in messages) and a random suffix."""
    return f"{time.strftime('%Y-%m-%d %H:%M:%S')} {uuid.uuid4().hex[:6]}"


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every part both records have and that differs. A key only one side has is a recipe
    key added or removed by another alignlab version (a user-set mapping is one key, so adding an entry to it
    is a change of that key), not a change of the recipe."""
    return [f"{_name(k)}: {_show(old[k], k)} -> {_show(new[k], k)}" for k in new if k in old and old[k] != new[k]]


# ------------------------------------------------------------------------------------------------ digests


def dataset_digests(ds: DatasetSpec, recipe: Recipe, field: str) -> dict[str, str]:
    """`<field>.content` and, when the stage reads held-out rows from elsewhere, `<field>.eval_content`; for a
    mixture, those of each source i as `<field>.mix[i].content`, ..."""
    if getattr(ds, "mix", None) is not None:
        return {
            k: v
            for i, source in enumerate(ds.mix)
            for k, v in dataset_digests(source, recipe, f"{field}.mix[{i}]").items()
        }
    out = {f"{field}.content": _source_digest(ds, recipe, held_out=False)}
    if ds.eval_path or ds.eval_split or ds.path.startswith("builtin:"):
        out[f"{field}.eval_content"] = _source_digest(ds, recipe, held_out=True)
    return out


def _source_digest(ds: DatasetSpec, recipe: Recipe, held_out: bool) -> str:
    from alignlab.data.formats import DataError, load_raw, resolve_source

    path = ds.eval_path if held_out and ds.eval_path else ds.path
    try:
        src = resolve_source(path, recipe)
        if src.kind == "builtin":  # the generated rows themselves: generator code, split, size and seed at once
            rows = load_raw(ds, recipe, held_out=held_out).to_list()
            return "sha256:" + hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
        if src.kind == "local":
            return "sha256:" + _files_digest([Path(f) for f in src.files], Path(src.location))
        if src.kind == "stage":  # an earlier stage's data: what it holds when read (its attempt: <key>.from_stage)
            f = Path(src.files[0])
            return "sha256:" + _files_digest([f], f.parent) if f.exists() else f"not written yet: {f}"
    except DataError as e:
        return f"unreadable: {e}"
    split = (ds.eval_split or ds.split) if held_out else ds.split
    return f"hub:{path} split={split} (content not read)"


def model_digest(recipe: Recipe, name_or_path: str) -> str:
    """A local model folder's digest; a hub id or builtin: name as given (their content is not read)."""
    if name_or_path.startswith("builtin:"):
        return name_or_path
    p = recipe.resolve_path(name_or_path)
    if p.is_dir():  # hidden entries (.cache/huggingface download metadata, .git) are not the model
        files = [f for f in p.rglob("*") if f.is_file() and not any(x.startswith(".") for x in f.relative_to(p).parts)]
        return "sha256:" + _files_digest(sorted(files), p)
    if p.is_file():
        return "sha256:" + _files_digest([p], p.parent)
    return f"hub:{name_or_path} (content not read)"


def reward_fn_digest(ref: str, revise: bool = False) -> str:
    """sha256 of the source of the module `module:function` lives in (what decides the rewards); for `builtin:TASK`,
    of the module the task's reward function (with `revise`: its revise function) is defined in
    (alignlab.builtin.constraints, ...)."""
    try:
        if ref.startswith("builtin:"):
            from alignlab.builtin.rewards import builtin_revise_fn, builtin_reward_fn

            fn = builtin_revise_fn(ref) if revise else builtin_reward_fn(ref)
            source = inspect.getsource(inspect.getmodule(fn))
        else:
            source = inspect.getsource(importlib.import_module(ref.split(":", 1)[0]))
    except (ImportError, OSError, TypeError, ValueError) as e:
        return f"unreadable: {e}"
    return "sha256:" + hashlib.sha256(source.encode()).hexdigest()


def _files_digest(files: list[Path], root: Path) -> str:
    """Names (relative to root), sizes and contents; of files over LARGE_FILE only the first and last MiB (model
    weights: a full read of gigabytes on every rerun costs more than the check is worth)."""
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= LARGE_FILE:
                h.update(fh.read())
            else:
                h.update(fh.read(2**20))
                fh.seek(-(2**20), 2)
                h.update(fh.read())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ helpers


def _flatten(model: BaseModel, prefix: str) -> dict[str, Any]:
    """Dotted keys for nested sections; free-form mappings, lists and optional sections as one value each."""
    dump = model.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        if info.exclude or _omitted(model, name):
            continue
        value = getattr(model, name)
        if (
            isinstance(value, BaseModel)
            and isinstance(info.annotation, type)
            and issubclass(info.annotation, BaseModel)
        ):
            out.update(_flatten(value, f"{prefix}{name}."))
        elif isinstance(value, BaseModel):  # an optional section: one value
            out[f"{prefix}{name}"] = {k: v for k, v in dump[name].items() if not _omitted(value, k)}
        else:
            out[f"{prefix}{name}"] = dump[name]
    if model.model_extra:  # e.g. a loss's parameters ({name: rdpo, eps: 0.2}): one value, so adding one shows
        out[f"{prefix}params"] = {k: dump[k] for k in sorted(model.model_extra)}
    return out


def _omitted(model: BaseModel, name: str) -> bool:
    """A key added after records were made, at the value that means it is not used (OMIT_AT_DEFAULT): left out, so
    what was recorded before it still matches."""
    omit = getattr(type(model), "OMIT_AT_DEFAULT", {})
    return name in omit and getattr(model, name) == omit[name]


def _ref_part(name: str, origin: dict | None) -> dict[str, Any]:
    """origin None: the stage has not finished; {}: it finished without a record (an older alignlab)."""
    if origin is None:
        return {"stage": name, "fingerprint": None, "attempt": None, "finished": False}
    return {"stage": name, "fingerprint": origin.get("fingerprint"), "attempt": origin.get("attempt")}


def _name(key: str) -> str:
    """The key, and for a digest what it digests."""
    field, _, what = key.rpartition(".")
    about = {
        "content": f"the files of {field}"
        if field.startswith(("model", "reward_model", "teacher"))
        else f"the data {field}.path holds",
        "eval_content": f"the held-out data of {field}",
        "source": f"the source of the {field} module",
    }
    if field and what in about:
        return f"{key} ({about[what]})"
    return key


def _show(value: Any, key: str) -> str:
    if isinstance(value, dict) and "stage" in value and "attempt" in value:
        made = (
            "not finished"
            if value.get("finished") is False
            else f"trained {value['attempt']}"
            if value.get("attempt")
            else "no record of its settings"
        )
        return f"stage '{value['stage']}' ({made})"
    if value is None and key in ("input", "reference"):  # a stage reference that names no stage
        return "the base model"
    if isinstance(value, str) and value.startswith("sha256:"):
        return value[:19]  # sha256: + 12 hex digits
    return json.dumps(value)
