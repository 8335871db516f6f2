"""Evaluation shared by the `eval` stage and `alignlab eval`: load a checkpoint and its reference, measure what
alignment changed, write eval.json, eval.md and plots of the run's training curves.

    alignlab eval runs/quickstart/dpo                         # a stage of a run (its recipe's eval settings)
    alignlab run recipes/quickstart.yaml --stage eval         # the same, as the recipe's last stage

Every aggregate is an `evaluate` module shipped in alignlab/metrics/<name>/ and loaded from that path
(`load_metric`); the models are run here. Policy and reference complete the SAME prompts (greedy when
`temperature: 0`; when sampling, both use the same seed per batch, so equal models give equal samples).

eval.json keys (EVAL_KEYS; a value is null when the input it needs was not given):
    policy, reference        str    what was evaluated, and what it is compared with
    num_prompts              int    prompts both models completed
    true_reward              float  mean of the task's reward function (`reward_fn`, module:function, called as
    true_reward_reference           the PPO stage calls it: fn(prompt texts, completions)) on the policy's / the
                                    reference's completions
    mean_score               float  mean reward-model score (`reward_model`) of the policy's / reference's
    mean_score_reference            completions
    win_rate                 float  fraction of prompts where the policy's completion outscores the reference's,
                                    ties 0.5; under the reward model when given, else the reward function
    win_rate_by              str    "reward_model", "reward_fn" or null
    kl                       float  mean over prompts of sum_t [log pi(y_t|x, y_<t) - log pi_ref(y_t|x, y_<t)] on the
                                    POLICY's completions: an unbiased estimate of KL(pi || pi_ref) when sampling at
                                    temperature 1. With greedy decoding (temperature 0) it is the log-ratio on the
                                    greedy outputs, not a KL; at other temperatures the samples come from a sharpened
                                    pi, so the estimate is biased. Log-probs are always those of the models (T = 1).
    preference_accuracy      float  DPO's implicit reward r = beta * (log pi - log pi_ref), summed over completion
    preference_margin               tokens, on held-out pairs (`preference_dataset`): fraction of pairs with
                                    r(chosen) > r(rejected) (ties 0.5) and mean r(chosen) - r(rejected)
    reward_model_accuracy    float  the same with the reward model's scores
    reward_model_margin
    perplexity               float  exp(mean NLL per completion token) of the policy / reference on held-out SFT
    perplexity_reference            data (`sft_dataset`)
    samples                  list   the first `num_samples_shown` prompts: {prompt, policy, reference,
                                    policy_reward, reference_reward} (rewards: reward model when given, else
                                    reward function, else null)
    settings                 dict   temperature, max_new_tokens, beta, seed

Tokenisation follows TRL's trainers: a chat prompt is templated with add_generation_prompt=True, the completion is
the rest of the templated prompt + completion conversation (from where the two token sequences diverge).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from alignlab.contract import OUTPUT_FILE, StageOutput
from alignlab.data import build_datasets, prompt_text
from alignlab.generation import end_token_ids, generate, sequence_logprobs
from alignlab.models import load_causal_lm, load_tokenizer, resolve_base
from alignlab.recipe import Recipe, RecipeError
from alignlab.rewards import load_reward_fn, reward_fn_scores, reward_model_scores

log = logging.getLogger("alignlab")

METRICS_DIR = Path(__file__).parent / "metrics"
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


# ------------------------------------------------------------------------------------------------ metrics


@functools.cache
def load_metric(name: str):
    """An `evaluate` module from alignlab/metrics/<name>/<name>.py (a local path: never the hub)."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)


