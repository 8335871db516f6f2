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
from pydantic import BaseModel, Field, PrivateAttr, ValidationError

from alignlab.schema import (  # noqa: F401  (re-exported: the recipe's sections are part of its API)
    CANONICAL_COLUMNS,
    MAX_SEED,
    DatasetSpec,
    ModelSpec,
    ParallelSpec,
    PeftSpec,
    QuantizationSpec,
    RecipeError,
    StageSpec,
    Strict,
    TrainSpec,
)
from alignlab.stages.types import STAGE_TYPES


class Recipe(Strict):
    name: str = Field(description="The recipe's name (the default output_dir uses it)")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seeds data, sampling and training in every stage")
    output_dir: str = Field("runs/${name}", description="The run directory; ${name} is the recipe's name")
    model: ModelSpec = Field(description="The pretrained base model every stage starts from")
    peft: PeftSpec = Field(default_factory=PeftSpec, description="Full fine-tuning, or adapters (LoRA, DoRA, QLoRA)")
    stages: list[StageSpec] = Field(min_length=1, description="The stages, run in order")
    parallel: ParallelSpec = Field(
        default_factory=ParallelSpec,
        description="Sharding of the stages alignlab runs itself (ppo, grpo, generate, eval)",
    )

    # Where the recipe was read from: relative data paths resolve against it. Not a YAML key.
    source: Path | None = Field(None, exclude=True)
    _load_notes: list[str] = PrivateAttr(default_factory=list)

    @property
    def load_notes(self) -> list[str]:
        """What loading changed that the user did not write (e.g. loss parameters dropped by a loss switch)."""
        return self._load_notes

    def parallel_for(self, spec: StageSpec) -> ParallelSpec:
        """The sharding a stage runs with: its own `parallel`, else the recipe's; `none` for the trainer stages."""
        if not spec.SHARDABLE:
            return ParallelSpec()
        return spec.parallel if spec.parallel is not None else self.parallel

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
    """Read, override and validate a recipe file. Raises RecipeError with every problem found.

    An error about a key that a command-line override set names that override rather than a line of the file.
    When an override switches a preference loss (`stages.dpo.loss.name=rdpo`), the file's parameters of the old
    loss that the new one does not take are dropped with a note (Recipe.load_notes); parameters set on the command
    line are kept, so a wrong one is still an error."""
    path = Path(path)
    raw, root = read_yaml(path)
    if raw is None:
        raise RecipeError(f"{path}: the file is empty; a recipe is a YAML mapping with keys name, model, stages")
    if not isinstance(raw, dict):
        raise RecipeError(
            f"{path}: a recipe is a YAML mapping with keys name, model, stages (got {type(raw).__name__})"
        )
    overridden: dict[tuple, str] = {}
    for ov in overrides or []:
        overridden[apply_override(raw, ov)] = ov
    notes = _drop_params_of_switched_losses(raw, overridden)
    recipe = parse_recipe(raw, source=path, yaml_root=root, overridden=overridden)
    recipe._load_notes = notes
    return recipe


