"""The evaluator: policy and reference on the same prompts; what each number in eval.json is: alignlab/evaluation
(the package docstring)."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from alignlab.console import progress
from alignlab.contract import StageOutput
from alignlab.data import build_datasets, prompt_text
from alignlab.generation import end_token_ids, generate
from alignlab.logprobs import completion_logps, sequence_logprobs
from alignlab.models import load_frozen_model, load_tokenizer, output_tokenizer_dir, resolve_base
from alignlab.recipe import Recipe
from alignlab.rewards import load_reward_fn, load_reward_model, reward_fn_scores, reward_model_scores

log = logging.getLogger("alignlab")

METRICS_DIR = Path(__file__).parents[1] / "metrics"
EVAL_KEYS = (
    "policy",
    "reference",
    "num_prompts",
    "true_reward",
    "true_reward_reference",
    "mean_score",
    "mean_score_reference",
    "win_rate",
    "win_rate_by",
    "kl",
    "preference_accuracy",
    "preference_margin",
    "reward_model_accuracy",
    "reward_model_margin",
    "perplexity",
    "perplexity_reference",
    "samples",
    "settings",
)
SAMPLE_KEYS = ("prompt", "policy", "reference", "policy_reward", "reference_reward")


@functools.cache
def load_metric(name: str):
    """An `evaluate` module from alignlab/metrics/<name>/<name>.py (a local path: never the hub)."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)


def compute_metric(name: str, **inputs) -> dict:
    return load_metric(name).compute(**inputs)


def describe(source: StageOutput | None, recipe: Recipe) -> str:
    if source is None:
        return f"base ({recipe.model.name_or_path})"
    return f"{source.stage} ({source.kind}: {source.path})"


def _same(a: StageOutput | None, b: StageOutput | None) -> bool:
    key = lambda o: None if o is None else (o.kind, o.path, o.base)  # noqa: E731
    return key(a) == key(b)


class ModelPair:
    """Policy and reference. One model when they are the same checkpoint; one backbone with the adapter
    switched off for the reference when the policy is an adapter over the reference's weights."""

    def __init__(self, recipe: Recipe, policy: StageOutput | None, reference: StageOutput | None):
        self.policy = load_frozen_model(recipe, policy)
        ref_weights = resolve_base(recipe) if reference is None else reference.path
        self.adapter_off = policy is not None and policy.kind == "adapter" and policy.base == ref_weights
        self.adapter_off = self.adapter_off and (reference is None or reference.kind == "full")
        shared = _same(policy, reference) or self.adapter_off
        self.reference = self.policy if shared else load_frozen_model(recipe, reference)

    @contextlib.contextmanager
    def ref(self) -> Iterator[Any]:
        with self.policy.disable_adapter() if self.adapter_off else contextlib.nullcontext():
            yield self.reference


# ------------------------------------------------------------------------------------------------ tokenisation


def tokenize_completion(tokenizer, prompt, completion) -> tuple[list[int], int]:
    """(token ids of prompt + completion, number of prompt tokens), as TRL's SFT/DPO trainers tokenise: the
    completion starts where the tokenised prompt and prompt + completion diverge."""
    if isinstance(prompt, list):
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        p = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)
        p, full = p["input_ids"], full["input_ids"]
    else:
        p, full = tokenizer(prompt)["input_ids"] if prompt else [], tokenizer(prompt + completion)["input_ids"]
    n = 0
    while n < min(len(p), len(full)) and p[n] == full[n]:
        n += 1
    return full, n


def split_last_turn(prompt, completion):
    """(prompt, completion) with an implicit prompt made explicit: a chat given without a prompt scores its last
    assistant turn (the turns before it are the prompt); a plain text without a prompt is scored whole."""
    if prompt or not isinstance(completion, list):
        return prompt or "", completion
    last = max(i for i, m in enumerate(completion) if m["role"] == "assistant")
    return completion[:last], completion[last : last + 1]