def compute_metric(name: str, **inputs) -> dict:
    return load_metric(name).compute(**inputs)


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_output(path: str | Path) -> StageOutput | None:
    """What a checkpoint argument points at, as a StageOutput:

    `base` -> None (the recipe's base model); a stage directory (holding stage_output.json) -> that record; a run
    directory (holding recipe.yaml) -> its last finished stage with a model; an adapter directory
    (adapter_config.json) -> the adapter over its base_model_name_or_path; a model directory (config.json) or
    builtin:NAME -> full weights. Anything else that is not a local path is taken as a hub id (full weights).
    """
    from alignlab.builtin import resolve_model_name

    text = str(path)
    if text == "base":
        return None
    if text.startswith("builtin:"):
        text = resolve_model_name(text)
    p = Path(text).expanduser()
    if (p / OUTPUT_FILE).exists():
        out = StageOutput.load(p)
        if out.kind == "none":
            raise RecipeError(f"{p} is the output of a {out.type} stage, which writes no model")
        return out
    if (p / "recipe.yaml").exists():
        done = [o for o in run_outputs(p).values() if o.kind != "none"]
        if not done:
            raise RecipeError(f"run directory {p} has no finished stage with a model (no */{OUTPUT_FILE})")
        return done[-1]
    if (p / "adapter_config.json").exists():
        cfg = json.loads((p / "adapter_config.json").read_text())
        head = "sequence_classification" if cfg.get("task_type") == "SEQ_CLS" else "causal_lm"
        return StageOutput(p.name, "adapter", str(p), "adapter", cfg["base_model_name_or_path"], head=head)
    if (p / "config.json").exists():
        return StageOutput(p.name, "model", str(p), "full", str(p))
    if p.exists() or text.startswith((".", "/", "~")):
        raise RecipeError(
            f"checkpoint {p}: not a run directory (recipe.yaml), stage directory ({OUTPUT_FILE}), adapter "
            f"(adapter_config.json) or model directory (config.json)"
        )
    return StageOutput(text, "model", text, "full", text)  # a hub id


def run_outputs(run_dir: Path) -> dict[str, StageOutput]:
    """The finished stages of a run directory, in recipe order."""
    import yaml

    raw = yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text()) or {}
    names = [s.get("name") or s.get("type") for s in raw.get("stages", [])]
    found = {n: StageOutput.load(Path(run_dir) / n) for n in names}
    return {n: o for n, o in found.items() if o is not None}


def describe(source: StageOutput | None, recipe: Recipe) -> str:
    if source is None:
        return f"base ({recipe.model.name_or_path})"
    return f"{source.stage} ({source.kind}: {source.path})"


def load_model(recipe: Recipe, source: StageOutput | None):
    """A frozen model in eval mode: the base (None), full weights, or an adapter over its base."""
    from peft import PeftModel

    head = source.head if source is not None else "causal_lm"
    extra = {"num_labels": 1} if head == "sequence_classification" else {}
    if source is None:
        model = load_causal_lm(recipe, resolve_base(recipe))
    elif source.kind == "adapter":
        model = PeftModel.from_pretrained(load_causal_lm(recipe, source.base, head=head, **extra), source.path)
    else:
        model = load_causal_lm(recipe, source.path, head=head, **extra)
    if getattr(model, "hf_device_map", None) is None and not getattr(model, "is_quantized", False):
        from accelerate import PartialState

        model = model.to(PartialState().device)
    return model.eval().requires_grad_(False)


def _same(a: StageOutput | None, b: StageOutput | None) -> bool:
    key = lambda o: None if o is None else (o.kind, o.path, o.base)  # noqa: E731
    return key(a) == key(b)


class ModelPair:
    """Policy and reference. One model when they are the same checkpoint; one backbone with the adapter
    switched off for the reference when the policy is an adapter over the reference's weights."""

    def __init__(self, recipe: Recipe, policy: StageOutput | None, reference: StageOutput | None):
        self.policy = load_model(recipe, policy)
        ref_weights = resolve_base(recipe) if reference is None else reference.path
        self.adapter_off = policy is not None and policy.kind == "adapter" and policy.base == ref_weights
        self.adapter_off = self.adapter_off and (reference is None or reference.kind == "full")
        shared = _same(policy, reference) or self.adapter_off
        self.reference = self.policy if shared else load_model(recipe, reference)

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


