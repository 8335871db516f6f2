"""The stage types: the recipe keys of each (its spec class) and its record (alignlab/stages/registry.py).
Light on purpose (pydantic only): `alignlab validate` reads these without importing torch. The code that runs a
stage lives beside this file, one module per stage type; a new type is that module plus a spec class here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from alignlab.schema import (
    DatasetSpec,
    LoopTrainSpec,
    RewardFnSpec,
    SamplingSpec,
    StageSpec,
    Strict,
    TrainingSamplingSpec,
    TrainSpec,
)


# Each trainer stage's `train:` (TrainSpec's keys) with the learning rate it starts from when none is given, in a
# partial `train:` section too.
class SFTTrainSpec(TrainSpec):
    learning_rate: float = Field(2e-4, gt=0, description="AdamW learning rate (peak, for a schedule)")


class DPOTrainSpec(TrainSpec):
    learning_rate: float = Field(5e-6, gt=0, description="AdamW learning rate (peak, for a schedule)")


class KTOTrainSpec(TrainSpec):
    learning_rate: float = Field(5e-6, gt=0, description="AdamW learning rate (peak, for a schedule)")


class RewardTrainSpec(TrainSpec):
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate (peak, for a schedule)")


class SFTLossSpec(Strict):
    """`nll` (default): TRL's token cross-entropy. `unlikelihood`: NLL plus `alpha` times token-level unlikelihood
    on the tokens a response already wrote (Welleck et al. 2019; alignlab/losses/sft.py), a guard against greedy
    decoding loops ("simple simple simple ..."). Its eval_loss (and perplexity) stays the plain NLL."""

    name: Literal["nll", "unlikelihood"] = Field(
        "nll", description="nll (cross-entropy) or unlikelihood (NLL + alpha UL)"
    )
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


class SFTSpec(StageSpec):
    """Supervised fine-tuning on prompt/completion, chat messages or plain text (TRL's SFTTrainer).
    The loss is on completions / assistant turns only unless `completion_only_loss: false`; `loss` picks it."""

    type: Literal["sft"] = "sft"
    dataset: DatasetSpec = Field(description="The training data (formats: docs/data-and-models.md)")
    train: SFTTrainSpec = Field(
        default_factory=SFTTrainSpec, description="Optimisation, logging and checkpoints (this stage type's defaults)"
    )
    packing: bool = Field(False, description="Pack several rows into each max_length sequence (TRL's packing)")
    completion_only_loss: bool = Field(
        True, description="Loss on completions / assistant turns only; false: on every token, prompts included"
    )
    loss: SFTLossSpec = Field(default_factory=lambda: SFTLossSpec(), description="nll, or unlikelihood with its alpha")

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
    name: str = Field("dpo", description="The loss, by name (docs/algorithms.md lists them and their parameters)")
    beta: float = Field(0.1, gt=0, description="The implicit reward's scale (the loss's own default when not given)")

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


class DPOSpec(StageSpec):
    """Direct preference optimisation and its robust variants on preference pairs (prompt, chosen, rejected).
    The reference model is the stage's input model (e.g. the SFT model), frozen."""

    type: Literal["dpo"] = "dpo"
    dataset: DatasetSpec = Field(description="The training data (formats: docs/data-and-models.md)")
    train: DPOTrainSpec = Field(
        default_factory=DPOTrainSpec, description="Optimisation, logging and checkpoints (this stage type's defaults)"
    )
    loss: PreferenceLossSpec = Field(
        default_factory=PreferenceLossSpec, description="The preference loss by name, its parameters as sibling keys"
    )
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


class KTOSpec(StageSpec):
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306) on unpaired binary feedback: prompt, completion and a
    desirable/undesirable label (thumbs up/down; format `unpaired`), on TRL's KTOTrainer. Preference pairs are read
    as such feedback too: chosen desirable, rejected undesirable (after any label flips). The reference model is the
    stage's input model (e.g. the SFT model), frozen, as for dpo."""

    type: Literal["kto"] = "kto"
    dataset: DatasetSpec = Field(description="The training data (formats: docs/data-and-models.md)")
    train: KTOTrainSpec = Field(
        default_factory=KTOTrainSpec, description="Optimisation, logging and checkpoints (this stage type's defaults)"
    )
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


