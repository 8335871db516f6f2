"""The end-of-run summary: where each stage's outputs are and what they scored."""

from __future__ import annotations

from accelerate import PartialState

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
    if not PartialState().is_main_process:
        return
    print(f"\nalignlab: run '{recipe.name}' finished. Outputs in {recipe.run_dir.resolve()}")
    for name, out in outputs.items():
        shown = ", ".join(f"{k}={out.metrics[k]:.4g}" for k in SHOWN if isinstance(out.metrics.get(k), int | float))
        where = out.path or str(recipe.run_dir / name)
        print(f"  {name:<10} {out.type:<7} {out.kind:<8} {where}")
        if shown:
            print(f"  {'':<10} {shown}")
    md = [recipe.run_dir / n / "eval.md" for n, o in outputs.items() if o.type == "eval"]
    for path in md:
        if path.exists():
            print(f"\n{path.read_text()}")