def _sft_pair(row: dict):
    """(prompt, completion) of an SFT row: prompt/completion, a chat (the last assistant turn) or a text."""
    if "completion" in row:
        return row["prompt"], row["completion"]
    return split_last_turn(None, row["messages"] if "messages" in row else row["text"])


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ------------------------------------------------------------------------------------------------ the evaluator


@torch.no_grad()
def evaluate_models(
    recipe: Recipe,
    spec,
    policy: StageOutput | None,
    reference: StageOutput | None,
    *,
    reward_model: StageOutput | None = None,
) -> dict:
    """Every metric of the module docstring for `policy` against `reference`, as the eval.json dict.
    `spec` is an EvalSpec (alignlab/stages/specs.py)."""
    tokenizer = load_tokenizer(recipe, output_tokenizer_dir(recipe, policy))
    chat = tokenizer.chat_template is not None
    rows = build_datasets(spec.dataset, recipe, "eval", chat, with_eval=False)[0]
    rows = [rows[i] for i in range(min(spec.num_prompts, len(rows)))]
    prompts = [r["prompt"] for r in rows]
    reward_fn = load_reward_fn(spec.reward_fn) if spec.reward_fn else None
    res: dict[str, Any] = dict.fromkeys(EVAL_KEYS)
    res.update(policy=describe(policy, recipe), reference=describe(reference, recipe), num_prompts=len(rows))
    res["settings"] = {
        "temperature": spec.temperature,
        "max_new_tokens": spec.max_new_tokens,
        "beta": spec.beta,
        "seed": recipe.seed,
    }
    models = ModelPair(recipe, policy, reference)

    # Completions of the same prompts, and the log-ratio on the policy's own completions.
    pol_texts, ref_texts, pol_logps, ref_logps = [], [], [], []
    # Both models stop at (and are scored up to) the same end tokens: those of either.
    end_ids = list(dict.fromkeys(end_token_ids(tokenizer, models.policy) + end_token_ids(tokenizer, models.reference)))
    n_batches = -(-len(prompts) // spec.batch_size)
    batches = progress(_batches(prompts, spec.batch_size), total=n_batches, desc="eval: generating", unit="batch")
    for i, batch in enumerate(batches):
        gen = dict(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, generator_seed=recipe.seed + i)
        gen.update(end_ids=end_ids)
        pol = generate(models.policy, tokenizer, batch, **gen)
        with models.ref() as ref_model:
            ref = generate(ref_model, tokenizer, batch, **gen)
            start = pol.prompt_ids.shape[1]
            ref_lp = sequence_logprobs(ref_model, pol.input_ids, pol.attention_mask, start)  # [B, C]
        pol_lp = sequence_logprobs(models.policy, pol.input_ids, pol.attention_mask, start)  # [B, C]
        pol_logps += (pol_lp * pol.completion_mask).sum(1).tolist()
        ref_logps += (ref_lp * pol.completion_mask).sum(1).tolist()
        pol_texts += pol.texts
        ref_texts += ref.texts
    res["kl"] = compute_metric("kl_divergence", policy_logps=pol_logps, reference_logps=ref_logps)["kl"]

    # Implicit DPO reward on held-out preference pairs.
    if spec.preference_dataset is not None:
        pairs = build_datasets(spec.preference_dataset, recipe, "dpo", chat, with_eval=False)[0]
        chosen = [tokenize_completion(tokenizer, *split_last_turn(r.get("prompt"), r["chosen"])) for r in pairs]
        rejected = [tokenize_completion(tokenizer, *split_last_turn(r.get("prompt"), r["rejected"])) for r in pairs]
        r_c = spec.beta * _log_ratio(models, chosen, tokenizer.pad_token_id, spec.batch_size)
        r_r = spec.beta * _log_ratio(models, rejected, tokenizer.pad_token_id, spec.batch_size)
        acc = compute_metric("preference_accuracy", chosen_rewards=r_c.tolist(), rejected_rewards=r_r.tolist())
        res["preference_accuracy"], res["preference_margin"] = acc["accuracy"], acc["margin"]

    # Perplexity on held-out SFT data.
    if spec.sft_dataset is not None:
        sft = build_datasets(spec.sft_dataset, recipe, "sft", chat, with_eval=False)[0]
        examples = [tokenize_completion(tokenizer, *_sft_pair(r)) for r in sft]
        res["perplexity"] = _perplexity(models.policy, examples, tokenizer.pad_token_id, spec.batch_size)
        with models.ref() as ref_model:
            res["perplexity_reference"] = _perplexity(ref_model, examples, tokenizer.pad_token_id, spec.batch_size)
    del models

    # Rewards: the task's ground truth, and a reward model's scores.
    pol_rewards = ref_rewards = None
    if reward_fn is not None:
        pol_rewards = reward_fn_scores(reward_fn, prompts, pol_texts)
        ref_rewards = reward_fn_scores(reward_fn, prompts, ref_texts)
        res["true_reward"] = compute_metric("mean_reward", rewards=pol_rewards)["mean_reward"]
        res["true_reward_reference"] = compute_metric("mean_reward", rewards=ref_rewards)["mean_reward"]
        res["win_rate_by"] = "reward_fn"
    if reward_model is not None:
        rm, rm_tok = load_reward_model(recipe, reward_model)
        pol_rewards = reward_model_scores(rm, rm_tok, prompts, pol_texts, spec.batch_size).tolist()
        ref_rewards = reward_model_scores(rm, rm_tok, prompts, ref_texts, spec.batch_size).tolist()
        res["mean_score"] = compute_metric("mean_reward", rewards=pol_rewards)["mean_reward"]
        res["mean_score_reference"] = compute_metric("mean_reward", rewards=ref_rewards)["mean_reward"]
        res["win_rate_by"] = "reward_model"
        if spec.preference_dataset is not None:
            pairs = build_datasets(spec.preference_dataset, recipe, "dpo", chat, with_eval=False)[0]
            p = [r.get("prompt") or "" for r in pairs]  # an implicit prompt stays inside chosen / rejected
            s_c = reward_model_scores(rm, rm_tok, p, [r["chosen"] for r in pairs], spec.batch_size).tolist()
            s_r = reward_model_scores(rm, rm_tok, p, [r["rejected"] for r in pairs], spec.batch_size).tolist()
            acc = compute_metric("preference_accuracy", chosen_rewards=s_c, rejected_rewards=s_r)
            res["reward_model_accuracy"], res["reward_model_margin"] = acc["accuracy"], acc["margin"]
    if pol_rewards is not None:
        wins = compute_metric("win_rate", policy_scores=pol_rewards, reference_scores=ref_rewards)
        res["win_rate"] = wins["win_rate"]

    res["samples"] = [
        {
            "prompt": prompt_text(prompts[i]),
            "policy": pol_texts[i],
            "reference": ref_texts[i],
            "policy_reward": pol_rewards[i] if pol_rewards else None,
            "reference_reward": ref_rewards[i] if ref_rewards else None,
        }
        for i in range(min(spec.num_samples_shown, len(rows)))
    ]
    return res


def _log_ratio(models: ModelPair, examples, pad_id: int, batch_size: int) -> torch.Tensor:
    """log pi(y|x) - log pi_ref(y|x) [N], summed over completion tokens."""
    out = []
    for batch in _batches(examples, batch_size):
        pol, _ = completion_logps(models.policy, batch, pad_id)
        with models.ref() as ref_model:
            ref, _ = completion_logps(ref_model, batch, pad_id)
        out.append(pol.double() - ref.double())
    return torch.cat(out)


def _perplexity(model, examples, pad_id: int, batch_size: int) -> float:
    nll, count = [], []
    for batch in _batches(examples, batch_size):
        logps, n = completion_logps(model, batch, pad_id)
        nll += (-logps).tolist()
        count += n.tolist()
    return compute_metric("perplexity", nll=nll, num_tokens=count)["perplexity"]


def numeric(results: dict) -> dict[str, float]:
    """The numeric metrics of an eval.json dict (what a StageOutput records)."""
    return {k: v for k, v in results.items() if isinstance(v, int | float) and not isinstance(v, bool)}
