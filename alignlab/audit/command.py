"""`alignlab audit preferences RECIPE --stage NAME` (experimental): how many of a preference stage's labels look
flipped, and which pairs.

    alignlab audit preferences recipes/quickstart.yaml --stage dpo
    alignlab audit preferences recipes/robust_dpo_noisy.yaml --stage dpo --folds 5 --epochs 2 --drop-suspect 100

cDPO and rDPO take the label-flip rate eps as a parameter (docs/algorithms.md); this command estimates it.

1. The pairs: the stage's training dataset exactly as the stage reads it (alignlab.data.build_datasets, with the
   recipe's overrides and any injected `flip_rate`), indexed by row from 0.
2. Cross-fitting: the pairs are split into K folds (seeded). For each fold a Bradley-Terry reward model is trained
   on the other K - 1 folds with the reward stage's trainer (alignlab.stages.reward.BradleyTerryRewardTrainer, on
   the stage's input model when that stage has finished, else on the recipe's base model, with the recipe's peft),
   and it scores the held-out fold: every pair gets an out-of-fold margin m_i = r(chosen) - r(rejected) from a
   scorer that never saw its label. (A scorer that had seen a flipped label would have learned it.)
3. The flip rate: a mirrored Gaussian mixture fitted to the margins, m ~ (1 - eps) f(m) + eps f(-m)
   (alignlab.audit.mixture: assumptions, the fit and the interval). The scorer's own mistakes on clean pairs are
   f's tail below 0, not flips. Per-pair suspicion: the posterior P(flipped | m_i).

Assumptions (also in docs/robustness.md, "Auditing preference labels"): flips are independent of how hard a pair
is (a flip rate that is the same for pairs the scorer separates well and for pairs it cannot tell apart); a flipped
pair's margin is the mirror image of a clean one's; the margins of one fold's scorer are comparable with another's (each
fold's margins are divided by their RMS, which a sign flip leaves alone). Flips of pairs the scorer cannot
separate are invisible: the estimate is the flip rate among the pairs the scorer can see, carried over to the rest.

Writes <run output_dir>/audit/<stage>/ (or --out): audit.json (with every pair's margin; nothing of the scorers is
kept), audit.md, and with --drop-suspect K a cleaned.jsonl without the K most suspect rows, which a later
stage reads as `dataset: {path: <that file>}`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alignlab.audit.mixture import fit_flip_rate
from alignlab.data import DataError
from alignlab.schema import RecipeError
from alignlab.stages.registry import input_stage_name, stage_record

if TYPE_CHECKING:
    from alignlab.recipe import Recipe

log = logging.getLogger("alignlab")
METHOD = "cross-fitted Bradley-Terry margins, mirrored Gaussian mixture (EM), 95% profile-likelihood interval"
MIN_PER_FOLD = 4  # a fold's scorer trains on the rest; a fold needs a few pairs to hold out
SHOWN = 20  # the most suspect pairs shown in audit.md
WEAK_AGREEMENT = 0.6  # mean held-out agreement of the scorers below which the audit warns
WIDE_INTERVAL = 0.25


def preference_stages(recipe: Recipe) -> list[str]:
    """Names of the recipe's stages whose main dataset is preference pairs (prompt/chosen/rejected); not kto, which
    reads pairs only as unpaired feedback rows."""
    return [s.name for s in recipe.stages if stage_record(s.type).formats[0] == "preference"]


def audited_stage(recipe: Recipe, name: str):
    """The spec of stage `name`, or a RecipeError naming the stages that can be audited."""
    pref = preference_stages(recipe)
    names = [s.name for s in recipe.stages]
    if name not in names:
        raise RecipeError(
            f"--stage {name}: no stage named '{name}' in {recipe.source or 'the recipe'}; its stages are "
            f"{', '.join(names)} (preference stages, which can be audited: {', '.join(pref) or 'none'})"
        )
    spec = recipe.stage(name)
    if name not in pref:
        reads = (
            "which trains on unpaired feedback rows, not on preference pairs"
            if "unpaired" in stage_record(spec.type).formats
            else "which reads no preference pairs (prompt/chosen/rejected)"
        )
        raise RecipeError(
            f"--stage {name}: stage '{name}' is a {spec.type} stage, {reads}; audit one of the preference stages: "
            f"{', '.join(pref) or 'none in this recipe'}"
        )
    return spec


def check_fold_count(n_pairs: int, folds: int, where: str) -> None:
    """K-fold cross-fitting needs K >= 2 and MIN_PER_FOLD pairs in each fold."""
    if folds < 2:
        raise RecipeError(f"--folds {folds}: cross-fitting needs at least 2 folds")
    if n_pairs < folds * MIN_PER_FOLD:
        raise DataError(
            f"{where}: {n_pairs} preference pairs are too few for {folds} folds (at least {MIN_PER_FOLD} pairs per "
            f"fold: {folds * MIN_PER_FOLD}). Give the stage more pairs (e.g. dataset.size or dataset.max_samples), or "
            f"lower --folds to {max(2, n_pairs // MIN_PER_FOLD)}"
            + ("" if n_pairs >= 2 * MIN_PER_FOLD else " (that is still too few: 2 folds need 8 pairs)")
        )


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """[n] fold of each row: a seeded permutation dealt round-robin, so fold sizes differ by at most one."""
    ids = np.empty(n, dtype=np.int64)
    ids[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return ids


def suggested_eps(flip_rate: float) -> float:
    """The eps to give cdpo/rdpo: the estimate to 2 decimals, below 0.5 (rDPO divides by 1 - 2 eps)."""
    return round(min(max(flip_rate, 0.0), 0.45), 2)


def run_audit(
    recipe: Recipe,
    stage: str,
    *,
    folds: int = 5,
    seed: int | None = None,
    epochs: float = 2.0,
    learning_rate: float | None = None,
    out: str | Path | None = None,
    drop_suspect: int = 0,
) -> tuple[dict, Path]:
    """Audit stage `stage`'s preference pairs (module docstring). Returns (audit.json's content, audit.md path)."""
    from alignlab.data import build_datasets
    from alignlab.models import load_tokenizer, resolve_base

    spec = audited_stage(recipe, stage)
    seed = recipe.seed if seed is None else seed
    source = _input_output(recipe, stage)
    tokenizer = load_tokenizer(recipe, source.path if source is not None and source.kind == "full" else None)
    where = f"stage '{stage}' dataset {spec.dataset.path}"
    pairs, _ = build_datasets(spec.dataset, recipe, spec.type, tokenizer.chat_template is not None, with_eval=False)
    check_fold_count(len(pairs), folds, where)
    if drop_suspect < 0 or drop_suspect >= len(pairs):
        raise RecipeError(f"--drop-suspect {drop_suspect}: must be in [0, {len(pairs) - 1}] ({len(pairs)} pairs)")
    lr = learning_rate or scorer_learning_rate(recipe, spec)
    out_dir = Path(out) if out else recipe.run_dir / "audit" / stage
    out_dir.mkdir(parents=True, exist_ok=True)

    start = time.time()
    fold = fold_ids(len(pairs), folds, seed)
    margins, accuracies = cross_fit_margins(recipe, spec, pairs, fold, source, epochs, lr, out_dir)
    scaled = _scale_per_fold(margins, fold)
    fit = fit_flip_rate(scaled, seed=seed)
    seconds = time.time() - start
    shutil.rmtree(out_dir / "folds", ignore_errors=True)  # the trainers' output folders: logs only, no model

    # Most suspect first; ties (e.g. every posterior 0 when eps = 0) by margin, the most negative first.
    order = np.lexsort((margins, -fit.posterior))
    result = {
        "stage": stage,
        "dataset": spec.dataset.model_dump(exclude_defaults=True),
        "n_pairs": len(pairs),
        "flip_rate": fit.eps,
        "interval": list(fit.interval),
        "interval_level": 0.95,
        "suggested_eps": suggested_eps(fit.eps),
        "disagreement_rate": float(np.mean(margins < 0)),
        "method": METHOD,
        "folds": folds,
        "seed": seed,
        "scorer": {
            "start": source.stage if source is not None else f"base ({resolve_base(recipe)})",
            "peft": recipe.peft.method,
            "epochs": epochs,
            "learning_rate": lr,
            "held_out_accuracy_per_fold": accuracies,
        },
        "mixture": {
            "components": fit.components,
            "weights": fit.weights,
            "means": fit.means,
            "sigmas": fit.sigmas,
            "loglik": fit.loglik,
            "bic": fit.bic,
        },
        "warnings": weak_scorer_warnings(accuracies, fit.interval),
        "seconds": seconds,
        "pairs": [
            {"row": int(i), "fold": int(fold[i]), "margin": float(margins[i]), "suspicion": float(fit.posterior[i])}
            for i in range(len(pairs))
        ],
        "most_suspect": [int(i) for i in order[:SHOWN]],
    }
    (out_dir / "audit.json").write_text(json.dumps(result, indent=2) + "\n")
    md = out_dir / "audit.md"
    md.write_text(_markdown(result, pairs, order))
    if drop_suspect:
        result["cleaned"] = str(_write_cleaned(pairs, order[:drop_suspect], out_dir / "cleaned.jsonl"))
        (out_dir / "audit.json").write_text(json.dumps(result, indent=2) + "\n")
    return result, md


def cross_fit_margins(recipe, spec, pairs, fold: np.ndarray, source, epochs: float, lr: float, out_dir: Path):
    """[N] out-of-fold margins r(chosen) - r(rejected), and each fold scorer's held-out accuracy (mean [m > 0]).

    Each fold: a fresh reward model (seeded, from `source` or the base; a fresh LoRA when the recipe has peft),
    trained on the other folds for `epochs` with the stage's batch size and max_length, then frozen to score the
    held-out fold. No checkpoint is written (save_steps off); the trainer's output folder holds only logs."""
    import torch
    from transformers import set_seed
    from trl import RewardConfig

    from alignlab.contract import StageContext
    from alignlab.models import load_stage_model, load_tokenizer
    from alignlab.rewards import reward_model_scores
    from alignlab.stages.reward import BradleyTerryRewardTrainer
    from alignlab.stages.trl_glue import trainer_args

    train = spec.train.model_copy(
        update={
            "epochs": epochs,
            "max_steps": -1,
            "learning_rate": lr,
            "save_steps": None,
            "eval_steps": None,
            "report_to": [],
            "logging_steps": 10**6,  # the folds' losses are not the result; keep the console to the summary
        }
    )
    margins = np.zeros(len(pairs))
    accuracies = []
    folds = int(fold.max()) + 1
    for k in range(folds):
        held = np.flatnonzero(fold == k)
        rest = np.flatnonzero(fold != k)
        set_seed(recipe.seed + k)  # the score head (and LoRA) start: a different draw per fold, reproducibly
        model, base = load_stage_model(recipe, source, head="sequence_classification")
        tokenizer = load_tokenizer(recipe, base)
        ctx = StageContext(recipe=recipe, spec=spec, stage_dir=out_dir / "folds" / f"fold{k}", input=source)
        args = trainer_args(RewardConfig, ctx, train, has_eval=False, disable_dropout=True)
        trainer = BradleyTerryRewardTrainer(
            model=model, args=args, train_dataset=pairs.select(rest.tolist()), processing_class=tokenizer
        )
        trainer.train()
        scorer = trainer.accelerator.unwrap_model(trainer.model).eval()
        rows = pairs.select(held.tolist())
        prompts = rows["prompt"] if "prompt" in rows.column_names else [None] * len(rows)
        batch = train.eval_batch_size or train.per_device_batch_size
        with torch.no_grad():
            chosen = reward_model_scores(scorer, tokenizer, prompts, rows["chosen"], batch)
            rejected = reward_model_scores(scorer, tokenizer, prompts, rows["rejected"], batch)
        margins[held] = (chosen - rejected).double().numpy()
        accuracies.append(float(np.mean(margins[held] > 0)))
        log.info("audit: fold %d/%d, held-out agreement with the labels %.3f", k + 1, folds, accuracies[-1])
        del trainer, model, scorer
    return margins, accuracies


