"""A recipe: the typed form of a recipe YAML file, its loading, overrides and error messages.

A recipe is run-level keys (name, seed, output_dir), the base model, the PEFT method and an ordered list of
stages. Every mapping rejects unknown keys; an error names the key, its line in the file and the closest
valid key. The sections are in alignlab/schema.py, each stage type's keys in alignlab/stages/specs.py; all of
it is pydantic only, so reading and checking a recipe never imports torch.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

import alignlab.stages.specs  # noqa: F401, I001  (registers the stage types)
from alignlab.schema import (  # noqa: F401  (re-exported: the recipe's sections are part of its API)
    CANONICAL_COLUMNS,
    DatasetSpec,
    ModelSpec,
    PeftSpec,
    QuantizationSpec,
    RecipeError,
    StageSpec,
    Strict,
    TrainSpec,
)
from alignlab.stages.registry import STAGE_TYPES


class Recipe(Strict):
    name: str
    seed: int = 42
    output_dir: str = "runs/${name}"
    model: ModelSpec
    peft: PeftSpec = Field(default_factory=PeftSpec)
    stages: list[StageSpec] = Field(min_length=1)

    # Where the recipe was read from: relative data paths resolve against it. Not a YAML key.
    source: Path | None = Field(None, exclude=True)

    def stage(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise RecipeError(f"no stage named '{name}'; stages are: {', '.join(s.name for s in self.stages)}")

    @property
    def run_dir(self) -> Path:
        # Relative output dirs are relative to where the user runs from, like every CLI tool.
        return Path(self.output_dir.replace("${name}", self.name)).expanduser()

    def resolve_path(self, path: str) -> Path:
        """A data or file path from the recipe: absolute, relative to the CWD if it exists there, else to
        the recipe file's folder."""
        p = Path(path).expanduser()
        if p.is_absolute() or p.exists() or self.source is None:
            return p
        beside = self.source.parent / p
        return beside if beside.exists() else p


# ----------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Raises RecipeError with every problem found."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file not found: {path}")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: malformed YAML: {e}. Check indentation and quoting near that line.") from e
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{path}: a recipe is a YAML mapping with keys name, model, stages (got {type(raw).__name__})"
        )
    for ov in overrides or []:
        apply_override(raw, ov)
    return parse_recipe(raw, source=path, yaml_root=root)


def parse_recipe(raw: dict, source: Path | None = None, yaml_root: yaml.Node | None = None) -> Recipe:
    where = str(source) if source else "<recipe>"
    errors: list[str] = []
    stages_raw = raw.get("stages")
    top = {k: v for k, v in raw.items() if k != "stages"}
    top["stages"] = [{"name": "_", "type": "_"}]  # placeholder, validated one by one below
    recipe = None
    try:
        recipe = Recipe.model_validate(top)
    except ValidationError as e:
        errors += _format_errors(e, Recipe, (), where, yaml_root)

    stages: list[StageSpec] = []
    if not isinstance(stages_raw, list) or not stages_raw:
        errors.append(f"{where}: 'stages' must be a non-empty list of stages, each with a name and a type")
    else:
        for i, st in enumerate(stages_raw):
            loc = ("stages", i)
            if not isinstance(st, dict):
                errors.append(f"{where}{_line(yaml_root, loc)}: stages[{i}] must be a mapping with name and type")
                continue
            type_name = st.get("type")
            record = STAGE_TYPES.get(type_name)
            if record is None:
                close = difflib.get_close_matches(str(type_name), list(STAGE_TYPES), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                errors.append(
                    f"{where}{_line(yaml_root, loc + ('type',))}: stages[{i}].type: unknown stage type "
                    f"'{type_name}'; known types: {', '.join(sorted(STAGE_TYPES))}.{hint}"
                )
                continue
            st = dict(st)
            st.setdefault("name", type_name)
            try:
                stages.append(record.spec.model_validate(st))
            except ValidationError as e:
                errors += _format_errors(e, record.spec, loc, where, yaml_root)
    if errors:
        raise RecipeError("invalid recipe:\n  - " + "\n  - ".join(errors))
    names = [s.name for s in stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecipeError(f"{where}: stage names must be unique; repeated: {', '.join(dupes)}. Give each a 'name'.")
    recipe.stages = stages
    recipe.source = source
    return recipe


def apply_override(raw: dict, override: str) -> None:
    """Apply `a.b.c=value` to the raw recipe mapping. Stages are addressed by name or index:
    `stages.sft.train.max_steps=10` or `stages.0.train.max_steps=10`. The value is parsed as YAML."""
    if "=" not in override:
        raise RecipeError(f"override '{override}' must look like key.sub=value (e.g. stages.sft.train.max_steps=10)")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, ".".join(parts[: i + 1]))
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise RecipeError(f"override '{override}': '{'.'.join(parts[: i + 1])}' is not a mapping")
    last = parts[-1]
    parsed = yaml.safe_load(value) if value != "" else None
    if isinstance(node, list):
        node[_list_index(node, last, key)] = parsed
    else:
        node[last] = parsed


def _list_index(items: list, part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        return int(part)
    for i, item in enumerate(items):
        if isinstance(item, dict) and (item.get("name") or item.get("type")) == part:
            return i
    names = [str(it.get("name") or it.get("type")) for it in items if isinstance(it, dict)]
    raise RecipeError(f"override '{where}': no stage named '{part}'; stages are: {', '.join(names)}")


def _list_item(items: list, part: str, where: str) -> Any:
    return items[_list_index(items, part, where)]


# ------------------------------------------------------------------------------------------ error messages


def _format_errors(err: ValidationError, cls: type[BaseModel], prefix: tuple, where: str, root) -> list[str]:
    out = []
    for e in err.errors():
        loc = prefix + tuple(e["loc"])
        dotted = _dotted(loc)
        line = _line(root, loc)
        if e["type"] == "extra_forbidden":
            valid = _fields_at(cls, tuple(e["loc"])[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else f" Valid keys here: {', '.join(valid)}."
            out.append(f"{where}{line}: unknown key '{dotted}'.{hint}")
        elif e["type"] == "missing":
            out.append(f"{where}{line}: missing required key '{dotted}'")
        else:
            got = e.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
            out.append(f"{where}{line}: {dotted}: {e['msg']}{shown}")
    return out


def _dotted(loc: tuple) -> str:
    s = ""
    for part in loc:
        s += f"[{part}]" if isinstance(part, int) else (f".{part}" if s else str(part))
    return s


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys of the mapping at `loc` inside model `cls`."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return []
        nested = _model_in(field.annotation)
        if nested is None:
            return []
        cls = nested
    return [k for k in cls.model_fields if k != "source"]


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _line(root, loc: tuple) -> str:
    """':LINE' of the YAML node at `loc` (or its nearest existing parent); '' when unknown."""
    node, best = root, None
    for part in loc:
        if node is None:
            break
        if isinstance(node, yaml.MappingNode):
            best = node
            nxt = None
            for k, v in node.value:
                if k.value == part:
                    best, nxt = k, v
                    break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = best = node.value[part]
        else:
            break
    best = best or root
    return f":{best.start_mark.line + 1}" if best is not None else ""
