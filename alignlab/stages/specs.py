"""The stage types: the recipe keys of each (its spec class) and its record (alignlab/stages/registry.py).
Light on purpose (pydantic only): `alignlab validate` reads these without importing torch. The code that runs a
stage lives beside this file, one module per stage type; a new type is that module plus a spec class here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from alignlab.schema import SHARDABLE_STAGE_TYPES, DatasetSpec, RewardFnSpec, StageSpec, Strict, TrainSpec
from alignlab.stages.registry import input_stage_name, stage_type

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


class SFTLossSpec(Strict):
    """`nll` (default): TRL's token cross-entropy. `unlikelihood`: NLL plus `alpha` times token-level unlikelihood
    on the tokens a response already wrote (Welleck et al. 2019; alignlab/losses/sft.py), a guard against greedy
    decoding loops ("simple simple simple ..."). Its eval_loss (and perplexity) stays the plain NLL."""

    name: Literal["nll", "unlikelihood"] = "nll"
    alpha: float | None = Field(None, gt=0, description="weight of the unlikelihood term (default 1.0)")

    @model_validator(mode="after")
    def _alpha_only_with_unlikelihood(self):
        if self.name == "nll" and self.alpha is not None:
            raise ValueError("loss.alpha weighs the unlikelihood term: set loss.name: unlikelihood, or drop alpha")
        return self

    @property
    def weight(self) -> float:
        """alpha, 1.0 when not given (Welleck et al. 2019 use 1.0)."""
        return 1.0 if self.alpha is None else self.alpha


@stage_type(
    "sft",
    runner="alignlab.stages.sft",
    datasets={"dataset": CHAT_OR_TEXT},
    trl_config="SFTConfig",
    memory_knobs=trainer_memory_knobs,
)
class SFTSpec(StageSpec):
    """Supervised fine-tuning on prompt/completion, chat messages or plain text (TRL's SFTTrainer).
    The loss is on completions / assistant turns only unless `completion_only_loss: false`; `loss` picks it."""

    type: Literal["sft"] = "sft"
    dataset: DatasetSpec
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(learning_rate=2e-4))
    packing: bool = False
    completion_only_loss: bool = True
    loss: SFTLossSpec = Field(default_factory=lambda: SFTLossSpec())

    @model_validator(mode="after")
    def _unlikelihood_needs_responses(self):
        if self.loss.name == "unlikelihood" and (self.packing or not self.completion_only_loss):
            raise ValueError(
                "loss.name: unlikelihood penalises tokens a response repeats from earlier in the same response, so "
                "it needs responses told apart from prompts and from each other: keep completion_only_loss: true "
                "and packing: false, or use loss.name: nll"
            )
        return self


class PreferenceLossSpec(Strict):
    """A preference loss chosen by name, with its parameters as sibling keys:
    `{name: rdpo, beta: 0.1, eps: 0.2}`. Names and parameters: alignlab/losses/preference.py. Without `beta`, the
    loss's own default (alignlab/losses/catalog.py: 0.1; ln_dpo 5 and simpo 2, on per-token averages)."""

    model_config = ConfigDict(extra="allow")
    name: str = "dpo"
    beta: float = Field(0.1, gt=0)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """A parameter set to null (`stages.dpo.loss.tau=null` on the command line) takes the loss's default; beta,
        when not given, is the loss's own default (catalog: reference-free losses use larger ones)."""
        from alignlab.losses.catalog import PREFERENCE_LOSS_INFO

        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if v is not None or k == "name"}
            if "beta" not in data and data.get("name") in PREFERENCE_LOSS_INFO:
                data = {**data, "beta": PREFERENCE_LOSS_INFO[data["name"]].beta}
        return data

    @model_validator(mode="after")
    def _check(self):
        from alignlab.losses.catalog import validate_preference_params

        validate_preference_params(self.name, self.beta, self.params)
        return self