def read_yaml(path: str | Path, what: str = "recipe") -> tuple[Any, yaml.Node | None]:
    """The data and the node tree (for line numbers) of a YAML file. Refuses what PyYAML would take silently or
    with a traceback: a folder, bytes that are not UTF-8 (UTF-16 with a byte-order mark is read), and a key
    written twice in one mapping (PyYAML keeps the last one without a word)."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"{what} file not found: {path}")
    if path.is_dir():
        raise RecipeError(f"{path} is a folder, not a {what} file: give the path of its .yaml file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-16") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); is this the {what} file? Save it as UTF-8."
        ) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: malformed YAML: {e}. Check indentation and quoting near that line.") from None
    repeated = _repeated_keys(root)
    if repeated:  # one line each, and the fix once
        raise RecipeError(
            "\n".join(f"{path}:{line}: {msg}" for line, msg in repeated)
            + "\nYAML would silently keep only the last value of each: delete the one you do not mean."
        )
    return raw, root


def _repeated_keys(node, loc: tuple = (), seen_nodes: set | None = None) -> list[tuple[int, str]]:
    """(line, message) for every key written twice in one mapping of the node tree."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if node is None or id(node) in seen_nodes:  # an alias repeats a node already checked
        return []
    seen_nodes.add(id(node))
    out = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            line = k.start_mark.line + 1
            if key is not None and key in first:
                out.append(
                    (
                        line,
                        f"key '{_dotted(loc + (key,))}' is written twice in one mapping "
                        f"(lines {first[key]} and {line})",
                    )
                )
            elif key is not None:
                first[key] = line
            out += _repeated_keys(v, loc + (key,), seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += _repeated_keys(item, loc + (i,), seen_nodes)
    return out


def _drop_params_of_switched_losses(raw: dict, overridden: dict[tuple, str]) -> list[str]:
    """A loss switched by override (`stages.dpo.loss.name=rdpo`) drops the file's parameters it does not take."""
    from alignlab.losses.catalog import PREFERENCE_LOSS_INFO

    notes = []
    for loc, ov in overridden.items():
        if len(loc) != 4 or loc[0] != "stages" or loc[2:] != ("loss", "name"):
            continue
        loss = raw["stages"][loc[1]]["loss"]
        info = PREFERENCE_LOSS_INFO.get(loss["name"]) if isinstance(loss.get("name"), str) else None
        if info is None:
            continue  # an unknown name: parse_recipe reports it
        stage = raw["stages"][loc[1]].get("name") or raw["stages"][loc[1]].get("type")
        for key in [k for k in loss if k not in ("name", "beta", *info.params)]:
            if loc[:3] + (key,) not in overridden:
                notes.append(
                    f"warning: stages[{loc[1]}] ({stage}).loss: dropped {key}: {loss.pop(key)!r} from the recipe "
                    f"file, which {loss['name']} does not take ({ov} on the command line)"
                )
    return notes


def parse_recipe(
    raw: dict, source: Path | None = None, yaml_root: yaml.Node | None = None, overridden: dict | None = None
) -> Recipe:
    """The typed recipe of `raw`. `overridden` maps the locations that command-line overrides set to the overrides,
    so that an error about them names the override instead of a line of the file."""
    where = str(source) if source else "<recipe>"
    overridden = overridden or {}
    errors: list[str] = []
    stages_raw = raw.get("stages")
    top = {k: v for k, v in raw.items() if k != "stages"}
    top["stages"] = [{"name": "_", "type": "_"}]  # placeholder, validated one by one below
    recipe = None
    try:
        recipe = Recipe.model_validate(top)
    except ValidationError as e:
        errors += _format_errors(e, Recipe, (), where, yaml_root, overridden)

    stages: list[StageSpec] = []
    if not isinstance(stages_raw, list) or not stages_raw:
        errors.append(f"{where}: 'stages' must be a non-empty list of stages, each with a name and a type")
    else:
        for i, st in enumerate(stages_raw):
            loc = ("stages", i)
            if not isinstance(st, dict):
                errors.append(
                    f"{_at(where, yaml_root, loc, overridden)}: stages[{i}] must be a mapping with name and type"
                )
                continue
            type_name = st.get("type")
            record = STAGE_TYPES.get(type_name) if isinstance(type_name, str) else None  # (a list or mapping: no name)
            if record is None:
                close = difflib.get_close_matches(str(type_name), list(STAGE_TYPES), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                errors.append(
                    f"{_at(where, yaml_root, loc + ('type',), overridden)}: stages[{i}].type: unknown stage type "
                    f"'{type_name}'; known types: {', '.join(sorted(STAGE_TYPES))}.{hint}"
                )
                continue
            st = dict(st)
            st.setdefault("name", type_name)
            try:
                stages.append(record.spec.model_validate(st))
            except ValidationError as e:
                errors += _format_errors(e, record.spec, loc, where, yaml_root, overridden)
    if errors:
        raise RecipeError("invalid recipe:\n  - " + "\n  - ".join(errors))
    names = [s.name for s in stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecipeError(f"{where}: stage names must be unique; repeated: {', '.join(dupes)}. Give each a 'name'.")
    recipe.stages = stages
    recipe.source = source
    return recipe


def apply_override(raw: dict, override: str) -> tuple:
    """Apply `a.b.c=value` to the raw recipe mapping, or remove a key with `~a.b.c`. Stages are addressed by name or
    index: `stages.sft.train.max_steps=10` or `stages.0.train.max_steps=10`. The value is parsed as YAML (`null` is
    None, which is not the same as removing the key: a removed key takes its default). Returns the key's location
    in `raw` (stage names resolved to indices), for messages that name the override."""
    remove = override.startswith("~")
    if remove and "=" in override:
        raise RecipeError(
            f"override '{override}': '~key' removes a key and takes no value; write ~{override[1:].split('=')[0]}"
        )
    if not remove and "=" not in override:
        raise RecipeError(
            f"override '{override}' must look like key.sub=value (e.g. stages.sft.train.max_steps=10), "
            f"or ~key.sub to remove a key"
        )
    key, value = (override[1:], None) if remove else override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override '{override}': empty key name in '{key}'; write key.sub=value")
    node: Any = raw
    loc: list = []
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            index = _list_index(node, part, ".".join(parts[:i]), override)
            node = node[index]
            loc.append(index)
        elif remove and part not in node:
            raise RecipeError(f"override '{override}': there is no key '{'.'.join(parts[: i + 1])}' to remove")
        else:
            node = node.setdefault(part, {})
            loc.append(part)
        if not isinstance(node, dict | list):
            raise RecipeError(f"override '{override}': '{'.'.join(parts[: i + 1])}' is not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        last = _list_index(node, last, ".".join(parts[:-1]), override)
    elif remove and last not in node:
        keys = ", ".join(map(str, node)) or "none"
        raise RecipeError(f"override '{override}': there is no key '{key}' to remove (keys there: {keys})")
    if remove:
        del node[last]
    else:
        try:
            node[last] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as e:
            problem = str(getattr(e, "problem", None) or e).strip()
            raise RecipeError(
                f"override '{override}': the value is not valid YAML ({problem}). Quote it to pass a string, e.g. "
                f"{key}='\"{value}\"'"
            ) from None
    return (*loc, last)


def _list_index(items: list, part: str, parent: str, override: str) -> int:
    """The index that `part` (a number, or a stage's name) addresses in the list at `parent` (a dotted path)."""
    stages = parent == "stages"
    where = override
    if part.lstrip("-").isdigit():
        index = int(part)
        if -len(items) <= index < len(items):
            return index % len(items)
        if stages:
            names = ", ".join(
                f"{i} ({it.get('name') or it.get('type')})" for i, it in enumerate(items) if isinstance(it, dict)
            )
            raise RecipeError(
                f"override '{where}': there is no stage {index}; the recipe has {len(items)} stage(s): {names}. "
                f"Address a stage by its index or its name (stages.sft.train.max_steps=10)"
            )
        raise RecipeError(f"override '{where}': index {index} is out of range; the list has {len(items)} item(s)")
    if not stages:
        raise RecipeError(
            f"override '{where}': '{parent}' is a list: address its items by index "
            f"(0 to {len(items) - 1}), or replace the whole list (key=[a, b])"
        )
    for i, item in enumerate(items):
        if isinstance(item, dict) and (item.get("name") or item.get("type")) == part:
            return i
    names = [str(it.get("name") or it.get("type")) for it in items if isinstance(it, dict)]
    raise RecipeError(f"override '{where}': no stage named '{part}'; stages are: {', '.join(names)}")


# ------------------------------------------------------------------------------------------ error messages


def _format_errors(
    err: ValidationError, cls: type[BaseModel], prefix: tuple, where: str, root, overridden: dict | None = None
) -> list[str]:
    out = []
    for e in err.errors():
        loc = prefix + tuple(e["loc"])
        dotted = _dotted(loc)
        at = _at(where, root, loc, overridden or {})
        if e["type"] == "extra_forbidden":
            valid = _fields_at(cls, tuple(e["loc"])[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else f" Valid keys here: {', '.join(valid)}."
            out.append(f"{at}: unknown key '{dotted}'.{hint}")
        elif e["type"] == "missing":
            out.append(f"{at}: missing required key '{dotted}'")
        else:
            got = e.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
            out.append(f"{at}: {dotted}: {e['msg']}{shown}")
    return out


def _at(where: str, root, loc: tuple, overridden: dict) -> str:
    """Where the key at `loc` was written: the command-line override that set it (or a mapping above it), else
    FILE:LINE, followed by the overrides that set keys inside it (they may be the cause)."""
    for set_loc, ov in overridden.items():
        if loc[: len(set_loc)] == set_loc:
            return f"command-line override '{ov}'"
    inside = [ov for set_loc, ov in overridden.items() if set_loc[: len(loc)] == loc]
    return f"{where}{_line(root, loc)}" + (f" (with command-line override {', '.join(inside)})" if inside else "")


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
