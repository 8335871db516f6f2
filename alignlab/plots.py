"""Training curves of a run as PNG files, from each stage's metrics.jsonl (one JSON object per logging step,
written by alignlab.stages.trl_glue.JsonlMetrics). Summaries are not curves: the closing `"final": true` line and
the trainer's end-of-training `train_*` averages are skipped.

One figure per kind of curve, one line per (stage, metric key), x = the stage's training step:

    loss.png      loss, eval_loss, and any other key ending in loss (policy_loss, value_loss, ...)
    accuracy.png  keys with "accurac" in them (rewards/accuracies, eval_rewards/accuracies, eval_accuracy)
    margin.png    keys with "margin" (rewards/margins, ...)
    reward.png    other keys with "reward" or "score" (PPO's score, non_score_reward, DPO's rewards/chosen, ...)
    kl.png        keys naming a KL (kl, objective/kl, eval_kl, ...), not the coefficient kl_coef

Figures are drawn with matplotlib's object API (no pyplot), so nothing here touches the user's backend.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

_KL = re.compile(r"(^|[/_])kl($|[/_])")
PANELS: dict[str, Callable[[str], bool]] = {
    "loss": lambda k: k == "loss" or k.endswith(("_loss", "/loss")),
    "accuracy": lambda k: "accurac" in k,
    "margin": lambda k: "margin" in k,
    "reward": lambda k: ("reward" in k or "score" in k) and "accurac" not in k and "margin" not in k,
    "kl": lambda k: _KL.search(k) is not None and "coef" not in k,  # not PPO's kl_coef (a controller setting)
}


def read_curves(path: Path) -> dict[str, list[tuple[float, float]]]:
    """metric key -> [(step, value), ...] from one metrics.jsonl; unreadable lines are skipped."""
    curves: dict[str, list[tuple[float, float]]] = {}
    if not Path(path).exists():
        return curves
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by a crash
        if not isinstance(row, dict) or row.get("final") or "step" not in row:
            continue
        for key, value in row.items():
            if key in ("step", "epoch") or key.startswith("train_"):  # train_loss etc.: end-of-training averages
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                curves.setdefault(key, []).append((row["step"], value))
    return curves


def plot_training_curves(metrics_files: dict[str, Path], out_dir: Path) -> list[Path]:
    """Write <out_dir>/<panel>.png for each panel that has data; `metrics_files` maps stage name -> metrics.jsonl.
    Returns the files written."""
    from matplotlib.figure import Figure

    curves = {stage: read_curves(path) for stage, path in metrics_files.items()}
    written = []
    for panel, wanted in PANELS.items():
        lines = [(stage, key, pts) for stage, keys in curves.items() for key, pts in keys.items() if wanted(key)]
        if not lines:
            continue
        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot()
        for stage, key, pts in lines:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=f"{stage}: {key}")
        ax.set_xlabel("step")
        ax.set_ylabel(panel)
        ax.set_title(f"training curves: {panel}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = Path(out_dir) / f"{panel}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written
