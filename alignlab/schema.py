"""The typed sections of a recipe (model, peft, dataset, train, the keys every stage has): pydantic only, so the
recipe can be read and checked without torch. Stage types add their own keys in alignlab/stages/specs.py; the
recipe itself, its loading, overrides and error messages are in alignlab/recipe.py."""

from __future__ import annotations

import difflib
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# alignlab's column names; `dataset.columns` maps them to the names in a user's data.
CANONICAL_COLUMNS = ("prompt", "completion", "messages", "chosen", "rejected", "text", "margin", "answer", "label")


# numpy's legacy seeding (transformers.set_seed) takes 0 <= seed < 2**32; anything else fails once a stage starts.
MAX_SEED = 2**32 - 1
# Folder and file names a run directory holds besides the stages' folders (alignlab/pipeline.py).
RESERVED_STAGE_NAMES = ("logs", "recipe.yaml")


class RecipeError(ValueError):
    """A recipe is malformed or inconsistent. The message says where (file, line, key) and how to fix it."""


class Strict(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are checked at assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class QuantizationSpec(Strict):
    """bitsandbytes quantization of the base model (QLoRA). 4-bit NF4 with double quantization by default."""

    bits: Literal[4, 8] = Field(4, description="Bits per base weight (bitsandbytes): 4 (QLoRA) or 8")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: nf4 (QLoRA's NormalFloat) or fp4")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bits per weight)")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Precision the 4-bit layers compute in (their weights are dequantized to it)"
    )
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
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="Precision the weights are loaded in (auto: the checkpoint's)"
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3"] | None = Field(
        None, description="Attention kernel (transformers' attn_implementation); default: transformers' choice"
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~30% more time, same values"
    )
    trust_remote_code: bool = Field(False, description="Run the model repository's own code (only for repos you trust)")
    tokenizer: str | None = Field(None, description="Tokenizer path or id when it differs from the model's")
    chat_template: str | None = Field(None, description="Path to a Jinja chat template file overriding the model's")


class PeftSpec(Strict):
    """Parameter-efficient fine-tuning. `qlora` = LoRA on a bitsandbytes-quantized base."""

    method: Literal["none", "lora", "dora", "qlora"] = Field(
        "none", description="none: full fine-tuning; lora; dora (weight-decomposed LoRA); qlora (LoRA on a 4-bit base)"
    )
    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: float = Field(
        32.0, gt=0, description="LoRA scale numerator: the update is (alpha / r) B A (alpha / sqrt(r) with rsLoRA)"
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA branch's input")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules that get adapters: all-linear (every linear layer but the head), or names"
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale alpha / sqrt(r) instead of alpha / r")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full beside the adapters and saved with them (e.g. [lm_head])"
    )
    quantization: QuantizationSpec | None = Field(
        None, description="The 4-bit base of qlora (its defaults when not set)"
    )

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