def _scale_per_fold(margins: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Each fold's margins divided by their RMS: the folds' scorers need not share a scale, and a sign flip leaves
    the RMS unchanged, so this does not depend on the flips."""
    out = margins.copy()
    for k in np.unique(fold):
        rms = float(np.sqrt(np.mean(margins[fold == k] ** 2)))
        if rms > 0:
            out[fold == k] /= rms
    return out


def _input_output(recipe: Recipe, stage: str):
    """The finished output of the stage's input stage (a better start for a scorer than the base), else None."""
    from alignlab.contract import StageOutput

    index = [s.name for s in recipe.stages].index(stage)
    name = input_stage_name(recipe, index)
    out = StageOutput.load(recipe.run_dir / name) if name else None
    return out if out is not None and out.path else None


def scorer_learning_rate(recipe: Recipe, spec) -> float:
    """A reward stage's learning rate when the recipe has one (it was chosen for this model), else 10x the audited
    stage's: preference optimisation runs at about a tenth of a reward model's rate (TRL's defaults: DPOConfig 1e-6,
    RewardConfig 1e-5), and at the DPO rate of recipes/quickstart.yaml (5e-5) the tiny model's scorers agree with
    the labels no better than chance after 2 epochs."""
    for s in recipe.stages:
        if s.type == "reward":
            return s.train.learning_rate
    return 10 * spec.train.learning_rate


def weak_scorer_warnings(accuracies: list[float], interval: tuple[float, float]) -> list[str]:
    """What to say when the scorers separate too few pairs for the estimate to mean much."""
    notes = []
    mean = sum(accuracies) / len(accuracies)
    if mean < WEAK_AGREEMENT:
        notes.append(
            f"the scorers agree with the labels on {mean:.2f} of held-out pairs (chance: 0.5), so they learned little: "
            f"raise --epochs or --learning-rate, or give the stage more pairs"
        )
    if interval[1] - interval[0] > WIDE_INTERVAL:
        notes.append(
            f"the interval is wide ({interval[0]:.2f} to {interval[1]:.2f}): the margins say little about the flip rate"
        )
    return notes


def _text(value) -> str:
    if isinstance(value, list):
        return " / ".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value)
    return str(value)