@stage_type(
    "dpo",
    runner="alignlab.stages.dpo",
    datasets={"dataset": PAIRS},
    trl_config="DPOConfig",
    memory_knobs=trainer_memory_knobs,
)
class DPOSpec(StageSpec):
    """Direct preference optimisation and its robust variants on preference pairs (prompt, chosen, rejected).
    The reference model is the stage's input model (e.g. the SFT model), frozen."""

    type: Literal["dpo"] = "dpo"
    dataset: DatasetSpec
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(learning_rate=5e-6))
    loss: PreferenceLossSpec = Field(default_factory=PreferenceLossSpec)
    precompute_ref_logps: bool = Field(False, description="Compute reference log-probs once, cache them on disk")
    nll_alpha: float = Field(
        0.0,
        ge=0,
        description="RPO: add nll_alpha x the chosen answers' per-token NLL to the preference loss (0: none)",
    )

    @model_validator(mode="after")
    def _nll_term(self):
        from alignlab.losses.catalog import preference_loss_info

        if self.nll_alpha > 0 and preference_loss_info(self.loss.name).policy_logps:
            raise ValueError(
                f"loss {self.loss.name} already trains on the chosen answers' NLL (its own term, weighted by its "
                f"beta), so nll_alpha: {self.nll_alpha} would add a second one. Remove nll_alpha, or use another loss"
            )
        return self

    @model_validator(mode="after")
    def _reference_to_precompute(self):
        from alignlab.losses.catalog import preference_loss_info

        if self.precompute_ref_logps and not preference_loss_info(self.loss.name).needs_reference:
            raise ValueError(
                f"loss {self.loss.name} uses no reference model, so precompute_ref_logps: true has nothing to "
                f"compute (the stage loads no reference for it). Remove precompute_ref_logps, or pick a loss that "
                f"has a reference"
            )
        return self


@stage_type(
    "kto",
    runner="alignlab.stages.kto",
    datasets={"dataset": UNPAIRED + PAIRS},
    trl_config="KTOConfig",
    memory_knobs=trainer_memory_knobs,
)
class KTOSpec(StageSpec):
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306) on unpaired binary feedback: prompt, completion and a
    desirable/undesirable label (thumbs up/down; format `unpaired`), on TRL's KTOTrainer. Preference pairs are read
    as such feedback too: chosen desirable, rejected undesirable (after any label flips). The reference model is the
    stage's input model (e.g. the SFT model), frozen, as for dpo."""

    type: Literal["kto"] = "kto"
    dataset: DatasetSpec
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(learning_rate=5e-6))
    beta: float = Field(0.1, gt=0, description="KL strength: the implied reward is beta * log(pi / pi_ref)")
    desirable_weight: float = Field(
        1.0, gt=0, description="lambda_D, weight of the desirable examples' losses (balance unequal counts)"
    )
    undesirable_weight: float = Field(
        1.0,
        gt=0,
        description="lambda_U; the paper advises lambda_D n_D / (lambda_U n_U) in [1, 4/3] (n: the counts)",
    )

    @model_validator(mode="after")
    def _batch_of_two(self):
        if self.train.per_device_batch_size < 2:
            raise ValueError(
                f"kto estimates its reference point (the KL term) from each prompt paired with another row's "
                f"completion within a batch, so train.per_device_batch_size must be at least 2 (now "
                f"{self.train.per_device_batch_size}). Raise it, and lower train.gradient_accumulation_steps to keep "
                f"the same batch"
            )
        return self


@stage_type(
    "reward",
    runner="alignlab.stages.reward",
    datasets={"dataset": PAIRS},
    trl_config="RewardConfig",
    memory_knobs=trainer_memory_knobs,
)
class RewardSpec(StageSpec):
    """Bradley-Terry reward model (sequence-classification head) on preference pairs (prompt, chosen, rejected,
    optional per-pair `margin`). Reports held-out accuracy (eval_accuracy)."""

    type: Literal["reward"] = "reward"
    dataset: DatasetSpec
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(learning_rate=1e-4))
    center_coef: float | None = Field(None, ge=0, description="Reward centering eta (0.01 recommended when on)")


