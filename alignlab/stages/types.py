"""The stage types, registered here and nowhere else: one record each (alignlab/stages/registry.py says what a
record holds), with the checks and advice that are particular to a type. A new stage type is its spec class
(alignlab/stages/specs.py), its runner module (alignlab/stages/<type>.py) and one record below.

Torch-free on purpose (pydantic and the standard library only): `alignlab validate` reads it.
"""

from __future__ import annotations

from alignlab.schema import TrainingSamplingSpec
from alignlab.stages.record import LOGGING_KEYS, MODEL_OR_PATH, StageType, Workload
from alignlab.stages.specs import (
    DistillSpec,
    DPOSpec,
    EvalSpec,
    GenerateSpec,
    GRPOSpec,
    KTOSpec,
    PPOSpec,
    RewardSpec,
    SFTSpec,
)


def input_stage_name(recipe, index: int) -> str | None:
    """Name of the stage whose model stage `index` starts from (its `input`; `previous`: the last stage before it
    that writes a model), or None for the base model."""
    spec = recipe.stages[index]
    if spec.input == "base":
        return None
    if spec.input == "previous":
        for prev in reversed(recipe.stages[:index]):
            if STAGE_TYPES[prev.type].writes_model:
                return prev.name
        return None
    return spec.input


# Data formats (alignlab/data/formats.py) by what a stage reads.
CHAT_OR_TEXT = ("messages", "prompt_completion", "text")
PAIRS = ("preference",)
UNPAIRED = ("unpaired",)
PROMPTS = ("prompt",)


def trainer_memory_knobs(spec) -> list[str]:
    t = spec.train
    return [
        f"lower train.per_device_batch_size (now {t.per_device_batch_size}) and raise "
        f"train.gradient_accumulation_steps (now {t.gradient_accumulation_steps}) by the same factor (same batch)",
        f"lower train.max_length (now {t.max_length})",
    ]


def check_sharding(recipe, index: int) -> str | None:
    """What `parallel.shard: fsdp2` cannot hold: a 4-bit base (fully_shard splits floating-point tensors; the packed
    bitsandbytes weights are not) and a bf16 sampling copy of the policy (it would be a whole second model on every
    process, which sharding is there to avoid)."""
    spec = recipe.stages[index]
    if recipe.parallel_for(spec).shard != "fsdp2":
        return None
    where = f"stages.{spec.name}.parallel.shard" if spec.parallel is not None else "parallel.shard"
    return sharding_problem(recipe, spec, f"{where}: fsdp2")


def sharding_problem(recipe, spec, what: str) -> str | None:
    """Why `spec` (an own-loop stage) cannot be sharded, `what` naming what shards it (the recipe's key, or an FSDP
    accelerate config); None when it can."""
    if not spec.SHARDABLE:
        return None
    if recipe.peft.method == "qlora":
        return (
            f"{what} shards floating-point tensors, but a qlora base is 4-bit: use peft.method lora (the base in "
            "bfloat16 is sharded), or run this stage unsharded (DDP)"
        )
    dtype = getattr(spec.rollout, "dtype", None)
    if dtype and isinstance(spec.rollout, TrainingSamplingSpec):  # an RL loop samples from a copy in that dtype
        return (
            f"{what} with rollout.dtype: {dtype} would keep a whole {dtype} copy of the policy on every process: "
            "remove rollout.dtype (sampling gathers the sharded float32 weights once per pass), or run this stage "
            "unsharded (DDP)"
        )
    return None


def _checks(*checks):
    """One record `check` from several: every problem found, joined."""

    def check(recipe, index: int) -> str | None:
        problems = [p for p in (c(recipe, index) for c in checks) if p]
        return "; ".join(problems) or None

    return check


def check_sampling_dtype(recipe, index: int) -> str | None:
    """`rollout.dtype` casts the model a stage samples from (or a copy of it); a 4-bit base cannot be cast (it
    computes in peft.quantization.compute_dtype)."""
    dtype = recipe.stages[index].rollout.dtype
    if dtype is None or recipe.peft.method != "qlora":
        return None
    return (
        f"rollout.dtype: {dtype} casts the model it samples from, but a qlora base is 4-bit and computes in "
        f"peft.quantization.compute_dtype (bfloat16 unless set). Remove rollout.dtype, or set that instead"
    )