class RewardSpec(StageSpec):
    """Bradley-Terry reward model (sequence-classification head) on preference pairs (prompt, chosen, rejected,
    optional per-pair `margin`). Reports held-out accuracy (eval_accuracy)."""

    type: Literal["reward"] = "reward"
    dataset: DatasetSpec = Field(description="The training data (formats: docs/data-and-models.md)")
    train: RewardTrainSpec = Field(
        default_factory=RewardTrainSpec,
        description="Optimisation, logging and checkpoints (this stage type's defaults)",
    )
    center_coef: float | None = Field(None, ge=0, description="Reward centering eta (0.01 recommended when on)")


class PPORolloutSpec(TrainingSamplingSpec):
    """How PPO samples completions from the policy."""

    batch_size: int = Field(16, gt=0, description="Prompts per PPO step (per process), one response each")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature; log-probs use logits / temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling; PPO takes only 1.0 (off): docs/stages.md")

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


class PPOTrainSpec(LoopTrainSpec):
    """PPO's optimisation: `epochs` passes over each rollout batch in minibatches; policy and value head share AdamW
    (constant learning rate)."""

    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate (constant) for policy and value head")
    epochs: int = Field(4, gt=0, description="PPO epochs over each rollout batch")
    minibatch_size: int = Field(8, gt=0, description="Responses per optimizer step (per process)")


class PPOHyperSpec(Strict):
    """PPO's objective (formulas: docs/algorithms.md, code alignlab/losses/ppo.py)."""

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


# Where the keys of the RL loops' train: section used to be (flat in the stage, or in ppo:).
_LOOP_TRAIN_MOVED = {
    key: f"train.{key}"
    for key in ("learning_rate", "weight_decay", "max_grad_norm", "epochs", "minibatch_size", "logging_steps",
                "save_steps", "save_total_limit", "report_to")
} | {"steps": "train.max_steps"}  # fmt: skip


class PPOSpec(StageSpec):
    """PPO for RLHF (alignlab's own loop on accelerate). Reward: a reward stage / model, or a Python
    function `module:function(prompts, completions) -> list[float]`."""

    MOVED = {
        **{k: v for k, v in _LOOP_TRAIN_MOVED.items() if k not in ("epochs", "minibatch_size")},
        **{f"ppo.{k}": f"train.{k}" for k in ("learning_rate", "weight_decay", "max_grad_norm", "epochs",
                                              "minibatch_size")},
    }  # fmt: skip

    SHARDABLE = True
    type: Literal["ppo"] = "ppo"
    dataset: DatasetSpec = Field(description="Prompts (format prompt: a `prompt` column; other columns ignored)")
    reward_model: str | None = Field(None, description="Name of an earlier reward stage, or a model path")
    reward_fn: str | None = Field(None, description="module:function returning one float per completion")
    train: PPOTrainSpec = Field(
        default_factory=PPOTrainSpec, description="Optimisation, logging and checkpoints (this stage type's defaults)"
    )
    rollout: PPORolloutSpec = Field(default_factory=PPORolloutSpec, description="Sampling (this stage type's defaults)")
    ppo: PPOHyperSpec = Field(
        default_factory=PPOHyperSpec, description="PPO's objective: clipping, value loss, GAE, KL"
    )

    @property
    def forward_batch_size(self) -> int:
        """Rows per no-grad rollout forward: rollout.forward_batch_size, else train.minibatch_size."""
        return self.rollout.forward_batch_size or self.train.minibatch_size

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


class GRPORolloutSpec(TrainingSamplingSpec):
    """How GRPO samples its groups: `batch_size` prompts per step, `num_samples` responses to each."""

    num_samples: int = Field(8, ge=2, description="Responses sampled per prompt (the group size G)")
    max_new_tokens: int = Field(32, gt=0, description="Maximum response length; also Dr. GRPO's constant")
    dtype: Literal["bfloat16", "float16"] | None = Field(
        None,
        description="Sample from a copy of the policy in this precision, its adapter merged and refreshed before "
        "each step (alignlab/rl/sampler.py); training stays float32 and the old log-probs come from a float32 "
        "forward. bfloat16 samples SmolLM2-135M ~1.75x as fast on a CPU with AMX (and on GPUs). Default: sample "
        "with the policy itself",
    )


class GRPOTrainSpec(LoopTrainSpec):
    learning_rate: float = Field(1e-6, gt=0, description="AdamW learning rate (constant)")
    minibatch_size: int | None = Field(
        None,
        gt=0,
        description="Responses per optimizer step (per process), a multiple of rollout.num_samples; default: all "
        "of a step's responses",
    )


