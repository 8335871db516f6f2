"""The evaluator: policy and reference on the same prompts; what each number in eval.json is: alignlab/evaluation
(the package docstring)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from alignlab.console import progress
from alignlab.contract import StageOutput
from alignlab.data import build_datasets, prompt_text
from alignlab.evaluation import stats
from alignlab.evaluation.repetition import distinct_n, repeated_ngram_share
from alignlab.generation import end_token_ids, generate
from alignlab.logprobs import completion_logits, completion_logps
from alignlab.models import load_frozen_model, load_tokenizer, output_tokenizer_dir, resolve_base
from alignlab.recipe import Recipe
from alignlab.rewards import (
    load_reward_fn,
    load_reward_model,
    load_reward_report,
    reward_fn_scores,
    reward_model_scores,
)

log = logging.getLogger("alignlab")

METRICS_DIR = Path(__file__).parents[1] / "metrics"
# Measured numbers: each has `<key>_stderr` and `<key>_ci` (95%) beside it in eval.json.
MEASURED_KEYS = (
    "true_reward",
    "true_reward_reference",
    "true_reward_diff",
    "mean_score",
    "mean_score_reference",
    "mean_score_diff",
    "strict_accuracy",
    "strict_accuracy_reference",
    "strict_accuracy_diff",
    "instruction_accuracy",
    "instruction_accuracy_reference",
    "win_rate",
    "kl",
    "kl_exact",
    "repetition",
    "repetition_reference",
    "repetition_diff",
    "distinct_2",
    "distinct_2_reference",
    "distinct_2_diff",
    "response_length",
    "response_length_reference",
    "response_length_diff",
    "preference_accuracy",
    "preference_margin",
    "reward_model_accuracy",
    "reward_model_margin",
    "perplexity",
    "perplexity_reference",
    "nll",
    "nll_reference",
    "nll_diff",
)
EVAL_KEYS = (
    "policy",
    "reference",
    "num_prompts",
    *MEASURED_KEYS,
    "win_rate_by",
    "nll_change",
    "nll_tokens",
    "per_kind",
    *(f"{k}{suffix}" for k in MEASURED_KEYS for suffix in ("_stderr", "_ci")),
    "samples",
    "per_prompt",
    "per_pair",
    "settings",
)
UNIT = {"repetition": (0.0, 1.0), "distinct_2": (0.0, 1.0)}  # measures whose values lie in [0, 1] by definition
SAMPLE_KEYS = ("prompt", "policy", "reference", "policy_reward", "reference_reward")


@functools.cache
def load_metric(name: str):
    """An `evaluate` module from alignlab/metrics/<name>/<name>.py (a local path: never the hub): the eval numbers
    for users of the `evaluate` library. Each module calls stats.py, where its number is computed, as the evaluator
    does; the evaluator itself does not go through them."""
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

    def __init__(self, recipe: Recipe, policy: StageOutput | None, reference: StageOutput | None, sharding=None):
        self.policy = load_frozen_model(recipe, policy, move=sharding is None)
        ref_weights = resolve_base(recipe) if reference is None else reference.path
        self.adapter_off = policy is not None and policy.kind == "adapter" and policy.base == ref_weights
        self.adapter_off = self.adapter_off and (reference is None or reference.kind == "full")
        shared = _same(policy, reference) or self.adapter_off
        self.reference = self.policy if shared else load_frozen_model(recipe, reference, move=sharding is None)
        self.sharding = sharding  # alignlab.parallel.Sharding: each model sharded over the processes
        if sharding is not None:
            for model in {id(m): m for m in (self.policy, self.reference)}.values():
                sharding.shard(model)

    def sampling(self, model):
        """The context a generate() call on `model` runs in: its weights gathered (sharded), else nothing."""
        return self.sharding.gathered(model) if self.sharding is not None else contextlib.nullcontext()

    @property
    def synced(self) -> bool:
        return self.sharding is not None and self.sharding.synced

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
    sharding=None,
) -> dict:
    """Every metric of the module docstring for `policy` against `reference`, as the eval.json dict.
    `spec` is an EvalSpec (alignlab/stages/specs.py). `sharding` (alignlab.parallel.Sharding): the models sharded over
    the processes, every one of which runs this same evaluation (each forward gathers the weights from all)."""
    tokenizer = load_tokenizer(recipe, output_tokenizer_dir(recipe, policy))
    chat = tokenizer.chat_template is not None
    rows = build_datasets(spec.dataset, recipe, "eval", chat, with_eval=False)[0]
    rows = [rows[i] for i in range(min(spec.num_prompts, len(rows)))]
    prompts = [r["prompt"] for r in rows]
    reward_fn = load_reward_fn(spec.reward_fn) if spec.reward_fn else None
    report_fn = load_reward_report(spec.reward_fn) if spec.reward_fn else None
    res: dict[str, Any] = dict.fromkeys(EVAL_KEYS)
    res.update(policy=describe(policy, recipe), reference=describe(reference, recipe), num_prompts=len(rows))
    res["settings"] = {
        "temperature": spec.rollout.temperature,
        "max_new_tokens": spec.rollout.max_new_tokens,
        "beta": spec.beta,
        "seed": recipe.seed,
        "kl_temperature": 1.0,
        "confidence": 0.95,
        # Which prompts, in order: `alignlab eval A B` pairs two checkpoints' per-prompt numbers only when equal.
        "prompts_sha256": hashlib.sha256(json.dumps([prompt_text(p) for p in prompts]).encode()).hexdigest(),
    }
    per_prompt: dict[str, list] = {}
    models = ModelPair(recipe, policy, reference, sharding)

    # Completions of the same prompts (sampled ones from per-prompt seeds, so a prompt's sample does not depend on
    # its batch, and two checkpoints evaluated alike share their random numbers), and KL(pi || ref) on responses
    # sampled from the policy at temperature 1 (the eval's own samples when they are drawn at temperature 1).
    pol_texts, ref_texts, pol_len, ref_len, kl_k1, kl_exact = [], [], [], [], [], []
    # Both models stop at (and are scored up to) the same end tokens: those of either.
    end_ids = list(dict.fromkeys(end_token_ids(tokenizer, models.policy) + end_token_ids(tokenizer, models.reference)))
    index_batches = list(_batches(list(range(len(prompts))), spec.rollout.batch_size))
    for idx in progress(index_batches, total=len(index_batches), desc="eval: generating", unit="batch"):
        batch = [prompts[i] for i in idx]
        gen = dict(max_new_tokens=spec.rollout.max_new_tokens, temperature=spec.rollout.temperature, end_ids=end_ids)
        gen["synced"] = models.synced
        if spec.rollout.temperature > 0:
            gen["row_seeds"] = [row_seed(recipe.seed, "eval", i) for i in idx]
        with models.sampling(models.policy):
            pol = generate(models.policy, tokenizer, batch, **gen)
        with models.ref() as ref_model, models.sampling(ref_model):
            ref = generate(ref_model, tokenizer, batch, **gen)
        if spec.rollout.temperature == 1.0:
            kl_roll = pol
        else:
            kl_seeds = [row_seed(recipe.seed, "kl", i) for i in idx]
            with models.sampling(models.policy):
                kl_roll = generate(
                    models.policy, tokenizer, batch, **{**gen, "temperature": 1.0, "row_seeds": kl_seeds}
                )
        k1, exact = _kl_along_samples(models, kl_roll)
        kl_k1 += k1
        kl_exact += exact
        pol_texts += pol.texts
        ref_texts += ref.texts
        pol_len += (pol.completion_mask.sum(1) - pol.ended.long()).tolist()
        ref_len += (ref.completion_mask.sum(1) - ref.ended.long()).tolist()
    for key, values in (("kl", kl_k1), ("kl_exact", kl_exact)):
        summary = stats.mean(values)
        res[key] = summary["value"]
        _put(res, key, summary)
    per_prompt.update(kl=kl_k1, kl_exact=kl_exact)

    # Degeneration: repeated word 3-grams, distinct word bigrams and length (tokens before the end token).
    measures = {
        "repetition": lambda texts, _: [repeated_ngram_share(t, 3) for t in texts],
        "distinct_2": lambda texts, _: [distinct_n(t, 2) for t in texts],
        "response_length": lambda _, lengths: [float(n) for n in lengths],
    }
    for key, measure in measures.items():
        _paired(res, per_prompt, key, measure(pol_texts, pol_len), measure(ref_texts, ref_len))

    # Implicit DPO reward on held-out preference pairs.
    if spec.preference_dataset is not None:
        pairs = build_datasets(spec.preference_dataset, recipe, "dpo", chat, with_eval=False)[0]
        chosen = [tokenize_completion(tokenizer, *split_last_turn(r.get("prompt"), r["chosen"])) for r in pairs]
        rejected = [tokenize_completion(tokenizer, *split_last_turn(r.get("prompt"), r["rejected"])) for r in pairs]
        r_c = spec.beta * _log_ratio(models, chosen, tokenizer.pad_token_id, spec.rollout.batch_size)
        r_r = spec.beta * _log_ratio(models, rejected, tokenizer.pad_token_id, spec.rollout.batch_size)
        _pair_stats(res, "preference", r_c.tolist(), r_r.tolist())

    # Perplexity on held-out SFT data, NLL per token on a fixed held-out text.
    if spec.sft_dataset is not None:
        sft = build_datasets(spec.sft_dataset, recipe, "sft", chat, with_eval=False)[0]
        nll, nll_ref, count = _nll_pair(
            models, [tokenize_completion(tokenizer, *_sft_pair(r)) for r in sft], tokenizer, spec
        )
        for key, values in (("perplexity", nll), ("perplexity_reference", nll_ref)):
            summary = stats.perplexity(values, count)
            res[key] = summary["value"]
            _put(res, key, summary)
    if spec.nll_dataset is not None:
        texts = build_datasets(spec.nll_dataset, recipe, "sft", chat, with_eval=False)[0]
        examples = [tokenize_completion(tokenizer, *_sft_pair(r)) for r in texts]
        nll, nll_ref, count = _nll_pair(models, examples, tokenizer, spec)
        for key, summary in (
            ("nll", stats.ratio(nll, count)),
            ("nll_reference", stats.ratio(nll_ref, count)),
            ("nll_diff", stats.paired_ratio_difference(nll, nll_ref, count)),
        ):
            res[key] = summary["value"]
            _put(res, key, summary)
        res["nll_change"] = res["nll"] / res["nll_reference"] - 1 if res["nll_reference"] else None
        res["nll_tokens"] = int(sum(count))
    del models

    # Rewards: the task's ground truth, and a reward model's scores.
    pol_rewards = ref_rewards = None
    if reward_fn is not None:
        pol_rewards = reward_fn_scores(reward_fn, prompts, pol_texts)
        ref_rewards = reward_fn_scores(reward_fn, prompts, ref_texts)
        _paired(res, per_prompt, "true_reward", pol_rewards, ref_rewards)
        res["win_rate_by"] = "reward_fn"
    if report_fn is not None:
        _task_report(res, per_prompt, report_fn, prompts, pol_texts, ref_texts)
    if reward_model is not None:
        rm, rm_tok = load_reward_model(recipe, reward_model)
        pol_rewards = reward_model_scores(rm, rm_tok, prompts, pol_texts, spec.rollout.batch_size).tolist()
        ref_rewards = reward_model_scores(rm, rm_tok, prompts, ref_texts, spec.rollout.batch_size).tolist()
        _paired(res, per_prompt, "mean_score", pol_rewards, ref_rewards)
        res["win_rate_by"] = "reward_model"
        if spec.preference_dataset is not None:
            pairs = build_datasets(spec.preference_dataset, recipe, "dpo", chat, with_eval=False)[0]
            p = [r.get("prompt") or "" for r in pairs]  # an implicit prompt stays inside chosen / rejected
            s_c = reward_model_scores(rm, rm_tok, p, [r["chosen"] for r in pairs], spec.rollout.batch_size).tolist()
            s_r = reward_model_scores(rm, rm_tok, p, [r["rejected"] for r in pairs], spec.rollout.batch_size).tolist()
            _pair_stats(res, "reward_model", s_c, s_r)
    if pol_rewards is not None:
        wins = stats.win_rate(pol_rewards, ref_rewards)
        res["win_rate"] = wins["value"]
        _put(res, "win_rate", wins)
        per_prompt["win"] = wins["outcomes"]

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
    res["per_prompt"] = per_prompt
    return res


def row_seed(seed: int, stream: str, index: int) -> int:
    """The random stream of row `index` (RowSeededSampler): a function of the recipe seed, what it samples for
    and the row alone, so a row draws the same numbers in any batch, on any process, for any checkpoint."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def _kl_along_samples(models: ModelPair, roll, rows_per_pass: int = 8) -> tuple[list[float], list[float]]:
    """Per response sampled from the policy at temperature 1: sum_t k1 = sum_t [log pi(y_t) - log ref(y_t)] (an
    unbiased estimate of the sequence KL(pi || ref)), and sum_t KL(pi(.|x, y<t) || ref(.|x, y<t)), the exact
    per-token KL summed over the vocabulary along the sampled path (unbiased too, with less variance, and >= 0).
    [B, C, V] logits of both models are held for `rows_per_pass` rows at a time."""
    k1, exact = [], []
    n_completion = roll.completion_ids.shape[1]
    for s in range(0, roll.input_ids.shape[0], rows_per_pass):
        ids, attn = roll.input_ids[s : s + rows_per_pass], roll.attention_mask[s : s + rows_per_pass]
        tokens = roll.completion_ids[s : s + rows_per_pass]
        mask = roll.completion_mask[s : s + rows_per_pass].float()  # [b, C]
        lp = torch.log_softmax(completion_logits(models.policy, ids, attn, n_completion, 1.0), dim=-1)
        with models.ref() as ref_model:
            lr = torch.log_softmax(completion_logits(ref_model, ids, attn, n_completion, 1.0), dim=-1)
        gathered = (lp - lr).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [b, C]
        per_token = (lp.exp() * (lp - lr)).sum(-1)  # [b, C]
        k1 += (gathered * mask).sum(1).double().tolist()
        exact += (per_token * mask).sum(1).double().tolist()
    return k1, exact