class RolloutSpec(Strict):
    """How PPO samples completions from the policy."""

    batch_size: int = Field(16, gt=0, description="Prompts per PPO update (per process)")
    max_new_tokens: int = Field(32, gt=0, description="Maximum response length; generation also stops at EOS")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature; log-probs use logits / temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling; PPO takes only 1.0 (off): docs/stages.md")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtracted from the score of a response that hit max_new_tokens without EOS"
    )
    forward_batch_size: int | None = Field(
        None,
        gt=0,
        description="Rows per no-grad forward of the rollout (reference, reward model); default: "
        "ppo.minibatch_size. Larger is faster; memory grows with rows x length x vocab",
    )
    recompute_logprobs: bool | None = Field(
        None,
        description="false: the policy's log-probs, values and entropy come from the sampling pass itself; "
        "true: from one more forward over prompt + response (the PPO epochs' exact arithmetic, so the first ratio "
        "is exactly 1). Default (null): true under mixed precision (accelerate bf16/fp16), a float16/bfloat16 "
        "model or a quantized base computing in bf16/fp16 (QLoRA's default compute_dtype), where cached decoding "
        "drifts from a full forward; false otherwise",
    )

    @field_validator("top_p")
    @classmethod
    def _no_nucleus(cls, v: float) -> float:
        """PPO's ratio, its KL penalty and its log-probs all describe softmax(logits / temperature). Top-p samples
        come from another distribution (truncated to a nucleus, renormalised): with the full softmax for the
        log-probs, the ratio and KL are those of a policy that did not sample. Using the truncated distribution
        instead cannot be made right: the nucleus moves as the policy trains, so a sampled token can fall outside
        the new policy's (or the reference's) nucleus, where its log-prob is -inf (ratio 0, KL infinite)."""
        if v < 1.0:
            raise ValueError(
                f"top_p = {v} is not supported by PPO: responses would come from the top-p-truncated distribution "
                "while the ratio and KL penalty use the full softmax(logits / temperature) (and under the truncated "
                "one a sampled token can fall outside a later policy's or the reference's nucleus: log-prob -inf). "
                "Remove rollout.top_p (or set 1.0); lower rollout.temperature to sample closer to the mode"
            )
        return v


class PPOHyperSpec(Strict):
    """PPO optimisation (formulas: docs/algorithms.md, code alignlab/losses/ppo.py)."""

    epochs: int = Field(4, gt=0, description="PPO epochs over each rollout batch")
    minibatch_size: int = Field(8, gt=0, description="Responses per optimizer step (per process)")
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate (constant) for policy and value head")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip epsilon")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip epsilon (around the rollout's values)")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss in the total loss")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    kl_coef: float = Field(0.05, ge=0, description="KL penalty coefficient (initial value when adaptive)")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1",
        description="KL(pi||ref) estimate LOGGED as `kl` (and fed to the adaptive KL controller): k1 = log(pi/ref) "
        "per token, k3 = ref/pi - 1 - log(ref/pi) (>= 0, less variance). The reward's per-token penalty is always "
        "-kl_coef k1: a detached k3 penalty does not pull the policy toward the reference (arXiv 2506.09477)",
    )
    kl_target: float | None = Field(None, gt=0, description="Set to use the adaptive KL controller")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL horizon, in responses")
    whiten_advantages: bool = Field(True, description="Whiten advantages (masked mean/variance of the batch)")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")


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
    if spec.type not in SHARDABLE_STAGE_TYPES:
        return None
    if recipe.peft.method == "qlora":
        return (
            f"{what} shards floating-point tensors, but a qlora base is 4-bit: use peft.method lora (the base in "
            "bfloat16 is sharded), or run this stage unsharded (DDP)"
        )
    if getattr(spec, "sample_dtype", None):
        return (
            f"{what} with sample_dtype: {spec.sample_dtype} would keep a whole {spec.sample_dtype} copy of the policy "
            "on every process: remove sample_dtype (sampling gathers the sharded float32 weights once per pass), or "
            "run this stage unsharded (DDP)"
        )
    return None


def _checks(*checks):
    """One record `check` from several: every problem found, joined."""

    def check(recipe, index: int) -> str | None:
        problems = [p for p in (c(recipe, index) for c in checks) if p]
        return "; ".join(problems) or None

    return check