class GRPOSpec(StageSpec):
    """Critic-free RL on rewards a program (or a reward model) gives: GRPO, Dr. GRPO, RLOO and DAPO's fixes
    (alignlab's own loop; formulas: docs/algorithms.md, code: alignlab/losses/grpo.py, alignlab/rl/grpo.py)."""

    MOVED = {
        **_LOOP_TRAIN_MOVED,
        **{k: f"rollout.{k}" for k in ("temperature", "max_new_tokens", "missing_eos_penalty", "forward_batch_size",
                                       "recompute_logprobs")},
        "num_generations": "rollout.num_samples",
        "prompts_per_step": "rollout.batch_size",
        "sample_dtype": "rollout.dtype",
    }  # fmt: skip

    SHARDABLE = True
    type: Literal["grpo"] = "grpo"
    dataset: DatasetSpec = Field(description="Prompts (format prompt: a `prompt` column; other columns ignored)")
    reward_fn: str | list[RewardFnSpec] | None = Field(
        None,
        description="module:function or builtin:TASK, or a list of weighted components "
        "[{fn: builtin:constraints, weight: 1.0}, {fn: m:f, weight: 0.2}] (each logged as reward/<fn>)",
    )
    reward_model: str | None = Field(None, description="Name of an earlier reward stage, or a model path")
    reward_model_weight: float = Field(1.0, description="Weight of the reward model's score in the summed reward")
    train: GRPOTrainSpec = Field(
        default_factory=GRPOTrainSpec, description="Optimisation, logging and checkpoints (this stage type's defaults)"
    )
    rollout: GRPORolloutSpec = Field(
        default_factory=GRPORolloutSpec, description="Sampling (this stage type's defaults)"
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

    @property
    def aggregation(self) -> str:
        """loss_agg, or its default for the advantage (Dr. GRPO pairs its advantage with the constant)."""
        if self.loss_agg is not None:
            return self.loss_agg
        return "constant" if self.advantage == "dr_grpo" else "sequence_mean"

    @property
    def responses_per_step(self) -> int:
        """Per process."""
        return self.rollout.batch_size * self.rollout.num_samples

    @model_validator(mode="after")
    def _check(self):
        if self.reward_fn is None and self.reward_model is None:
            raise ValueError(
                "a grpo stage needs a reward: reward_fn (module:function, builtin:TASK, or a list of "
                "{fn, weight}) and/or reward_model (an earlier reward stage's name or a path)"
            )
        if isinstance(self.reward_fn, list) and not self.reward_fn:
            raise ValueError("reward_fn is an empty list; name at least one {fn: module:function, weight: 1.0}")
        if self.stop_if is not None and self.train.save_steps is None:
            raise ValueError(
                "stop_if ends the stage with its last good checkpoint, and no checkpoints are written: set "
                "train.save_steps (e.g. 10), or remove stop_if"
            )
        size, minibatch = self.rollout.num_samples, self.train.minibatch_size
        if minibatch is not None and minibatch % size:
            raise ValueError(
                f"train.minibatch_size = {minibatch} is not a multiple of rollout.num_samples = {size}: a minibatch "
                f"holds whole groups (each group's prompt is computed once). Use e.g. {max(1, minibatch // size) * size}"
            )
        limits = self.stop_if
        if limits is not None and limits.repetition is None and limits.kl is None and limits.greedy_repetition is None:
            raise ValueError("stop_if sets no limit; give repetition (e.g. 0.3), kl (e.g. 20) and/or greedy_repetition")
        if self.rollout.dtype is not None and self.rollout.recompute_logprobs is False:
            raise ValueError(
                f"rollout.dtype: {self.rollout.dtype} samples from a low-precision copy, whose log-probs are not the "
                "float32 policy's the ratios start from: remove rollout.recompute_logprobs: false (or rollout.dtype)"
            )
        return self


class GenerateRolloutSpec(SamplingSpec):
    """How a generate stage samples: `num_samples` completions to each prompt, `batch_size` prompts per call."""

    num_samples: int = Field(4, ge=1, description="Completions sampled per prompt")
    batch_size: int = Field(8, gt=0, description="Prompts per generate call (x num_samples rows)")
    max_new_tokens: int = Field(64, gt=0, description="Maximum completion length; generation also stops at EOS")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (1.0: the model's own distribution)")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (1.0: off)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="Precision the model samples in (default null: the model's, model.dtype). bfloat16 samples "
        "SmolLM2-135M 1.75x as fast on a CPU with AMX (and on GPUs); the samples are then the bf16 model's",
    )


