"""The end-of-run summary: where each stage's outputs are and what they scored."""

from __future__ import annotations

import logging

from accelerate import PartialState

from alignlab import console
from alignlab.contract import StageOutput
from alignlab.recipe import Recipe

SHOWN = (
    "eval_loss",
    "eval_perplexity",
    "train_loss",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "eval_accuracy",
    "true_reward",
    "true_reward_reference",
    "strict_accuracy",
    "strict_accuracy_reference",
    "win_rate",
    "kl",
    "mean_score",
    "rows",
    "row_rate",
    "mean_best_score",
)


def print_summary(recipe: Recipe, outputs: dict[str, StageOutput]) -> None:
    """Print the summary (main process), and write it to the run's log file too."""
    if not PartialState().is_main_process:
        return
    lines = [f"\nalignlab: run '{recipe.name}' finished. Outputs in {recipe.run_dir.resolve()}"]
    for name, out in outputs.items():
        shown = ", ".join(f"{k}={out.metrics[k]:.4g}" for k in SHOWN if isinstance(out.metrics.get(k), int | float))
        where = out.path or str(recipe.run_dir / name)
        lines.append(f"  {name:<10} {out.type:<7} {out.kind:<8} {where}")
        if shown:
            lines.append(f"  {'':<10} {shown}")
    for path in (recipe.run_dir / n / "eval.md" for n in outputs):  # stages that evaluate write one
        if path.exists():
            lines.append(f"\n{path.read_text()}")
    text = "\n".join(lines)
    print(text)
    console.to_file(logging.INFO, text)