class DataSource(Strict):
    """One source of a stage's data: where its rows come from and how its columns map onto alignlab's formats.

    path: a local .jsonl/.json/.csv/.parquet file or directory, a hub dataset id, or builtin:TASK (generated).
    columns: map alignlab's column names (prompt, completion, messages, chosen, rejected, text, margin,
    answer, label) to the names in your file, e.g. {prompt: question, completion: answer} or {label: thumbs_up}.
    """

    path: str = Field(description="The data: a file, a folder, a hub dataset id, builtin:TASK or stage:NAME")
    weight: float = Field(1.0, gt=0, description="In a `mix`: this source's share, relative to the other sources'")
    split: str = Field("train", description="Split of a hub dataset or a builtin task (data_cards/ lists a task's)")
    format: Literal["auto", "text", "prompt_completion", "messages", "preference", "prompt", "unpaired"] = Field(
        "auto", description="The rows' format (auto: read from the columns, as the stage type prefers)"
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="alignlab's column names -> yours, e.g. {prompt: question, completion: answer}",
    )
    eval_path: str | None = Field(None, description="Held-out data file/id; otherwise eval_fraction of path")
    eval_split: str | None = Field(None, description="Held-out split of the same hub dataset or builtin task")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Held-out share of the rows (seeded) when no eval_path or eval_split"
    )
    max_samples: int | None = Field(None, gt=0, description="Use at most this many rows (the first ones)")
    eval_max_samples: int | None = Field(None, gt=0, description="Use at most this many held-out rows")
    size: int = Field(2000, gt=0, description="Rows to generate for builtin: datasets")
    eval_size: int = Field(200, gt=0, description="Held-out rows to generate for builtin: datasets")
    flip_rate: float = Field(0.0, ge=0, le=1, description="Fraction of preference labels flipped (seeded)")
    flip_mode: Literal["uniform", "near_tie"] = Field(
        "uniform",
        description="Which pairs flip_rate flips: uniform (any pair alike), or near_tie (more likely the smaller the "
        "pair's true reward margin: a `margin` column, else the builtin task's reward; alignlab.data.near_tie_weights)",
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Data seed; defaults to the recipe seed")

    # Keys added after records were made: at these values a stage's fingerprint leaves them out, so what was recorded
    # before them still matches (alignlab.fingerprint).
    OMIT_AT_DEFAULT: ClassVar[dict[str, Any]] = {"weight": 1.0, "mix": None}

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if key not in CANONICAL_COLUMNS:
                close = difflib.get_close_matches(key, CANONICAL_COLUMNS, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ValueError(
                    f"unknown column role '{key}'; columns maps alignlab's names ({', '.join(CANONICAL_COLUMNS)}) "
                    f"to the names in your data.{hint}"
                )
        return v


class DatasetSpec(DataSource):
    """A stage's data: one source (`path` and the keys above), or several in proportions (`mix`), each a source of
    its own (path, split, columns, format, max_samples, flip_rate, ...) with a `weight`: {mix: [{path: a.jsonl,
    weight: 0.7}, {path: builtin:constraints, weight: 0.3}], size: 5000}. `size` is then the mixture's rows
    (alignlab.data.mixture)."""

    path: str | None = Field(None, description="The data: a file, a folder, a hub dataset id or builtin:TASK")
    size: int | None = Field(
        None,
        gt=0,
        description="Rows to generate for builtin: datasets (default 2000); of a `mix`, the mixture's rows (default: "
        "the most rows the weights allow without repeating a row)",
    )
    mix: list[DataSource] | None = Field(
        None,
        description="Several sources instead of `path`, each with its own keys and a `weight` (alignlab.data.mixture)",
    )

    # where rows come from and how to read them: a mixture sets these on each of its sources, not on itself
    PER_SOURCE: ClassVar[tuple[str, ...]] = ("split", "format", "columns", "eval_path", "eval_split", "eval_fraction",
                                             "max_samples", "flip_rate", "flip_mode", "weight")  # fmt: skip

    @model_validator(mode="after")
    def _path_or_mix(self) -> DatasetSpec:
        if (self.path is None) == (self.mix is None):
            raise ValueError(
                "give `path` (one source) or `mix` (a list of sources, each with its path and weight), "
                + ("not both" if self.path is not None else "one of them")
            )
        if self.mix is None:
            if self.weight != 1.0:
                raise ValueError("weight is a `mix` source's share of the mixture; a dataset with one path has none")
            if self.size is None:
                self.size = DataSource.model_fields["size"].default  # the rows a builtin: task generates
        else:
            if not self.mix:
                raise ValueError("`mix` lists no source; give at least one {path: ..., weight: ...}")
            fields = type(self).model_fields  # set away from its default (a run's recipe.yaml writes every key)
            misplaced = [
                k for k in self.PER_SOURCE if getattr(self, k) != fields[k].get_default(call_default_factory=True)
            ]
            if misplaced:
                raise ValueError(
                    f"{', '.join(misplaced)} of a mixture go on each of its sources (mix: [{{path: ..., "
                    f"{misplaced[0]}: ...}}]), not on the mixture"
                )
        return self

    def named_sources(self, key: str) -> list[tuple[str, DataSource]]:
        """(recipe key, source) of each source of the data held at `key`: (key, itself) for one path; (key.mix[i],
        source i) for a mixture."""
        return [(key, self)] if self.mix is None else [(f"{key}.mix[{i}]", s) for i, s in enumerate(self.mix)]


class OptimSpec(Strict):
    """The keys of `train:` that every trainable stage has, with one set of defaults: the optimiser's (AdamW), how
    often metrics are written and checkpoints kept. Each stage type's `train:` adds its own keys (TrainSpec for the
    TRL trainer stages, LoopTrainSpec for alignlab's own loops) and may set its own default learning rate."""

    learning_rate: float = Field(2e-5, gt=0, description="AdamW learning rate (peak, for a schedule)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off)")
    layer_lr_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Layer-wise learning-rate decay: decoder layer l of L trains at learning_rate x decay^(L + 1 - l), "
        "the embeddings at learning_rate x decay^(L + 1), the head at learning_rate (LoRA adapters at their layer's "
        "rate; alignlab/optim.py). e.g. 0.9; None: one rate for all",
    )
    logging_steps: int = Field(1, gt=0, description="Write metrics (averaged over the window) every N steps")
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N steps (for --resume); None: never")
    save_total_limit: int | None = Field(2, gt=0, description="Checkpoints kept (oldest deleted); None keeps all")
    report_to: list[str] = Field(default_factory=list, description="Trackers: tensorboard, trackio, wandb, mlflow")


class TrainSpec(OptimSpec):
    """`train:` of the trainer-based stages (sft, dpo, kto, reward, on TRL); `extra` passes any other field of the
    stage's TRL config (checked against that config's fields at validation time)."""

    epochs: float = Field(1.0, gt=0, description="Passes over the dataset")
    max_steps: int = Field(-1, description="Optimizer steps; overrides epochs when > 0")
    per_device_batch_size: int = Field(8, gt=0, description="Examples per forward and backward, per process")
    eval_batch_size: int | None = Field(
        None, gt=0, description="Examples per evaluation forward; default: per_device_batch_size"
    )
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Forwards per optimizer step: the batch is processes x per_device_batch_size x this"
    )
    lr_scheduler: str = Field("linear", description="transformers' scheduler name: linear, cosine, constant, ...")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Share of the steps the learning rate warms up over")
    max_length: int | None = Field(1024, gt=0, description="Tokens per row; longer rows are truncated")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps; default: at the end only")
    bf16: bool = Field(False, description="bfloat16 mixed precision (GPUs from Ampere on; CPUs with AMX)")
    fp16: bool = Field(False, description="float16 mixed precision, with loss scaling")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Any other field of the stage's TRL config, checked against it by validate"
    )

    @field_validator("max_steps")
    @classmethod
    def _steps_or_epochs(cls, v: int) -> int:
        """The trainer reads max_steps > 0 as a number of steps and a negative value as "use epochs"; 0 would train
        no step at all and still write a "trained" model."""
        if v == 0 or v < -1:
            raise ValueError("max_steps must be a positive number of optimizer steps, or -1 to train for `epochs`")
        return v

    @model_validator(mode="after")
    def _one_precision(self):
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true; choose one mixed precision (bf16 on Ampere GPUs or newer)")
        return self