@torch.no_grad()
def completion_logps(model, examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs [B] of each example's completion tokens, and their counts [B]. Right-padded batch."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(input_ids)
    scored = torch.zeros_like(input_ids)  # 1 = a completion token
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        scored[i, max(n_prompt, 1) : len(ids)] = 1  # token 0 has no prediction
    logps = sequence_logprobs(model, input_ids.to(device), attn.to(device), start=1)  # [B, T-1]
    mask = scored[:, 1:].to(device)
    return (logps * mask).sum(1).cpu(), mask.sum(1).cpu()


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ------------------------------------------------------------------------------------------------ scores


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
    tokenizer = load_tokenizer(recipe, _tokenizer_dir(recipe, policy))
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
    for i, batch in enumerate(_batches(prompts, spec.batch_size)):
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
        reward_model = dataclasses.replace(reward_model, head="sequence_classification")
        rm = load_model(recipe, reward_model)
        rm_tok = load_tokenizer(recipe, _tokenizer_dir(recipe, reward_model))
        if rm.config.pad_token_id is None:
            rm.config.pad_token_id = rm_tok.pad_token_id
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


def _tokenizer_dir(recipe: Recipe, source: StageOutput | None) -> str:
    """Where a checkpoint's tokenizer lives: its own folder (stages save one beside the weights), else its
    base's, else the recipe's base model's. A hub id is asked for its own."""
    for candidate in (source.path, source.base) if source is not None else ():
        if not Path(candidate).is_dir() or Path(candidate, "tokenizer_config.json").exists():
            return candidate
    return resolve_base(recipe)


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


# ------------------------------------------------------------------------------------------------ writing


ROWS = (  # (eval.md row label, policy key, reference key)
    ("true reward (mean)", "true_reward", "true_reward_reference"),
    ("reward-model score (mean)", "mean_score", "mean_score_reference"),
    ("win rate vs reference", "win_rate", None),
    ("KL(policy \\|\\| reference), nats", "kl", None),
    ("preference accuracy (implicit reward)", "preference_accuracy", None),
    ("preference margin (implicit reward)", "preference_margin", None),
    ("reward-model preference accuracy", "reward_model_accuracy", None),
    ("reward-model preference margin", "reward_model_margin", None),
    ("perplexity (held-out SFT)", "perplexity", "perplexity_reference"),
)


def markdown(res: dict) -> str:
    """The table people read: one row per metric that was measured, then sample generations side by side."""
    fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
    s = res["settings"]
    decoding = "greedy decoding" if s["temperature"] == 0 else f"sampling at temperature {s['temperature']}"
    lines = [
        f"## Evaluation: {res['policy']} vs {res['reference']}",
        "",
        f"{res['num_prompts']} prompts, {decoding}, up to {s['max_new_tokens']} new tokens.",
        "",
        "| metric | policy | reference |",
        "|---|---:|---:|",
    ]
    for label, key, ref_key in ROWS:
        if res.get(key) is not None:
            if key == "win_rate":
                label += f" (by {res['win_rate_by'].replace('_', ' ')})"
            if key == "kl" and s["temperature"] != 1:
                label += " (log-ratio on the policy's outputs)" if s["temperature"] == 0 else " (at temperature != 1)"
            lines.append(f"| {label} | {fmt(res[key])} | {fmt(res.get(ref_key)) if ref_key else ''} |")
    if res["samples"]:
        lines += ["", "### Samples", "", "| prompt | policy | reward | reference | reward |", "|---|---|---:|---|---:|"]
        for x in res["samples"]:
            cells = [_cell(x["prompt"]), _cell(x["policy"]), fmt(x["policy_reward"])]
            cells += [_cell(x["reference"]), fmt(x["reference_reward"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str, limit: int = 120) -> str:
    text = re.sub(r"\s+", " ", text).strip().replace("|", "\\|")
    return (text[: limit - 1] + "…") if len(text) > limit else (text or "(empty)")


def write_results(res: dict, out_dir: Path, curves: dict[str, Path] | None = None) -> list[Path]:
    """eval.json, eval.md and (when training curves are given) plots/*.png into out_dir; returns the paths."""
    from alignlab.plots import plot_training_curves

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(res, indent=2, default=_json_default) + "\n")
    (out_dir / "eval.md").write_text(markdown(res))
    written = [out_dir / "eval.json", out_dir / "eval.md"]
    if curves:
        written += plot_training_curves(curves, out_dir / "plots")
    return written


def _json_default(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return float(v)


# ------------------------------------------------------------------------------------------------ `alignlab eval`


def run_cli(
    checkpoints: list[str],
    recipe_path: str | None = None,
    stage: str | None = None,
    reference: str | None = None,
    out: str | None = None,
    sets: list[str] | None = None,
) -> list[Path]:
    """`alignlab eval`: evaluate each checkpoint against the reference; returns the eval.md paths written.

    Settings are the keys of an eval stage (alignlab/stages/specs.py:EvalSpec): the recipe's eval stage (`stage`,
    else its first one), with `sets` (`key=value`, e.g. `num_prompts=50`, `dataset.path=data.jsonl`) applied on top;
    when the recipe has no eval stage, `sets` must give at least `dataset.path`. The recipe is `recipe_path`, else
    the recipe.yaml of the run the first checkpoint belongs to, else a minimal one over the checkpoint's base.
    The reference is `reference` (base, a stage of that run, or any checkpoint form), else the stage's own.
    """
    from alignlab.recipe import apply_override, parse_recipe, read_yaml

    run_dir = _run_dir_of(Path(checkpoints[0]))
    source = Path(recipe_path) if recipe_path else (run_dir / "recipe.yaml" if run_dir else None)
    if source is not None:
        raw = read_yaml(source)[0]  # a clear error for a missing, non-UTF-8 or malformed file
    else:
        first = checkpoint_output(checkpoints[0])
        if first is None:
            raise RecipeError("'base' of which model? Pass --recipe (its model is the base)")
        raw = {"name": "eval", "model": {"name_or_path": first.base}, "stages": []}
    evals = [s for s in raw.get("stages", []) if s.get("type") == "eval" and stage in (None, s.get("name"))]
    if stage is not None and not evals:
        raise RecipeError(f"{source}: no eval stage named '{stage}'")
    stage_raw = dict(evals[0]) if evals else {"name": "eval", "type": "eval"}
    for kv in sets or []:
        apply_override(stage_raw, kv)
    raw["stages"] = [s for s in raw.get("stages", []) if s.get("type") != "eval"] + [stage_raw]
    recipe = parse_recipe(raw, source=source)
    spec = recipe.stages[-1]

    ref_name = reference or spec.reference
    written = []
    for ckpt in checkpoints:
        policy = checkpoint_output(ckpt)
        ckpt_run = _run_dir_of(Path(ckpt)) or run_dir
        ref = _resolve_ref(ref_name, ckpt_run)
        rm = _resolve_ref(spec.reward_model, ckpt_run) if spec.reward_model else None
        res = evaluate_models(recipe, spec, policy, ref, reward_model=rm)
        target = _out_dir(ckpt, policy, out, many=len(checkpoints) > 1)
        curves = _curves(ckpt_run) if ckpt_run else None
        written.append(write_results(res, target, curves)[1])
    return written


def _run_dir_of(path: Path) -> Path | None:
    for p in [path, *list(path.parents)[:2]]:
        if (p / "recipe.yaml").exists():
            return p
    return None


def _resolve_ref(name: str, run_dir: Path | None) -> StageOutput | None:
    if name == "base":
        return None
    if run_dir is not None and (run_dir / name / OUTPUT_FILE).exists():
        return StageOutput.load(run_dir / name)
    return checkpoint_output(name)


def _curves(run_dir: Path) -> dict[str, Path]:
    return {n: run_dir / n / "metrics.jsonl" for n, o in run_outputs(run_dir).items() if o.kind != "none"}


def _out_dir(ckpt: str, policy: StageOutput | None, out: str | None, many: bool) -> Path:
    """--out (a sub-folder per checkpoint when there are several); else <stage dir>/eval for a stage or run (its
    evaluated stage), <dir>-eval beside a model or adapter folder, ./eval-<name> for base or a hub id."""
    p = Path(ckpt).expanduser()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", p.name if p.exists() else ckpt).strip("-") or "checkpoint"
    if out is not None:
        return Path(out) / name if many else Path(out)
    if (p / OUTPUT_FILE).exists():
        return p / "eval"
    if (p / "recipe.yaml").exists():
        return p / policy.stage / "eval"
    if p.exists():
        return p.with_name(p.name + "-eval")
    return Path(f"eval-{name}")
