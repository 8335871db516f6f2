"""Writing an evaluation: eval.json (every key, nulls included), eval.md (a table and samples) and plots of the
run's training curves."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

ROWS = (  # (eval.md row label, policy key, reference key, paired-difference key)
    ("true reward (mean)", "true_reward", "true_reward_reference", "true_reward_diff"),
    ("strict accuracy (all constraints met)", "strict_accuracy", "strict_accuracy_reference", "strict_accuracy_diff"),
    ("instruction accuracy (constraints met)", "instruction_accuracy", "instruction_accuracy_reference", None),
    ("reward-model score (mean)", "mean_score", "mean_score_reference", "mean_score_diff"),
    ("win rate vs reference", "win_rate", None, None),
    ("KL(policy \\|\\| reference), nats (k1, samples at T=1)", "kl", None, None),
    ("KL, exact per token along the samples", "kl_exact", None, None),
    ("repeated word 3-grams (share)", "repetition", "repetition_reference", "repetition_diff"),
    ("distinct-2 (per response)", "distinct_2", "distinct_2_reference", "distinct_2_diff"),
    ("response length (tokens)", "response_length", "response_length_reference", "response_length_diff"),
    ("preference accuracy (implicit reward)", "preference_accuracy", None, None),
    ("preference margin (implicit reward)", "preference_margin", None, None),
    ("reward-model preference accuracy", "reward_model_accuracy", None, None),
    ("reward-model preference margin", "reward_model_margin", None, None),
    ("perplexity (held-out SFT)", "perplexity", "perplexity_reference", None),
    ("NLL per token (held-out text)", "nll", "nll_reference", "nll_diff"),
)


def markdown(res: dict) -> str:
    """The table people read: one row per metric that was measured, each value with its 95% interval, the paired
    difference policy - reference where the two were measured on the same prompts; the per-kind scores of a task
    report; then sample generations side by side."""
    s = res["settings"]
    decoding = "greedy decoding" if s["temperature"] == 0 else f"sampling at temperature {s['temperature']}"
    lines = [
        f"## Evaluation: {res['policy']} vs {res['reference']}",
        "",
        f"{res['num_prompts']} prompts, {decoding}, up to {s['max_new_tokens']} new tokens. Brackets: 95% intervals "
        "(Wilson for rates of prompts, normal for means); KL on responses sampled from the policy at temperature 1.",
        "",
        *metric_table(res),
    ]
    if res.get("nll_change") is not None:
        lines += [
            "",
            f"NLL on the held-out text ({res['nll_tokens']} tokens): {100 * res['nll_change']:+.1f}% vs reference.",
        ]
    if res.get("per_kind"):
        lines += ["", "### Per constraint kind", "", "| kind | n | policy | reference |", "|---|---:|---:|---:|"]
        for kind, k in res["per_kind"].items():
            pol, ref = _with_ci(k["policy"], k["policy_ci"]), _with_ci(k["reference"], k["reference_ci"])
            lines.append(f"| {kind} | {k['n']} | {pol} | {ref} |")
    if res["samples"]:
        fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
        lines += ["", "### Samples", "", "| prompt | policy | reward | reference | reward |", "|---|---|---:|---|---:|"]
        for x in res["samples"]:
            cells = [_cell(x["prompt"]), _cell(x["policy"]), fmt(x["policy_reward"])]
            cells += [_cell(x["reference"]), fmt(x["reference_reward"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def metric_table(res: dict, columns: tuple[str, str, str] = ("policy", "reference", "policy - reference")) -> list[str]:
    """The lines of the metrics table (eval.md's, a model card's): one row per metric that was measured, each value
    with its 95% interval."""
    lines = [f"| metric | {' | '.join(columns)} |", "|---|---:|---:|---:|"]
    for label, key, ref_key, diff_key in ROWS:
        if res.get(key) is not None:
            if key == "win_rate":
                label += f" (by {res['win_rate_by'].replace('_', ' ')})"
            cells = [_value(res, k) if k else "" for k in (key, ref_key, diff_key)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _value(res: dict, key: str) -> str:
    """`value [lo, hi]` (4 significant digits), or the value alone when it has no interval."""
    value = res.get(key)
    if value is None:
        return ""
    return _with_ci(value, res.get(f"{key}_ci"))


def _with_ci(value: float, ci) -> str:
    if not ci or any(c is None or not math.isfinite(c) for c in ci):
        return f"{value:.4g}"
    return f"{value:.4g} [{ci[0]:.3g}, {ci[1]:.3g}]"


def _cell(text: str, limit: int = 120) -> str:
    text = re.sub(r"\s+", " ", text).strip().replace("|", "\\|")
    return (text[: limit - 1] + "…") if len(text) > limit else (text or "(empty)")


def write_results(res: dict, out_dir: Path, curves: dict[str, Path] | None = None) -> list[Path]:
    """eval.json, eval.md and (when training curves are given) plots/*.png into out_dir; returns the paths."""
    from alignlab.plots import plot_training_curves

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(finite(res), indent=2, default=_json_default) + "\n")
    (out_dir / "eval.md").write_text(markdown(res))
    written = [out_dir / "eval.json", out_dir / "eval.md"]
    if curves:
        written += plot_training_curves(curves, out_dir / "plots")
    return written


def finite(v):
    """nan and inf (a stderr of one prompt, an empty measure) as null: JSON has no NaN."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [finite(x) for x in v]
    return v


def _json_default(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return float(v)