class LoopTrainSpec(OptimSpec):
    """`train:` of alignlab's own RL loops (ppo, grpo): a step samples a batch (`rollout:`), then makes `epochs`
    passes over it in minibatches, one AdamW step (constant learning rate) per minibatch."""

    max_steps: int = Field(100, gt=0, description="Steps: each samples a fresh rollout batch, then updates on it")
    epochs: int = Field(1, gt=0, description="Passes over each step's samples")
    minibatch_size: int | None = Field(
        None, gt=0, description="Samples per optimizer step (per process); default: all of a step's samples"
    )


class SamplingSpec(Strict):
    """The keys of `rollout:` that every sampling stage has (ppo, grpo, generate, eval); each stage type adds its own
    and sets its own defaults."""

    batch_size: int = Field(8, gt=0, description="Prompts per sampling pass (per process)")
    max_new_tokens: int = Field(32, gt=0, description="Maximum response length; generation also stops at EOS")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs use logits / temperature")


class TrainingSamplingSpec(SamplingSpec):
    """`rollout:` keys of the RL loops (ppo, grpo): what is sampled for training, and how its log-probs are read."""

    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtracted from the score of a response that hit max_new_tokens without EOS"
    )
    forward_batch_size: int | None = Field(
        None,
        gt=0,
        description="Rows per no-grad forward of the rollout (reference, reward model); default: train.minibatch_size. "
        "Larger is faster; memory grows with rows x length x vocab",
    )
    recompute_logprobs: bool | None = Field(
        None,
        description="false: the sampling policy's log-probs come from the sampling pass itself; true: from one more "
        "forward over prompt + response (the training forward's exact arithmetic, so the first ratio is exactly 1). "
        "Default (null): true under mixed precision (accelerate bf16/fp16), a float16/bfloat16 model, a quantized base "
        "computing in bf16/fp16 (QLoRA's default compute_dtype) or rollout.dtype, where cached decoding drifts from a "
        "full forward; false otherwise",
    )