@stage_type(
    "ppo",
    runner="alignlab.stages.ppo",
    datasets={"dataset": PROMPTS},
    references={"reward_model": "reward"},
    not_under_deepspeed="the ppo stage runs alignlab's own loop, which shards its models itself (FSDP2) and prepares "
    "no dataloader",
    memory_knobs=lambda spec: [
        f"lower rollout.batch_size (now {spec.rollout.batch_size}) and ppo.minibatch_size "
        f"(now {spec.ppo.minibatch_size})",
        f"lower rollout.max_new_tokens (now {spec.rollout.max_new_tokens})",
    ],
    check=check_sharding,
)
class PPOSpec(StageSpec):
    """PPO for RLHF (alignlab's own loop on accelerate). Reward: a reward stage / model, or a Python
    function `module:function(prompts, completions) -> list[float]`."""

    type: Literal["ppo"] = "ppo"
    dataset: DatasetSpec = Field(description="Prompts (format prompt: a `prompt` column; other columns ignored)")
    reward_model: str | None = Field(None, description="Name of an earlier reward stage, or a model path")
    reward_fn: str | None = Field(None, description="module:function returning one float per completion")
    steps: int = Field(100, gt=0, description="PPO updates (rollout batches)")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    ppo: PPOHyperSpec = Field(default_factory=PPOHyperSpec)
    logging_steps: int = Field(1, gt=0, description="Write metrics (averaged over the window) every N steps")
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N steps (for --resume)")
    save_total_limit: int | None = Field(2, gt=0, description="Checkpoints kept (oldest deleted); None keeps all")
    report_to: list[str] = Field(default_factory=list, description="Trackers: tensorboard, trackio, wandb, mlflow")

    @property
    def forward_batch_size(self) -> int:
        """Rows per no-grad rollout forward: rollout.forward_batch_size, else ppo.minibatch_size."""
        return self.rollout.forward_batch_size or self.ppo.minibatch_size

    @model_validator(mode="after")
    def _one_reward(self):
        if (self.reward_model is None) == (self.reward_fn is None):
            raise ValueError(
                "a ppo stage needs exactly one of reward_model (an earlier reward stage's name or a path) "
                "or reward_fn (module:function)"
            )
        return self


class StopIfSpec(Strict):
    """Early stop on signs of collapse, checked on every step's samples; the stage then ends with its last good
    checkpoint as its model and says why it stopped."""

    repetition: float | None = Field(
        None, gt=0, le=1, description="Stop when the share of repeated word 3-grams in the responses exceeds this"
    )
    kl: float | None = Field(
        None, gt=0, description="Stop when the KL to the reference (nats per response) exceeds this"
    )
    greedy_repetition: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Stop when the greedy answers to greedy_prompts fixed training prompts repeat more than this (share "
        "of repeated word 3-grams): checked on the input model, on each checkpoint's weights (the step after it is "
        "written) and on the final weights; the stage keeps the newest checkpoint that passed. Samples at "
        "temperature 1 rarely show the loops a sharpened policy falls into when it decodes greedily",
    )


def check_sampling_dtype(recipe, index: int) -> str | None:
    """A generate stage's `dtype` (an RL stage's `sample_dtype`) casts the model it samples from; a 4-bit base cannot
    be cast (it computes in peft.quantization.compute_dtype)."""
    spec = recipe.stages[index]
    key = "dtype" if spec.type == "generate" else "sample_dtype"
    dtype = getattr(spec, key)
    if dtype is None or recipe.peft.method != "qlora":
        return None
    return (
        f"{key}: {dtype} casts the model it samples from, but a qlora base is 4-bit and computes in "
        f"peft.quantization.compute_dtype (bfloat16 unless set). Remove {key}, or set that instead"
    )


