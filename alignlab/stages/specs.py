"""The stage types: the recipe keys of each (its spec class) and its record (alignlab/stages/registry.py).
Light on purpose (pydantic only): `alignlab validate` reads these without importing torch. The code that runs a
stage lives beside this file, one module per stage type; a new type is that module plus a spec class here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from alignlab.schema import DatasetSpec, StageSpec, Strict, TrainSpec
from alignlab.stages.registry import input_stage_name, stage_type

# Data formats (alignlab/data/formats.py) by what a stage reads.
CHAT_OR_TEXT = ("messages", "prompt_completion", "text")
PAIRS = ("preference",)
PROMPTS = ("prompt",)


def trainer_memory_knobs(spec) -> list[str]:
    t = spec.train
    return [
        f"lower train.per_device_batch_size (now {t.per_device_batch_size}) and raise "
        f"train.gradient_accumulation_steps (now {t.gradient_accumulation_steps}) by the same factor (same batch)",
        f"lower train.max_length (now {t.max_length})",
    ]


@stage_type(
    "sft",
    runner="alignlab.stages.sft",
    datasets={"dataset": CHAT_OR_TEXT},
    trl_config="SFTConfig",
    memory_knobs=trainer_memory_knobs,
)
class SFTSpec(StageSpec):
    """Supervised fine-tuning on prompt/completion, chat messages or plain text (TRL's SFTTrainer).
    The loss is on completions / assistant turns only unless `completion_only_loss: false`."""

    type: Literal["sft"] = "sft"
    dataset: DatasetSpec
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(learning_rate=2e-4))
    packing: bool = False
    completion_only_loss: bool = True


class PreferenceLossSpec(Strict):
    """A preference loss chosen by name, with its parameters as sibling keys:
    `{name: rdpo, beta: 0.1, eps: 0.2}`. Names and parameters: alignlab/losses/preference.py."""

    model_config = ConfigDict(extra="allow")
    name: str = "dpo"
    beta: float = Field(0.1, gt=0)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

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
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling; PPO accepts only 1.0 (off): see README")
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
    """PPO optimisation (formulas: docs ALGORITHMS.md, code alignlab/losses/ppo.py)."""

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


@stage_type(
    "ppo",
    runner="alignlab.stages.ppo",
    datasets={"dataset": PROMPTS},
    references={"reward_model": "reward"},
    needs_whole_model="the ppo stage runs alignlab's own loop, which generates with the whole (unwrapped) policy "
    "and prepares no dataloader",
    memory_knobs=lambda spec: [
        f"lower rollout.batch_size (now {spec.rollout.batch_size}) and ppo.minibatch_size "
        f"(now {spec.ppo.minibatch_size})",
        f"lower rollout.max_new_tokens (now {spec.rollout.max_new_tokens})",
    ],
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
    datasets={"dataset": PROMPTS, "preference_dataset": PAIRS, "sft_dataset": CHAT_OR_TEXT},
    writes_model=False,
    references={"reward_model": "reward", "reference": None},
    memory_knobs=lambda spec: [
        f"lower batch_size (now {spec.batch_size})",
        f"lower max_new_tokens (now {spec.max_new_tokens})",
    ],
    check=check_eval_has_two_models,
)
class EvalSpec(StageSpec):
    """Evaluate the input model against a reference: ground-truth reward, win rate, KL, preference accuracy,
    perplexity; writes eval.json, eval.md and training-curve plots."""

    type: Literal["eval"] = "eval"
    dataset: DatasetSpec = Field(description="Prompts (with answers when the task has a reward function)")
    preference_dataset: DatasetSpec | None = None
    sft_dataset: DatasetSpec | None = Field(None, description="Held-out SFT data for perplexity")
    reference: str = Field("base", description="base, or the name of an earlier stage")
    reward_fn: str | None = Field(None, description="module:function, the task's true reward (as in the PPO stage)")
    reward_model: str | None = Field(None, description="Name of an earlier reward stage, or a model path")
    beta: float = Field(0.1, gt=0, description="beta of the implicit DPO reward")
    num_prompts: int = Field(200, gt=0, description="The first num_prompts prompts of `dataset`")
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(0.0, ge=0, description="0 = greedy; the KL estimate is unbiased only at 1")
    num_samples_shown: int = Field(5, ge=0)
    batch_size: int = Field(32, gt=0)