GENERATED_FORMATS = {"preference": "preference", "sft": "prompt_completion"}  # output -> data format it writes


def check_eval_has_two_models(recipe, index: int) -> str | None:
    """An eval stage compares its input (the policy) with its reference. When `input: previous` finds no training
    stage before it, or the very stage named as reference, both are the same model and every comparison is empty
    (KL 0, win rate 1/2): most likely a misplaced stage. (Say `input: base` to measure the base model on purpose.)"""
    spec = recipe.stages[index]
    policy = input_stage_name(recipe, index)
    reference = None if spec.reference == "base" else spec.reference
    if spec.input != "previous" or policy != reference:
        return None
    what = "the base model (no training stage comes before it)" if policy is None else f"stage '{policy}'"
    return (
        f"evaluates {what} against itself (input: previous, reference: {spec.reference}), so there is nothing to "
        f"compare. Put the eval stage after a training stage, set `reference` to another model, or write "
        f"`input: {policy or 'base'}` to measure that model on its own."
    )


# train.eval_steps: evaluation during training leaves the weights alone (the final evaluation runs regardless).
TRAINER_LOG_ONLY = LOGGING_KEYS | {"train.eval_steps"}


def grpo_log_only(spec: GRPOSpec) -> frozenset[str]:
    """With stop_if, train.save_steps schedules the greedy probe and, with train.save_total_limit, decides which
    checkpoint is left to end on: both then change the result."""
    if spec.stop_if is None:
        return LOGGING_KEYS
    return LOGGING_KEYS - {"train.save_steps", "train.save_total_limit"}


def check_teacher_tokenizer(recipe, index: int) -> str | None:
    """A distill stage's teacher scores the student's token ids, so it must read them as the student does. Checked
    here from the tokenizer files alone (no model loaded) when both are on disk: the recipe's base (or
    model.tokenizer) and a teacher given as builtin:NAME or a model folder. A teacher that is an earlier stage was
    trained from the same base, with its tokenizer; a hub id or a builtin not fetched yet is checked when the stage
    starts, before it loads a model (alignlab/stages/distill.py)."""
    spec = recipe.stages[index]
    if spec.teacher in {s.name for s in recipe.stages}:
        return None
    student = _tokenizer_folder(recipe, recipe.model.tokenizer or recipe.model.name_or_path)
    teacher = _tokenizer_folder(recipe, spec.teacher)
    if student is None or teacher is None:
        return None
    from transformers import AutoTokenizer

    trust = recipe.model.trust_remote_code
    tokenizers = []
    for role, folder in (("student", student), ("teacher", teacher)):
        try:
            tokenizers.append(AutoTokenizer.from_pretrained(folder, trust_remote_code=trust))
        except (OSError, ValueError) as e:  # a damaged or unreadable tokenizer file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return f"cannot read the {role}'s tokenizer in {folder} to compare the two ({first}): fix its files"
    return teacher_tokenizer_problem(*tokenizers, spec.teacher)


def _tokenizer_folder(recipe, name: str) -> str | None:
    """The local folder holding the tokenizer of model `name` (builtin:NAME once built, a model folder), else None
    (a hub id, a GGUF file, a builtin not built yet)."""
    from alignlab.builtin.models import built_model_path

    if name.startswith("builtin:"):
        path = built_model_path(name.split(":", 1)[1])
        return str(path) if path is not None else None
    path = recipe.resolve_path(name)
    if name.lower().endswith(".gguf") or not path.is_dir():
        return None
    from alignlab.input_checks import TOKENIZER_FILES

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None  # not a model folder (an empty name is "."): the model checks of validate say so
    return str(path)