def _nll_pair(models: ModelPair, examples, tokenizer, spec) -> tuple[list[float], list[float], list[int]]:
    """Summed NLL of each example's completion tokens under policy and reference, and the token counts."""
    nll, count = _nll(models.policy, examples, tokenizer.pad_token_id, spec.rollout.batch_size)
    with models.ref() as ref_model:
        nll_ref, _ = _nll(ref_model, examples, tokenizer.pad_token_id, spec.rollout.batch_size)
    return nll, nll_ref, count


def _nll(model, examples, pad_id: int, batch_size: int) -> tuple[list[float], list[int]]:
    nll, count = [], []
    for batch in _batches(examples, batch_size):
        logps, n = completion_logps(model, batch, pad_id)
        nll += (-logps.double()).tolist()
        count += n.tolist()
    return nll, count


def _task_report(res: dict, per_prompt: dict, report_fn, prompts: list, pol_texts: list, ref_texts: list) -> None:
    """A built-in task's own report (alignlab.rewards.load_reward_report; builtin:constraints: constraint_report):
    strict accuracy (every constraint of a prompt met) with Wilson intervals and its paired difference,
    instruction-level accuracy (constraints met / constraints, a ratio over prompts), and accuracy per kind."""
    texts = [prompt_text(p) for p in prompts]
    one = {
        who: [report_fn([p], [c]) for p, c in zip(texts, out)] for who, out in (("pol", pol_texts), ("ref", ref_texts))
    }
    strict = {who: [int(r["strict_accuracy"] == 1.0) for r in reports] for who, reports in one.items()}
    for key, who in (("strict_accuracy", "pol"), ("strict_accuracy_reference", "ref")):
        summary = stats.rate(strict[who])
        res[key] = summary["value"]
        _put(res, key, summary)
    diff = stats.paired_difference(strict["pol"], strict["ref"])
    res["strict_accuracy_diff"] = diff["value"]
    _put(res, "strict_accuracy_diff", diff)
    per_prompt.update(strict_accuracy=strict["pol"], strict_accuracy_reference=strict["ref"])
    for key, who in (("instruction_accuracy", "pol"), ("instruction_accuracy_reference", "ref")):
        n_constraints = [sum(k["n"] for k in r["per_kind"].values()) for r in one[who]]
        met = [r["instruction_accuracy"] * n for r, n in zip(one[who], n_constraints)]
        summary = stats.ratio(met, n_constraints)
        res[key] = summary["value"]
        _put(res, key, summary)
    whole = {who: report_fn(texts, out) for who, out in (("policy", pol_texts), ("reference", ref_texts))}
    res["per_kind"] = {}
    for kind, pol in whole["policy"]["per_kind"].items():
        ref = whole["reference"]["per_kind"][kind]
        entry = {"n": pol["n"]}
        for who, r in (("policy", pol), ("reference", ref)):
            entry[who] = r["accuracy"]
            entry[f"{who}_ci"] = list(stats.wilson_interval(round(r["accuracy"] * r["n"]), r["n"]))
        res["per_kind"][kind] = entry