def _cell(value, n: int = 80) -> str:
    text = _text(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


def _markdown(res: dict, pairs, order: np.ndarray) -> str:
    lo, hi = res["interval"]
    lines = [
        f"# Preference label audit (experimental): stage `{res['stage']}`",
        "",
        f"- pairs: {res['n_pairs']}, folds: {res['folds']}, seed: {res['seed']}, scorer from: {res['scorer']['start']}",
        f"- estimated flip rate: **{res['flip_rate']:.3f}** (95% interval {lo:.3f} to {hi:.3f})",
        f"- suggested eps for cdpo / rdpo: **{res['suggested_eps']:.2f}** "
        f"(`stages.{res['stage']}.loss.name=rdpo stages.{res['stage']}.loss.eps={res['suggested_eps']:.2f}`)",
        f"- raw disagreement of the out-of-fold scorers with the labels: {res['disagreement_rate']:.3f} (includes the "
        "scorers' own mistakes; not an estimate of the flip rate)",
        f"- method: {res['method']}; {res['mixture']['components']} component(s)",
        *(f"- **warning**: {w}" for w in res["warnings"]),
        "",
        "The estimate counts flips the scorer can see (pairs it separates); flips of pairs it cannot tell apart are "
        "assumed to happen at the same rate. Suspicion: the posterior probability that the pair's label is flipped.",
        "",
        f"## The {min(SHOWN, len(order))} most suspect pairs",
        "",
        "| row | suspicion | margin | prompt | chosen | rejected |",
        "|---:|---:|---:|---|---|---|",
    ]
    for i in order[:SHOWN]:
        row = pairs[int(i)]
        p = res["pairs"][int(i)]
        lines.append(
            f"| {int(i)} | {p['suspicion']:.3f} | {p['margin']:.3f} | {_cell(row.get('prompt', ''))} | "
            f"{_cell(row['chosen'])} | {_cell(row['rejected'])} |"
        )
    return "\n".join(lines) + "\n"


def _write_cleaned(pairs, dropped: np.ndarray, path: Path) -> Path:
    """The pairs without rows `dropped`, as JSON lines in canonical columns (a later stage's dataset.path)."""
    drop = {int(i) for i in dropped}
    with path.open("w", encoding="utf-8") as f:
        for i, row in enumerate(pairs):
            if i not in drop:
                f.write(json.dumps(row) + "\n")
    return path