def teacher_tokenizer_problem(student, teacher, teacher_name: str) -> str | None:
    """Why `teacher` (a tokenizer) cannot score text `student` (a tokenizer) tokenised, or None when both map every
    token to the same id."""
    ours, theirs = student.get_vocab(), teacher.get_vocab()
    if ours == theirs:
        return None
    differ = sorted((t for t in ours if theirs.get(t) != ours[t]), key=ours.get)
    extra = sorted(set(theirs) - set(ours), key=theirs.get)
    token = differ[0] if differ else extra[0]
    return (
        f"teacher '{teacher_name}' does not share the student's tokenizer: {len(differ)} of the student's "
        f"{len(ours)} tokens have another id (or none) among the teacher's {len(theirs)} (e.g. {token!r}: "
        f"{ours.get(token)} for the student, {theirs.get(token)} for the teacher). The teacher scores the student's "
        "token ids position by position, so both must read each id as the same text. Distill from a teacher of the "
        "student's family (the same tokenizer), or fine-tune the student (sft) on text the teacher wrote"
    )


# ------------------------------------------------------------------------ workloads (alignlab plan's estimates)


def trainer_workload(rows_per_example: int = 1, reference: bool = False):
    """A trainer stage: per_device_batch_size examples of max_length tokens, each `rows_per_example` rows (a reward
    model's and dpo's pairs: chosen and rejected)."""

    def workload(spec, prompt_length: int) -> Workload:
        t = spec.train
        return Workload(rows_per_example * t.per_device_batch_size, t.max_length or 1024, reference=reference)

    return workload


def dpo_workload(spec: DPOSpec, prompt_length: int) -> Workload:
    return trainer_workload(2, reference=not spec.precompute_ref_logps)(spec, prompt_length)


def ppo_workload(spec: PPOSpec, prompt_length: int) -> Workload:
    new = spec.rollout.max_new_tokens
    return Workload(spec.train.minibatch_size, prompt_length + new, spec.rollout.batch_size, new, reference=True)


def grpo_workload(spec: GRPOSpec, prompt_length: int) -> Workload:
    new, rows = spec.rollout.max_new_tokens, spec.responses_per_step
    watched = spec.beta > 0 or spec.watch_steps is not None or (spec.stop_if is not None and spec.stop_if.kl)
    return Workload(spec.train.minibatch_size or rows, prompt_length + new, rows, new, reference=bool(watched))


def distill_workload(spec: DistillSpec, prompt_length: int) -> Workload:
    """Student rows of prompt + completion, sampled on on-policy steps; the teacher counted as a frozen copy of the
    student (plan reads one model's config: a larger teacher needs more than this says)."""
    new, rows = spec.rollout.max_new_tokens, spec.rollout.batch_size
    sampled = rows if spec.on_policy_rate > 0 else 0
    return Workload(spec.train.minibatch_size or rows, prompt_length + new, sampled, new, reference=True)


def generate_workload(spec: GenerateSpec, prompt_length: int) -> Workload:
    return Workload(0, prompt_length + spec.rollout.max_new_tokens, spec.rollout.batch_size * spec.rollout.num_samples)


def eval_workload(spec: EvalSpec, prompt_length: int) -> Workload:
    """The policy and the reference: a second model unless it is the same backbone (LoRA)."""
    return Workload(0, prompt_length + spec.rollout.max_new_tokens, spec.rollout.batch_size, reference=True)