@stage_type(
    "grpo",
    runner="alignlab.stages.grpo",
    datasets={"dataset": PROMPTS},
    references={"reward_model": "reward"},
    not_under_deepspeed="the grpo stage runs alignlab's own loop, which shards its models itself (FSDP2) and "
    "prepares no dataloader",
    memory_knobs=lambda spec: [
        f"lower prompts_per_step (now {spec.prompts_per_step}) or num_generations (now {spec.num_generations}): "
        f"{spec.prompts_per_step * spec.num_generations} responses are sampled at once",
        f"set minibatch_size (now {spec.minibatch_size}) below the responses per step",
        f"lower max_new_tokens (now {spec.max_new_tokens})",
    ],
    check=_checks(check_sampling_dtype, check_sharding),
)
class GRPOSpec(StageSpec):
    """Critic-free RL on rewards a program (or a reward model) gives: GRPO, Dr. GRPO, RLOO and DAPO's fixes
    (alignlab's own loop; formulas: docs/algorithms.md, code: alignlab/losses/grpo.py, alignlab/rl/grpo.py)."""

    type: Literal["grpo"] = "grpo"
    dataset: DatasetSpec = Field(description="Prompts (format prompt: a `prompt` column; other columns ignored)")
    reward_fn: str | list[RewardFnSpec] | None = Field(
        None,
        description="module:function or builtin:TASK, or a list of weighted components "
        "[{fn: builtin:constraints, weight: 1.0}, {fn: m:f, weight: 0.2}] (each logged as reward/<fn>)",
    )
    reward_model: str | None = Field(None, description="Name of an earlier reward stage, or a model path")
    reward_model_weight: float = Field(1.0, description="Weight of the reward model's score in the summed reward")
    steps: int = Field(100, gt=0, description="Policy updates (each on a fresh batch of groups)")
    prompts_per_step: int = Field(8, gt=0, description="Prompts (groups) per step, per process")
    num_generations: int = Field(8, ge=2, description="Responses sampled per prompt (the group size G)")
    max_new_tokens: int = Field(32, gt=0, description="Maximum response length; also Dr. GRPO's constant")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs use logits / temperature")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtracted from the reward of a response that hit max_new_tokens without EOS"
    )
    advantage: Literal["grpo", "dr_grpo", "rloo"] = Field(
        "grpo",
        description="grpo: (r - group mean) / (group std + 1e-4); dr_grpo: r - group mean; rloo: r - mean of the "
        "group's other responses",
    )
    loss_agg: Literal["sequence_mean", "token_mean", "constant"] | None = Field(
        None,
        description="sequence_mean (GRPO: per-response token mean, then mean), token_mean (DAPO: over every token), "
        "constant (Dr. GRPO: token sums / (responses x max_new_tokens)). Default: constant for advantage dr_grpo, "
        "sequence_mean otherwise",
    )
    clip_low: float = Field(0.2, gt=0, lt=1, description="The ratio is clipped below at 1 - clip_low")
    clip_high: float = Field(0.2, gt=0, description="... and above at 1 + clip_high (DAPO's clip-higher: 0.28)")
    epochs: int = Field(1, gt=0, description="Policy-gradient passes over each step's responses")
    minibatch_size: int | None = Field(
        None,
        gt=0,
        description="Responses per optimizer step (per process), a multiple of num_generations; default: all of a "
        "step's responses",
    )
    learning_rate: float = Field(1e-6, gt=0, description="AdamW learning rate (constant)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off)")
    beta: float = Field(0.0, ge=0, description="Weight of the k3 KL-to-reference term in the loss (0 = off)")
    unlikelihood: float = Field(
        0.0,
        ge=0,
        description="Weight of token-level unlikelihood (Welleck et al. 2019) on the sampled responses: pushes down, "
        "at each token, the probability of every token the response already wrote (against greedy loops; 0 = off)",
    )
    skip_zero_std_groups: bool = Field(
        False,
        description="Drop groups whose rewards are all equal from the loss (DAPO's dynamic sampling); they are "
        "counted (zero_std_groups) either way",
    )
    watch_steps: int | None = Field(
        10,
        gt=0,
        description="Every N steps log a few samples (samples.jsonl), and measure the KL to the reference even when "
        "beta is 0; None: off",
    )
    watch_samples: int = Field(3, ge=0, description="Samples shown at each watch step")
    stop_if: StopIfSpec | None = Field(None, description="Early stop on collapse, e.g. {repetition: 0.3, kl: 20}")
    greedy_prompts: int = Field(
        32, gt=0, description="Training prompts (evenly spaced, the same every time) stop_if.greedy_repetition decodes"
    )
    forward_batch_size: int | None = Field(
        None, gt=0, description="Rows per no-grad forward (reference, reward model); default: minibatch size"
    )
    recompute_logprobs: bool | None = Field(
        None,
        description="false: the sampling policy's log-probs come from the sampling pass itself; true: from one more "
        "forward (the training forward's exact arithmetic, so the first ratio is exactly 1). Default (null): true "
        "under mixed precision (accelerate bf16/fp16), a float16/bfloat16 model or a quantized base computing in "
        "bf16/fp16 (QLoRA's default compute_dtype), where cached decoding drifts from a full forward, and with "
        "sample_dtype; false otherwise",
    )
    sample_dtype: Literal["bfloat16", "float16"] | None = Field(
        None,
        description="Sample from a copy of the policy in this precision, its adapter merged and refreshed before "
        "each step (alignlab/rl/sampler.py); training stays float32 and the old log-probs come from a float32 "
        "forward. bfloat16 samples SmolLM2-135M ~1.75x as fast on a CPU with AMX (and on GPUs). Default: sample "
        "with the policy itself",
    )
    logging_steps: int = Field(1, gt=0, description="Write metrics (averaged over the window) every N steps")
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N steps (for --resume and stop_if)")
    save_total_limit: int | None = Field(None, gt=0, description="Checkpoints kept (oldest deleted); None keeps all")
    report_to: list[str] = Field(default_factory=list, description="Trackers: tensorboard, trackio, wandb, mlflow")

    @property
    def aggregation(self) -> str:
        """loss_agg, or its default for the advantage (Dr. GRPO pairs its advantage with the constant)."""
        if self.loss_agg is not None:
            return self.loss_agg
        return "constant" if self.advantage == "dr_grpo" else "sequence_mean"

    @property
    def responses_per_step(self) -> int:
        """Per process."""
        return self.prompts_per_step * self.num_generations

    @model_validator(mode="after")
    def _check(self):
        if self.reward_fn is None and self.reward_model is None:
            raise ValueError(
                "a grpo stage needs a reward: reward_fn (module:function, builtin:TASK, or a list of "
                "{fn, weight}) and/or reward_model (an earlier reward stage's name or a path)"
            )
        if isinstance(self.reward_fn, list) and not self.reward_fn:
            raise ValueError("reward_fn is an empty list; name at least one {fn: module:function, weight: 1.0}")
        if self.stop_if is not None and self.save_steps is None:
            raise ValueError(
                "stop_if ends the stage with its last good checkpoint, and no checkpoints are written: set "
                "save_steps (e.g. 10), or remove stop_if"
            )
        if self.minibatch_size is not None and self.minibatch_size % self.num_generations:
            raise ValueError(
                f"minibatch_size = {self.minibatch_size} is not a multiple of num_generations = "
                f"{self.num_generations}: a minibatch holds whole groups (each group's prompt is computed once). "
                f"Use e.g. {max(1, self.minibatch_size // self.num_generations) * self.num_generations}"
            )
        limits = self.stop_if
        if limits is not None and limits.repetition is None and limits.kl is None and limits.greedy_repetition is None:
            raise ValueError("stop_if sets no limit; give repetition (e.g. 0.3), kl (e.g. 20) and/or greedy_repetition")
        if self.sample_dtype is not None and self.recompute_logprobs is False:
            raise ValueError(
                f"sample_dtype: {self.sample_dtype} samples from a low-precision copy, whose log-probs are not the "
                "float32 policy's the ratios start from: remove recompute_logprobs: false (or sample_dtype)"
            )
        return self