def _paired(res: dict, per_prompt: dict, key: str, pol: list, ref: list) -> None:
    """`key`, `key_reference` (means with intervals) and `key_diff` (their paired difference) from per-prompt
    values of policy and reference."""
    for name, values in ((key, pol), (f"{key}_reference", ref)):
        summary = stats.mean(values, bounds=UNIT.get(key))
        res[name] = summary["value"]
        _put(res, name, summary)
    diff = stats.paired_difference(pol, ref)
    res[f"{key}_diff"] = diff["value"]
    _put(res, f"{key}_diff", diff)
    per_prompt.update({key: list(pol), f"{key}_reference": list(ref)})


def _pair_stats(res: dict, prefix: str, chosen: list[float], rejected: list[float]) -> None:
    """`<prefix>_accuracy` (chosen above rejected: 1 right, 1/2 tie, 0 wrong; stats.win_rate) and `<prefix>_margin`
    (the mean of chosen - rejected), with intervals; the margins themselves, in pair order, under per_pair (two
    checkpoints' accuracies compare pair by pair)."""
    margins = [c - r for c, r in zip(chosen, rejected)]
    for key, summary in (
        (f"{prefix}_accuracy", stats.win_rate(chosen, rejected)),
        (f"{prefix}_margin", stats.mean(margins)),
    ):
        res[key] = summary["value"]
        _put(res, key, summary)
    res["per_pair"] = {**(res["per_pair"] or {}), f"{prefix}_margin": [float(m) for m in margins]}


def _put(res: dict, key: str, summary: dict) -> None:
    res[f"{key}_stderr"] = summary["stderr"]
    res[f"{key}_ci"] = summary["ci"]


def _log_ratio(models: ModelPair, examples, pad_id: int, batch_size: int) -> torch.Tensor:
    """log pi(y|x) - log pi_ref(y|x) [N], summed over completion tokens."""
    out = []
    for batch in _batches(examples, batch_size):
        pol, _ = completion_logps(models.policy, batch, pad_id)
        with models.ref() as ref_model:
            ref, _ = completion_logps(ref_model, batch, pad_id)
        out.append(pol.double() - ref.double())
    return torch.cat(out)


def numeric(results: dict) -> dict[str, float]:
    """The numeric, finite metrics of an eval.json dict (what a StageOutput records)."""
    return {
        k: v for k, v in results.items() if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