class GenerateSpec(StageSpec):
    """Sample `rollout.num_samples` completions per prompt from the input model, score them with `reward_fn` or
    `reward_model`, and write a dataset a later stage reads as `dataset: {path: "stage:NAME"}`: preference pairs
    (best vs worst per prompt; ties dropped) or best-of-N SFT data (rejection sampling)."""

    MOVED = {
        k: f"rollout.{k}" for k in ("num_samples", "max_new_tokens", "temperature", "top_p", "batch_size", "dtype")
    }

    SHARDABLE = True
    type: Literal["generate"] = "generate"
    dataset: DatasetSpec = Field(description="Prompts (format prompt: a `prompt` column; other columns ignored)")
    reward_fn: str | None = Field(None, description="module:function or builtin:TASK, one float per completion")
    reward_model: str | None = Field(None, description="Name of an earlier reward stage, or a model path")
    output: Literal["preference", "sft"] = Field(
        "preference",
        description="preference: (prompt, chosen = best, rejected = worst) per prompt whose scores differ; sft: "
        "(prompt, completion = best of rollout.num_samples)",
    )
    rollout: GenerateRolloutSpec = Field(
        default_factory=GenerateRolloutSpec, description="Sampling (this stage type's defaults)"
    )
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

    @model_validator(mode="after")
    def _check(self):
        if (self.reward_model is None) == (self.reward_fn is None):
            raise ValueError(
                "a generate stage needs exactly one of reward_model (an earlier reward stage's name or a path) "
                "or reward_fn (module:function or builtin:TASK) to score its samples"
            )
        if self.output == "preference" and self.rollout.num_samples < 2:
            raise ValueError(
                f"output: preference needs rollout.num_samples >= 2 to form a pair (now {self.rollout.num_samples})"
            )
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


class EvalRolloutSpec(SamplingSpec):
    """How an eval stage decodes the answers it scores (policy and reference alike)."""

    batch_size: int = Field(32, gt=0, description="Prompts per generate call, and rows per scoring forward")
    temperature: float = Field(
        0.0, ge=0, description="0 = greedy. The KL is always measured on responses sampled at temperature 1"
    )


class EvalSpec(StageSpec):
    """Evaluate the input model against a reference: ground-truth reward, win rate, KL, preference accuracy,
    perplexity; writes eval.json, eval.md and training-curve plots."""

    MOVED = {k: f"rollout.{k}" for k in ("max_new_tokens", "temperature", "batch_size")}

    SHARDABLE = True
    type: Literal["eval"] = "eval"
    dataset: DatasetSpec = Field(description="Prompts (with answers when the task has a reward function)")
    preference_dataset: DatasetSpec | None = Field(
        None, description="Held-out preference pairs: the implicit reward's pair accuracy (and a reward model's)"
    )
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
    rollout: EvalRolloutSpec = Field(
        default_factory=EvalRolloutSpec, description="Sampling (this stage type's defaults)"
    )
    num_samples_shown: int = Field(5, ge=0, description="Side-by-side answers of policy and reference in eval.md")


class DistillLossSpec(Strict):
    """The divergence a distill stage pulls the student's next-token distributions toward the teacher's with,
    per completion token over the whole vocabulary (alignlab/losses/distill.py; formulas: docs/algorithms.md)."""

    name: Literal["forward_kl", "reverse_kl", "jsd"] | None = Field(
        None,
        description="forward_kl: KL(teacher || student) (Hinton et al. 2015; mean-seeking); reverse_kl: "
        "KL(student || teacher) (mode-seeking); jsd: GKD's generalized Jensen-Shannon divergence with `beta`. "
        "Default: forward_kl for mode offline, reverse_kl for mode on_policy",
    )
    beta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="jsd only: the teacher's weight in the mixture (GKD's beta; 0.5, the default: the symmetric JSD; "
        "toward 0 it behaves as forward_kl, toward 1 as reverse_kl)",
    )
    temperature: float = Field(
        1.0, gt=0, description="Both distributions are softmax(logits / temperature); the loss is scaled by its square"
    )
    nll_alpha: float = Field(
        0.0, ge=0, description="Adds nll_alpha x the student's NLL of the data's completions on offline steps (0: none)"
    )

    @model_validator(mode="after")
    def _beta_only_with_jsd(self):
        if self.beta is not None and self.name != "jsd":
            raise ValueError(
                f"loss.beta weighs the teacher's side of the generalized JSD: set loss.name: jsd, or drop beta "
                f"(loss.name is {self.name or 'the mode default'})"
            )
        return self

    @property
    def jsd_beta(self) -> float:
        return 0.5 if self.beta is None else self.beta