GENERATED_FORMATS = {"preference": "preference", "sft": "prompt_completion"}  # output -> data format it writes


@stage_type(
    "generate",
    runner="alignlab.stages.generate",
    datasets={"dataset": PROMPTS},
    writes_model=False,
    writes_data=lambda spec: GENERATED_FORMATS[spec.output],
    references={"reward_model": "reward"},
    not_under_deepspeed="the generate stage samples with alignlab's own loop, which shards its model itself (FSDP2)",
    memory_knobs=lambda spec: [
        f"lower batch_size (now {spec.batch_size}: prompts per generate call, x num_samples rows)",
        f"lower max_new_tokens (now {spec.max_new_tokens})",
    ],
    check=_checks(check_sampling_dtype, check_sharding),
)
class GenerateSpec(StageSpec):
    """Sample `num_samples` completions per prompt from the input model, score them with `reward_fn` or
    `reward_model`, and write a dataset a later stage reads as `dataset: {path: "stage:NAME"}`: preference pairs
    (best vs worst per prompt; ties dropped) or best-of-N SFT data (rejection sampling)."""

    type: Literal["generate"] = "generate"
    dataset: DatasetSpec = Field(description="Prompts (format prompt: a `prompt` column; other columns ignored)")
    reward_fn: str | None = Field(None, description="module:function or builtin:TASK, one float per completion")
    reward_model: str | None = Field(None, description="Name of an earlier reward stage, or a model path")
    output: Literal["preference", "sft"] = Field(
        "preference",
        description="preference: (prompt, chosen = best, rejected = worst) per prompt whose scores differ; sft: "
        "(prompt, completion = best of num_samples)",
    )
    num_samples: int = Field(4, ge=1, description="Completions sampled per prompt")
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (1.0: the model's own distribution)")
    top_p: float = Field(1.0, gt=0, le=1)
    min_margin: float = Field(
        0.0, ge=0, description="preference: keep a pair only when best - worst score exceeds this (ties always drop)"
    )
    min_score: float | None = Field(None, description="sft: keep a prompt only when its best score reaches this")
    revise_fn: str | None = Field(
        None,
        description="sft only: module:function or builtin:TASK that rewrites each sample before scoring (one revised "
        "text, or None to keep it, per sample): builtin:constraints lays the model's own sentences out to meet the "
        "prompt's constraints. Among equal revised scores the sample that scored higher before revision wins",
    )
    batch_size: int = Field(8, gt=0, description="Prompts per generate call (x num_samples rows)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="Precision the model samples in (default null: the model's, model.dtype). bfloat16 samples "
        "SmolLM2-135M 1.75x as fast on a CPU with AMX (and on GPUs); the samples are then the bf16 model's",
    )

    @model_validator(mode="after")
    def _check(self):
        if (self.reward_model is None) == (self.reward_fn is None):
            raise ValueError(
                "a generate stage needs exactly one of reward_model (an earlier reward stage's name or a path) "
                "or reward_fn (module:function or builtin:TASK) to score its samples"
            )
        if self.output == "preference" and self.num_samples < 2:
            raise ValueError(f"output: preference needs num_samples >= 2 to form a pair (now {self.num_samples})")
        if self.output != "sft" and self.min_score is not None:
            raise ValueError("min_score applies to output: sft (best-of-N); for pairs use min_margin")
        if self.output != "preference" and self.min_margin > 0:
            raise ValueError("min_margin applies to output: preference; for best-of-N use min_score")
        if self.output != "sft" and self.revise_fn is not None:
            raise ValueError(
                "revise_fn applies to output: sft (best-of-N on revised samples); revised pairs would both meet the "
                "instructions and tie"
            )
        return self


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


@stage_type(
    "eval",
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
        f"lower batch_size (now {spec.batch_size})",
        f"lower max_new_tokens (now {spec.max_new_tokens})",
    ],
    check=_checks(check_eval_has_two_models, check_sharding),
)
class EvalSpec(StageSpec):
    """Evaluate the input model against a reference: ground-truth reward, win rate, KL, preference accuracy,
    perplexity; writes eval.json, eval.md and training-curve plots."""

    type: Literal["eval"] = "eval"
    dataset: DatasetSpec = Field(description="Prompts (with answers when the task has a reward function)")
    preference_dataset: DatasetSpec | None = None
    sft_dataset: DatasetSpec | None = Field(None, description="Held-out SFT data for perplexity")
    nll_dataset: DatasetSpec | None = Field(
        None,
        description="A fixed held-out text (text, chat or prompt/completion rows; e.g. builtin:prose) whose NLL per "
        "token the policy and the reference get: capability loss shows as a rise (nll_change)",
    )
    reference: str = Field("base", description="base, or the name of an earlier stage")
    reward_fn: str | None = Field(None, description="module:function, the task's true reward (as in the PPO stage)")
    reward_model: str | None = Field(None, description="Name of an earlier reward stage, or a model path")
    beta: float = Field(0.1, gt=0, description="beta of the implicit DPO reward")
    num_prompts: int = Field(200, gt=0, description="The first num_prompts prompts of `dataset`")
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(
        0.0, ge=0, description="0 = greedy. The KL is always measured on responses sampled at temperature 1"
    )
    num_samples_shown: int = Field(5, ge=0)
    batch_size: int = Field(32, gt=0)
