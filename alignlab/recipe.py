"""Recipe schema: the typed form of a recipe YAML file, its loading, overrides and error messages.

A recipe is run-level keys (name, seed, output_dir), the base model, the PEFT method and an ordered list of
stages. Every mapping rejects unknown keys; an error names the key, its line in the file and the closest
valid key. Stage types register their own spec class in `STAGE_SPECS` (see alignlab/stages/specs.py), so
this module stays free of heavy imports: validating a recipe never imports torch.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RecipeError(ValueError):
    """A recipe is malformed or inconsistent. The message says where (file, line, key) and how to fix it."""


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are checked at assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class QuantizationSpec(Strict):
    """bitsandbytes quantization of the base model (QLoRA). 4-bit NF4 with double quantization by default."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = Field(
        "uint8", description="dtype the packed 4-bit weights are stored in; FSDP / ZeRO-3 need model.dtype here"
    )


class ModelSpec(Strict):
    """The pretrained base model every stage starts from (directly or through earlier stages)."""

    name_or_path: str = Field(
        description="Local directory, .gguf file, hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) or builtin:NAME"
    )
    gguf_file: str | None = Field(
        None,
        description="A GGUF file inside the folder name_or_path (or point name_or_path at the .gguf itself); "
        "converted once to a cached safetensors folder (alignlab/gguf.py)",
    )
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3"] | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    tokenizer: str | None = Field(None, description="Tokenizer path or id when it differs from the model's")
    chat_template: str | None = Field(None, description="Path to a Jinja chat template file overriding the model's")


class PeftSpec(Strict):
    """Parameter-efficient fine-tuning. `qlora` = LoRA on a bitsandbytes-quantized base."""

    method: Literal["none", "lora", "dora", "qlora"] = "none"
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    quantization: QuantizationSpec | None = None

    @model_validator(mode="after")
    def _quantization_needs_qlora(self):
        if self.quantization is not None and self.method != "qlora":
            raise ValueError(
                f"quantization is set but method is '{self.method}': a quantized base trains only through "
                f"adapters (method: qlora). Set method: qlora, or remove peft.quantization."
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def quantized(self) -> bool:
        return self.method == "qlora"


class DatasetSpec(Strict):
    """Where a stage's data comes from and how its columns map onto alignlab's formats.

    path: a local .jsonl/.json/.csv/.parquet file or directory, a hub dataset id, or builtin:TASK (generated).
    columns: map alignlab's column names (prompt, completion, messages, chosen, rejected, text, margin,
    answer) to the names in your file, e.g. {prompt: question, completion: answer}.
    """

    path: str
    split: str = "train"
    format: Literal["auto", "text", "prompt_completion", "messages", "preference", "prompt"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict)
    eval_path: str | None = Field(None, description="Held-out data file/id; otherwise eval_fraction of path")
    eval_split: str | None = None
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    max_samples: int | None = Field(None, gt=0)
    eval_max_samples: int | None = Field(None, gt=0)
    size: int = Field(2000, gt=0, description="Rows to generate for builtin: datasets")
    eval_size: int = Field(200, gt=0, description="Held-out rows to generate for builtin: datasets")
    flip_rate: float = Field(0.0, ge=0, le=1, description="Fraction of preference labels flipped (seeded)")
    seed: int | None = Field(None, description="Data seed; defaults to the recipe seed")

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str]) -> dict[str, str]:
        from alignlab.data.formats import CANONICAL_COLUMNS

        for key in v:
            if key not in CANONICAL_COLUMNS:
                close = difflib.get_close_matches(key, CANONICAL_COLUMNS, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ValueError(
                    f"unknown column role '{key}'; columns maps alignlab's names ({', '.join(CANONICAL_COLUMNS)}) "
                    f"to the names in your data.{hint}"
                )
        return v


class TrainSpec(Strict):
    """Training arguments shared by the trainer-based stages; `extra` passes any other field of the
    stage's TRL config (checked against that config's fields at validation time)."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="Overrides epochs when > 0")
    per_device_batch_size: int = Field(8, gt=0)
    eval_batch_size: int | None = Field(None, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler: str = "linear"
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    max_length: int | None = Field(1024, gt=0)
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps; default: at the end only")
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N steps (for --resume)")
    save_total_limit: int | None = Field(2, gt=0)
    report_to: list[str] = Field(default_factory=list, description="tensorboard, trackio, wandb, mlflow")
    bf16: bool = False
    fp16: bool = False
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_precision(self):
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true; choose one mixed precision (bf16 on Ampere GPUs or newer)")
        return self


class StageSpec(Strict):
    """Keys common to every stage. `input` says which model the stage starts from: `previous` (default: the
    output of the stage before it), `base` (the recipe's base model), or the name of an earlier stage."""

    name: str
    type: str
    input: str = "previous"
    merge: bool = Field(False, description="Also write merged full weights (adapters merged into the base)")


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


# Stage type -> spec class. Filled by alignlab.stages.specs at import; plain dict as ARCHITECTURE.md asks.
STAGE_SPECS: dict[str, type[StageSpec]] = {}


def register_stage_spec(type_name: str):
    def deco(cls: type[StageSpec]) -> type[StageSpec]:
        STAGE_SPECS[type_name] = cls
        return cls

    return deco


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
    import alignlab.stages.specs  # noqa: F401  (registers the stage spec classes)

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
            cls = STAGE_SPECS.get(type_name)
            if cls is None:
                close = difflib.get_close_matches(str(type_name), list(STAGE_SPECS), n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                errors.append(
                    f"{where}{_line(yaml_root, loc + ('type',))}: stages[{i}].type: unknown stage type "
                    f"'{type_name}'; known types: {', '.join(sorted(STAGE_SPECS))}.{hint}"
                )
                continue
            st = dict(st)
            st.setdefault("name", type_name)
            try:
                stages.append(cls.model_validate(st))
            except ValidationError as e:
                errors += _format_errors(e, cls, loc, where, yaml_root)
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