STAGE_TYPES: dict[str, StageType] = {
    record.name: record
    for record in (
        StageType(
            "sft",
            SFTSpec,
            runner="alignlab.stages.sft",
            datasets={"dataset": CHAT_OR_TEXT},
            trl_config="SFTConfig",
            memory_knobs=trainer_memory_knobs,
            log_only=lambda spec: TRAINER_LOG_ONLY,
            workload=trainer_workload(),
        ),
        StageType(
            "dpo",
            DPOSpec,
            runner="alignlab.stages.dpo",
            datasets={"dataset": PAIRS},
            trl_config="DPOConfig",
            memory_knobs=trainer_memory_knobs,
            log_only=lambda spec: TRAINER_LOG_ONLY,
            workload=dpo_workload,
        ),
        StageType(
            "kto",
            KTOSpec,
            runner="alignlab.stages.kto",
            datasets={"dataset": UNPAIRED + PAIRS},
            trl_config="KTOConfig",
            memory_knobs=trainer_memory_knobs,
            log_only=lambda spec: TRAINER_LOG_ONLY,
            workload=trainer_workload(reference=True),
        ),
        StageType(
            "reward",
            RewardSpec,
            runner="alignlab.stages.reward",
            datasets={"dataset": PAIRS},
            trl_config="RewardConfig",
            memory_knobs=trainer_memory_knobs,
            log_only=lambda spec: TRAINER_LOG_ONLY,
            workload=trainer_workload(2),
        ),
        StageType(
            "ppo",
            PPOSpec,
            runner="alignlab.stages.ppo",
            datasets={"dataset": PROMPTS},
            references={"reward_model": "reward"},
            not_under_deepspeed="the ppo stage runs alignlab's own loop, which shards its models itself (FSDP2) and "
            "prepares no dataloader",
            memory_knobs=lambda spec: [
                f"lower rollout.batch_size (now {spec.rollout.batch_size}) and train.minibatch_size "
                f"(now {spec.train.minibatch_size})",
                f"lower rollout.max_new_tokens (now {spec.rollout.max_new_tokens})",
            ],
            check=check_sharding,
            workload=ppo_workload,
        ),
        StageType(
            "grpo",
            GRPOSpec,
            runner="alignlab.stages.grpo",
            datasets={"dataset": PROMPTS},
            references={"reward_model": "reward"},
            not_under_deepspeed="the grpo stage runs alignlab's own loop, which shards its models itself (FSDP2) and "
            "prepares no dataloader",
            memory_knobs=lambda spec: [
                f"lower rollout.batch_size (now {spec.rollout.batch_size}) or rollout.num_samples (now "
                f"{spec.rollout.num_samples}): {spec.responses_per_step} responses are sampled at once",
                f"set train.minibatch_size (now {spec.train.minibatch_size}) below the responses per step",
                f"lower rollout.max_new_tokens (now {spec.rollout.max_new_tokens})",
            ],
            check=_checks(check_sampling_dtype, check_sharding),
            log_only=grpo_log_only,
            workload=grpo_workload,
        ),
        StageType(
            "distill",
            DistillSpec,
            runner="alignlab.stages.distill",
            datasets={"dataset": ("prompt_completion", "messages", "prompt")},
            references={"teacher": MODEL_OR_PATH},
            not_under_deepspeed="the distill stage runs alignlab's own loop, which prepares no dataloader",
            memory_knobs=lambda spec: [
                f"lower rollout.batch_size (now {spec.rollout.batch_size}) or set train.minibatch_size (now "
                f"{spec.train.minibatch_size}): teacher and student logits are rows x tokens x vocabulary floats",
                f"lower rollout.max_new_tokens (now {spec.rollout.max_new_tokens})",
            ],
            check=check_teacher_tokenizer,
            workload=distill_workload,
        ),
        StageType(
            "generate",
            GenerateSpec,
            runner="alignlab.stages.generate",
            datasets={"dataset": PROMPTS},
            writes_model=False,
            writes_data=lambda spec: GENERATED_FORMATS[spec.output],
            references={"reward_model": "reward"},
            not_under_deepspeed="the generate stage samples with alignlab's own loop, which shards its model itself (FSDP2)",
            memory_knobs=lambda spec: [
                f"lower rollout.batch_size (now {spec.rollout.batch_size}: prompts per generate call, x "
                f"rollout.num_samples rows)",
                f"lower rollout.max_new_tokens (now {spec.rollout.max_new_tokens})",
            ],
            check=_checks(check_sampling_dtype, check_sharding),
            log_only=lambda spec: frozenset(),
            workload=generate_workload,
        ),
        StageType(
            "eval",
            EvalSpec,
            runner="alignlab.stages.eval",
            datasets={
                "dataset": PROMPTS,
                "preference_dataset": PAIRS,
                "sft_dataset": CHAT_OR_TEXT,
                "nll_dataset": CHAT_OR_TEXT,
            },
            writes_model=False,
            references={"reward_model": "reward", "reference": None},
            memory_knobs=lambda spec: [
                f"lower rollout.batch_size (now {spec.rollout.batch_size})",
                f"lower rollout.max_new_tokens (now {spec.rollout.max_new_tokens})",
            ],
            check=_checks(check_eval_has_two_models, check_sharding),
            log_only=lambda spec: frozenset({"num_samples_shown"}),
            workload=eval_workload,
        ),
    )
}