class DistillTrainSpec(LoopTrainSpec):
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate (constant)")
    minibatch_size: int | None = Field(
        None, gt=0, description="Rows per optimizer step (per process); default: all of a step's rows"
    )


class DistillRolloutSpec(SamplingSpec):
    """What a distill step trains on: `batch_size` rows, their completions sampled by the student (on-policy steps)
    or read from the data (offline steps)."""

    batch_size: int = Field(
        8, gt=0, description="Rows per step (per process): prompts the student answers, or rows of the data"
    )
    max_new_tokens: int = Field(
        64,
        gt=0,
        description="Longest completion, in tokens: sampled (generation also stops at an end token), or read from "
        "the data and cut there",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="Sampling temperature of on-policy steps (1: the student's own distribution); the loss's own "
        "temperature is loss.temperature",
    )


class DistillSpec(StageSpec):
    """Knowledge distillation: the student (the stage's input model, trained: full or adapter) learns the
    teacher's next-token distributions, on the data's completions (mode offline) or on its own samples (mode
    on_policy, GKD), on alignlab's own loop (alignlab/rl/distill.py). Teacher and student must share a tokenizer."""

    type: Literal["distill"] = "distill"
    teacher: str = Field(
        description="The model to learn from: an earlier stage's name, builtin:NAME, a local model folder or a hub "
        "id. It must use the student's tokenizer (the teacher scores the student's token ids)"
    )
    mode: Literal["offline", "on_policy"] = Field(
        "offline",
        description="offline: the teacher scores the data's completions (prompt/completion or chat rows); on_policy: "
        "the student samples completions to the prompts and the teacher scores those (GKD)",
    )
    on_policy_share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="mode on_policy: the share of steps whose completions the student samples (GKD's lambda, TRL's "
        "lmbda; default 1); the other steps are offline, on the data's completions",
    )
    dataset: DatasetSpec = Field(
        description="Prompts with completions (prompt/completion or chat rows), or prompts alone for mode on_policy "
        "with on_policy_share 1"
    )
    loss: DistillLossSpec = Field(default_factory=DistillLossSpec)
    train: DistillTrainSpec = Field(
        default_factory=DistillTrainSpec,
        description="Optimisation, logging and checkpoints (this stage type's defaults)",
    )
    rollout: DistillRolloutSpec = Field(
        default_factory=DistillRolloutSpec, description="Sampling (this stage type's defaults)"
    )

    @property
    def loss_name(self) -> str:
        """loss.name, or the mode's default (forward KL on the data, reverse KL on the student's own samples)."""
        return self.loss.name or ("forward_kl" if self.mode == "offline" else "reverse_kl")

    @property
    def on_policy_rate(self) -> float:
        """The share of on-policy steps: 0 for mode offline, on_policy_share (default 1) for mode on_policy."""
        if self.mode == "offline":
            return 0.0
        return 1.0 if self.on_policy_share is None else self.on_policy_share

    @property
    def needs_completions(self) -> bool:
        """Whether some steps train on the data's completions."""
        return self.on_policy_rate < 1.0

    @model_validator(mode="after")
    def _check(self):
        if self.mode == "offline" and self.on_policy_share is not None:
            raise ValueError(
                f"on_policy_share: {self.on_policy_share} sets the share of on-policy steps, and mode offline takes "
                "none: set mode: on_policy, or remove on_policy_share"
            )
        if self.teacher == self.name:
            raise ValueError(f"teacher: '{self.teacher}' is this stage itself; name an earlier stage or a model")
        if self.teacher == "base":
            raise ValueError(
                "teacher: base would distill the base model into the student it starts from; name the teacher: an "
                "earlier stage, builtin:NAME, a model folder or a hub id"
            )
        return self