class RewardFnSpec(Strict):
    """One weighted component of a reward: `{fn: "builtin:constraints", weight: 1.0}`."""

    fn: str = Field(description="module:function (fn(prompts, completions) -> list[float]) or builtin:TASK")
    weight: float = Field(1.0, description="Multiplies this component's scores in the summed reward")


def reward_fn_refs(value: str | list[RewardFnSpec] | None) -> list[str]:
    """The reward functions a `reward_fn` key names: none, the one string, or each component's `fn`."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [component.fn for component in value]


class ParallelSpec(Strict):
    """How alignlab's own loops (ppo, grpo, generate, eval) hold their models over the processes of a run
    (docs/multi-gpu.md). Set at the top of the recipe and overridable per stage."""

    shard: Literal["none", "fsdp2"] = Field(
        "none",
        description="none: every process holds whole parameters (DDP); fsdp2: torch's fully_shard per decoder layer "
        "and on the root: parameters, gradients and optimizer state split over the processes (a 1-process run says "
        "so and runs unsharded). Trainer stages (sft, dpo, kto, reward) take FSDP from the accelerate config",
    )
    gather: Literal["once", "per_layer"] = Field(
        "once",
        description="Sampling from a sharded model: once (every layer's weights gathered once per sampling pass and "
        "kept until it ends: fast, the whole model's weights on each device meanwhile) or per_layer (each layer "
        "gathered whenever it runs: one all-gather per layer per token, 1/N of the weights plus one layer held)",
    )


class StageSpec(Strict):
    """Keys common to every stage. `input` says which model the stage starts from: `previous` (default: the
    output of the stage before it), `base` (the recipe's base model), or the name of an earlier stage."""

    # old key path -> where that setting lives now: a recipe still using the old one gets an error naming the new
    # path (it is never silently ignored)
    MOVED: ClassVar[dict[str, str]] = {}
    # whether the stage runs alignlab's own loop, which shards its models itself (`parallel`, alignlab/parallel.py);
    # the trainer stages (TRL) are sharded by an FSDP accelerate config instead
    SHARDABLE: ClassVar[bool] = False

    name: str = Field(description="The stage's name: its folder in the run directory, and how later stages name it")
    type: str = Field(description="The stage type (docs/stages.md)")
    input: str = Field(
        "previous", description="The model it starts from: previous (the last model-writing stage), base, or a stage"
    )
    merge: bool = Field(False, description="Also write merged full weights (adapters merged into the base)")
    parallel: ParallelSpec | None = Field(
        None, description="This stage's sharding (ppo, grpo, generate, eval), in place of the recipe's `parallel`"
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = [f"{old} -> {new}" for old, new in cls.MOVED.items() if _has_path(data, old)]
            if moved:
                raise ValueError(
                    f"{'this key has' if len(moved) == 1 else 'these keys have'} moved: {'; '.join(moved)}. Every "
                    "stage keeps optimisation, logging and checkpoints under `train:` and sampling under `rollout:` "
                    "(docs/recipe-reference.md)"
                )
        return data

    @model_validator(mode="after")
    def _parallel_where_it_applies(self):
        if self.parallel is not None and not self.SHARDABLE:
            own = sorted(c.model_fields["type"].default for c in StageSpec.__subclasses__() if c.SHARDABLE)
            raise ValueError(
                f"parallel: a {self.type} stage runs on TRL's trainer, which accelerate shards (an FSDP accelerate "
                f"config: recipes/accelerate/fsdp2.yaml), not the recipe; `parallel` applies to the stages that run "
                f"alignlab's own loops ({', '.join(own)}). Remove it from this stage"
            )
        return self

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        """A stage writes into <run_dir>/<name>: a path separator, '..' or a reserved name would write elsewhere."""
        if not v.strip() or v in (".", "..") or "/" in v or "\\" in v or v in RESERVED_STAGE_NAMES:
            raise ValueError(
                f"stage name {v!r} cannot name the stage's folder in the run directory; use letters, digits, '-' and "
                f"'_' (no '/', not '.', '..', {' or '.join(repr(n) for n in RESERVED_STAGE_NAMES)})"
            )
        return v


def _has_path(data: dict, path: str) -> bool:
    """Whether the dotted key `path` (e.g. "ppo.learning_rate") is set in the mapping `data`."""
    head, _, rest = path.partition(".")
    if head not in data:
        return False
    return not rest or (isinstance(data[head], dict) and _has_path(data[head], rest))
