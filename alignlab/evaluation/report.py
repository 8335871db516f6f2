"""Writing an evaluation: eval.json (every key, nulls included), eval.md (a table and samples) and plots of the
run's training curves."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

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
