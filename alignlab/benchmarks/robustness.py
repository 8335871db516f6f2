"""`alignlab bench robustness`: preference losses under label noise, all from one SFT checkpoint.

For every loss and every label-flip rate, a DPO stage (for `kto`: a kto stage, each pair read as two feedback rows)
starts from the same SFT stage and trains on preference pairs of `builtin:arith` with that fraction of labels
flipped (seeded); an eval stage then measures, against the
SFT model, the true reward of greedy completions on held-out prompts and the implicit-reward accuracy on
held-out pairs whose labels are NOT flipped. The whole grid is one ordinary alignlab recipe (written to
`<out>/recipe.yaml`) run by the pipeline, so an interrupted bench picks up where it stopped and any cell can be
rerun by hand with `alignlab run <out>/recipe.yaml --stage <name> --force`.

Presets: `small` (the tiny model on `builtin:arith`, from an SFT stage), `smollm2` (the real built-in model on
`builtin:constraints`: pairs the base model generates and the constraint checker ranks, DPO cells from the base
model, held-out pairs from the eval split's prompts) and `full` (a 0.5B hub model, for a GPU).

`--eps-from-audit` (experimental) gives cdpo and rdpo the flip rate `alignlab audit preferences` estimates for their
training pairs at each flip rate (audit_eps) instead of the guess in LOSS_PARAMS.

Writes `<out>/robustness.json` (one row per cell), `<out>/robustness.md` (tables) and `<out>/robustness.png`.

`--seeds N` (default 1) runs the whole bench N times, with recipe seeds seed, seed + 1, ..., each in
`<out>/seed-<s>/` (its own recipe and run: LoRA initialisation, data order, the generated pairs and which labels
flip all change with the seed; the pairs a preset's generate stages make are shared: seed_recipes). Each cell of
robustness.json then holds the mean over seeds as its value, with
`<key>_std` (sample standard deviation over seeds), `<key>_min`, `<key>_max` and `<key>_values` (every seed's,
in seed order: nothing is picked), and the tables show mean +- std. One seed says nothing about how much of a
difference between two losses is noise; the spread over seeds does.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from alignlab.data.formats import stage_data_path
from alignlab.evaluation.stats import spread
from alignlab.losses.catalog import preference_loss_info
from alignlab.recipe import Recipe, RecipeError, apply_override, parse_recipe
from alignlab.stages.registry import STAGE_DATA

LOSSES = ("dpo", "cdpo", "rdpo", "ipo", "drdpo", "kldpo", "wdpo", "ln_dpo", "simpo", "orpo", "kto")
FLIP_RATES = (0.0, 0.2, 0.4)
# Per-loss parameters (besides the preset's beta). cdpo/rdpo assume a noise rate of 0.2 whatever the real one is: a
# user rarely knows it. The losses on per-token averages (ln_dpo, simpo, orpo) bring their own beta (their catalog
# defaults: the preset's beta is a DPO beta on summed log-ratios). Change them with overrides on the written recipe,
# or here.
LOSS_PARAMS: dict[str, dict] = {
    "dpo": {},
    "cdpo": {"eps": 0.2},
    "rdpo": {"eps": 0.2},
    "ipo": {},
    "drdpo": {"beta_prime": 1.0},
    "kldpo": {"tau": 1.0},
    "wdpo": {"rho": 0.01},
    "ln_dpo": {"beta": 5.0},
    "simpo": {"beta": 2.0, "gamma": 1.0},
    "orpo": {"beta": 0.1},
    "kto": {},  # a kto stage, not a dpo loss: the pairs as feedback rows (chosen desirable), the preset's beta
}
CELL_TYPES = ("dpo", "kto")  # the stage types of the cells
RESULT_KEYS = ("true_reward", "preference_accuracy", "preference_margin", "win_rate", "kl")


def _arith_eval(num_prompts: int, num_pairs: int) -> dict:
    """The eval settings of the builtin:arith presets: greedy answers to `num_prompts` held-out prompts, and
    `num_pairs` held-out pairs with clean labels."""
    return {
        "dataset": {"path": "builtin:arith", "split": "eval", "size": num_prompts},
        "preference_dataset": {"path": "builtin:arith", "split": "preference_eval", "size": num_pairs},
        "reward_fn": "alignlab.builtin.tasks:arith_reward",
        "num_prompts": num_prompts,
        "rollout": {"max_new_tokens": 8},
        "num_samples_shown": 3,
    }


# A preset: the model, its PEFT, the SFT stage, and the dpo/eval settings shared by every cell.
PRESETS: dict[str, dict] = {
    # ~35 minutes on 2 CPU cores with the builtin 3M-parameter model (33 cells of 60 steps; 21 DPO cells took ~20).
    "small": {
        "model": {"name_or_path": "builtin:tiny-llama"},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "sft": {
            "dataset": {"path": "builtin:arith", "split": "sft", "size": 1600, "eval_size": 64},
            "train": {
                "max_steps": 100,
                "per_device_batch_size": 16,
                "learning_rate": 3e-3,
                "max_length": 48,
                "logging_steps": 10,
            },
        },
        "dpo": {
            "dataset": {"path": "builtin:arith", "split": "preference", "size": 960, "eval_size": 64},
            "beta": 0.2,
            "train": {
                "epochs": 1,
                "per_device_batch_size": 16,
                "learning_rate": 2e-3,
                "max_length": 48,
                "logging_steps": 5,
            },
        },
        "eval": _arith_eval(80, 200),
    },
    # The real built-in model on the verifiable-instruction task: the base model's own answers, 4 per
    # prompt, ranked by the constraint checker into pairs (generate stages, run once and shared by every seed), DPO
    # cells straight from the base model (it is already instruction-tuned: no SFT stage), and held-out pairs on the
    # eval split's prompts and constraint combinations, whose labels never flip. The measure is the implicit-reward
    # accuracy on those pairs; the power calculation behind the sizes is in docs/robustness.md ("On a real model").
    "smollm2": {
        "model": {"name_or_path": "builtin:smollm2-135m-instruct"},
        "losses": ("dpo", "cdpo", "rdpo"),
        "flip_rates": (0.0, 0.4),
        "peft": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "generate": {
            "pairs": {"path": "builtin:constraints", "split": "train", "size": 256},
            "pairs-eval": {"path": "builtin:constraints", "split": "eval", "size": 160},
        },
        "generate_settings": {
            "reward_fn": "builtin:constraints",
            "output": "preference",
            "rollout": {"num_samples": 4, "max_new_tokens": 48, "temperature": 1.0, "batch_size": 16},
        },
        "dpo": {
            "dataset": {"path": "stage:pairs"},
            "beta": 0.1,
            "train": {
                "epochs": 2,
                "per_device_batch_size": 8,
                "learning_rate": 3e-4,
                "warmup_ratio": 0.1,
                "max_length": 256,
                "logging_steps": 5,
            },
        },
        "eval": {
            "dataset": {"path": "builtin:constraints", "split": "eval", "size": 160},
            "preference_dataset": {"path": "stage:pairs-eval"},
            "reward_fn": "builtin:constraints",
            "num_prompts": 32,
            "rollout": {"max_new_tokens": 48},
            "num_samples_shown": 3,
        },
    },
    # For a GPU: a real 0.5B instruct model, more data and steps, bf16.
    "full": {
        "model": {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "dtype": "bfloat16"},
        "peft": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "sft": {
            "dataset": {"path": "builtin:arith", "split": "sft", "size": 8000, "eval_size": 200},
            "train": {"epochs": 1, "per_device_batch_size": 32, "learning_rate": 2e-4, "max_length": 64, "bf16": True},
        },
        "dpo": {
            "dataset": {"path": "builtin:arith", "split": "preference", "size": 4000, "eval_size": 200},
            "beta": 0.1,
            "train": {"epochs": 1, "per_device_batch_size": 32, "learning_rate": 5e-5, "max_length": 64, "bf16": True},
        },
        "eval": _arith_eval(90, 500),
    },
}


def cell_name(loss: str, flip_rate: float) -> str:
    return f"{loss}-flip{round(flip_rate * 100):02d}"


def audit_settings(preset: str, folds: int | None = None, epochs: float | None = None) -> dict:
    """run_audit's folds, epochs and learning_rate for --eps-from-audit: the given ones, else the preset's."""
    preset_audit = PRESETS.get(preset, {}).get("audit", {})
    return {
        "folds": folds or preset_audit.get("folds", 5),
        "epochs": epochs or preset_audit.get("epochs", 2.0),
        "learning_rate": preset_audit.get("learning_rate"),
    }


def build_recipe(
    preset: str = "small",
    losses: tuple[str, ...] | list[str] | None = None,
    flip_rates: tuple[float, ...] | list[float] | None = None,
    output_dir: str = "runs/bench-robustness",
    seed: int = 0,
    overrides: list[str] | None = None,
) -> Recipe:
    """The bench as a recipe: stage `sft`, then for each cell `<loss>-flipNN` (dpo, input sft) and `eval-<cell>`."""
    if preset not in PRESETS:
        raise RecipeError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    losses = losses or PRESETS[preset].get("losses", LOSSES)
    flip_rates = flip_rates if flip_rates is not None else PRESETS[preset].get("flip_rates", FLIP_RATES)
    unknown = [name for name in losses if name not in LOSS_PARAMS]
    if unknown:
        raise RecipeError(f"unknown loss {unknown[0]!r}; the bench knows: {', '.join(LOSS_PARAMS)}")
    p = copy.deepcopy(PRESETS[preset])
    stages: list[dict] = []
    if "sft" in p:
        stages.append({"name": "sft", "type": "sft", **p["sft"]})
    for name, dataset in p.get("generate", {}).items():
        stages.append({"name": name, "type": "generate", "input": "base", "dataset": dataset, **p["generate_settings"]})
    start = "sft" if "sft" in p else "base"
    for flip in flip_rates:
        for loss in losses:
            name = cell_name(loss, flip)
            dataset = {**p["dpo"]["dataset"], "flip_rate": flip}
            stages.append(_cell_stage(name, loss, start, dataset, p["dpo"]))
            stages.append(
                {
                    "name": f"eval-{name}",
                    "type": "eval",
                    "input": name,
                    "reference": start,
                    "beta": p["dpo"]["beta"],
                    **copy.deepcopy(p["eval"]),
                }
            )
    raw = {
        "name": f"bench-robustness-{preset}",
        "seed": seed,
        "output_dir": output_dir,
        "model": p["model"],
        "peft": p["peft"],
        "stages": stages,
    }
    for override in overrides or []:
        apply_override(raw, override)
    return parse_recipe(raw)


def _cell_stage(name: str, loss: str, start: str, dataset: dict, dpo: dict) -> dict:
    """One cell's training stage: dpo with `loss`, or for "kto" a kto stage on the same pairs read as feedback rows
    (two rows per pair, so twice the batch: the same number of steps, each on the same pairs' answers)."""
    train = copy.deepcopy(dpo["train"])
    if loss == "kto":
        train["per_device_batch_size"] *= 2
        return {"name": name, "type": "kto", "input": start, "dataset": dataset, "beta": dpo["beta"], "train": train}
    return {
        "name": name,
        "type": "dpo",
        "input": start,
        "dataset": dataset,
        "loss": {"name": loss, "beta": dpo["beta"], **LOSS_PARAMS[loss]},
        # reference-free losses (simpo, orpo) have no reference log-probs to precompute
        "precompute_ref_logps": preference_loss_info(loss).needs_reference,
        "train": train,
    }


def cell_loss(spec) -> str:
    """The loss of a cell's training stage: its dpo loss name, or "kto"."""
    return spec.loss.name if spec.type == "dpo" else spec.type


def collect(recipe: Recipe) -> list[dict]:
    """One row per (loss, flip rate) from the eval stages' eval.json, plus the SFT starting point."""
    rows = []
    for spec in recipe.stages:
        if spec.type not in CELL_TYPES:
            continue
        res = json.loads((recipe.run_dir / f"eval-{spec.name}" / "eval.json").read_text())
        row = {"loss": cell_loss(spec), "flip_rate": spec.dataset.flip_rate}
        row.update({k: res.get(k) for k in RESULT_KEYS})
        row["preference_accuracy_ci"] = res.get("preference_accuracy_ci")  # over the held-out pairs (one seed)
        row["true_reward_sft"] = res.get("true_reward_reference")
        # cdpo/rdpo: the flip rate the loss assumes
        row["eps"] = spec.loss.model_dump().get("eps") if spec.type == "dpo" else None
        rows.append(row)
    return rows


def table(rows: list[dict], key: str) -> str:
    """One row per loss, one column per flip rate; `mean +- std` when the rows hold several seeds."""
    flips = sorted({r["flip_rate"] for r in rows})
    losses = list(dict.fromkeys(r["loss"] for r in rows))
    cell = {(r["loss"], r["flip_rate"]): r for r in rows}
    lines = ["| loss | " + " | ".join(f"flip {f:g}" for f in flips) + " |", "|---|" + "---:|" * len(flips)]
    for loss in losses:
        vals = [_cell(cell.get((loss, f)), key) for f in flips]
        lines.append(f"| {loss} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def _cell(row: dict | None, key: str) -> str:
    if row is None or row.get(key) is None:
        return ""
    std = row.get(f"{key}_std")
    return f"{row[key]:.3f}" if std is None or std != std else f"{row[key]:.3f} ± {std:.3f}"


def over_seeds(per_seed: list[list[dict]]) -> list[dict]:
    """Cells of several seeds' runs (the same grid) -> one row per cell: the mean over seeds as the value, and
    `<key>_std`, `_min`, `_max`, `_values` (alignlab.evaluation.stats.spread)."""
    out = []
    for cells in zip(*per_seed):
        row = {"loss": cells[0]["loss"], "flip_rate": cells[0]["flip_rate"], "seeds": len(cells)}
        for key in (*RESULT_KEYS, "true_reward_sft", "eps", "audit_flip_rate"):
            s = spread([c.get(key) for c in cells])
            row[key] = s["mean"] if s["n"] else None
            row.update({f"{key}_{k}": s[k] for k in ("std", "min", "max", "values")})
        out.append(row)
    return out


def markdown(rows: list[dict], recipe: Recipe, seeds: list[int] | None = None) -> str:
    start_reward = next((r["true_reward_sft"] for r in rows if r["true_reward_sft"] is not None), None)
    seeds = seeds or [recipe.seed]
    which = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean ± std over seeds {', '.join(map(str, seeds))}"
    cells = [s for s in recipe.stages if s.type in CELL_TYPES]
    start = cells[0].input if cells else "sft"
    start_name = "the base model" if start == "base" else f"the `{start}` checkpoint"
    parts = [
        f"# Robustness bench: {recipe.name}",
        "",
        f"Model `{recipe.model.name_or_path}`, PEFT `{recipe.peft.method}`, {which}. Every cell starts "
        f"from {start_name}; label flips are seeded and applied to the cells' training pairs only.",
        "",
        "## Implicit-reward accuracy on held-out pairs (clean labels)",
        "",
        table(rows, "preference_accuracy"),
        "",
        f"## True reward of greedy completions on held-out prompts (start: {start_reward:.3f})"
        if start_reward is not None
        else "## True reward of greedy completions on held-out prompts",
        "",
        table(rows, "true_reward"),
        "",
    ]
    if any(r.get("audit_flip_rate") is not None for r in rows):
        parts += ["## Flip rate estimated by the audit (the eps given to cdpo and rdpo)", "",
                  table([r for r in rows if r.get("eps") is not None], "audit_flip_rate"), ""]  # fmt: skip
    return "\n".join(parts)


def plot(rows: list[dict], path: Path) -> Path:
    """True reward and held-out accuracy against the flip rate, one line per loss, with +- one standard deviation
    over seeds when there are several (matplotlib's object API, as in alignlab.plots: the user's backend is left
    alone)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, key, title in zip(axes, ("true_reward", "preference_accuracy"), ("true reward", "held-out accuracy")):
        for loss in dict.fromkeys(r["loss"] for r in rows):
            pts = sorted(
                (r["flip_rate"], r[key], r.get(f"{key}_std") or 0.0)
                for r in rows
                if r["loss"] == loss and r[key] is not None
            )
            xs, ys, err = [p[0] for p in pts], [p[1] for p in pts], [p[2] if p[2] == p[2] else 0.0 for p in pts]
            ax.errorbar(xs, ys, yerr=err if any(err) else None, marker="o", capsize=3, label=loss)
        ax.set_xlabel("label flip rate")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def seed_recipes(recipe: Recipe, seeds: int) -> list[Recipe]:
    """The bench at `seeds` consecutive recipe seeds, each in <out>/seed-<s>; one seed: the recipe itself.

    Generated data (the generate stages of a preset such as smollm2) is made once, by the first seed's run, and
    read by every later seed from the first seed's folder: the seeds then differ in training (LoRA initialisation,
    data order, which labels flip), not in the sample of pairs, and compare on the same held-out pairs."""
    if seeds < 1:
        raise RecipeError(f"--seeds must be at least 1 (got {seeds})")
    if seeds == 1:
        return [recipe]
    raw = recipe.model_dump(mode="json", serialize_as_any=True)
    first = recipe.run_dir / f"seed-{recipe.seed}"
    out = []
    for k in range(seeds):
        seed = recipe.seed + k
        stages = raw["stages"] if k == 0 else _read_first_seed_data(raw["stages"], first)
        run_dir = str(recipe.run_dir / f"seed-{seed}")
        out.append(parse_recipe({**raw, "seed": seed, "output_dir": run_dir, "stages": stages}))
    return out


def _read_first_seed_data(stages: list[dict], first: Path) -> list[dict]:
    """The stages without their generate stages, each `stage:NAME` dataset of one read from `first`'s folder."""
    generated = {s["name"] for s in stages if s["type"] == "generate"}
    out = []
    for stage in stages:
        if stage["name"] in generated:
            continue
        stage = copy.deepcopy(stage)
        for value in stage.values():
            path = value.get("path") if isinstance(value, dict) else None
            if isinstance(path, str) and path.startswith(STAGE_DATA) and path[len(STAGE_DATA) :] in generated:
                value["path"] = str(stage_data_path(first, path[len(STAGE_DATA) :]))
        out.append(stage)
    return out


AUDITED_LOSSES = ("cdpo", "rdpo")  # the losses whose eps `--eps-from-audit` sets


def audit_eps(recipe: Recipe, settings: dict, force: bool = False) -> dict[float, dict]:
    """eps for the cdpo/rdpo cells from `alignlab audit preferences` instead of a guess: for each flip rate with
    such a cell, the cell's training pairs (the same pairs and flipped labels as every cell of that rate in this
    run) are audited once, in <run>/audit/flipNN/ (reused when its audit.json is for the same data and settings).
    `settings`: run_audit's folds, epochs, learning_rate. Returns {flip rate: audit.json's content}. The stages
    before the cells (sft, generate) run first: the pairs must exist, and the scorers start from the cells' input."""
    from alignlab.audit.command import run_audit, scorer_learning_rate
    from alignlab.pipeline import run_pipeline

    for spec in recipe.stages:
        if spec.type not in (*CELL_TYPES, "eval"):
            run_pipeline(recipe, only=spec.name, force=force)
    out = {}
    for spec in recipe.stages:
        if spec.type != "dpo" or spec.loss.name not in AUDITED_LOSSES or spec.dataset.flip_rate in out:
            continue
        folder = recipe.run_dir / "audit" / f"flip{round(spec.dataset.flip_rate * 100):02d}"
        done = folder / "audit.json"
        wanted = {
            "dataset": spec.dataset.model_dump(exclude_defaults=True),
            "folds": settings["folds"],
            "seed": recipe.seed,
        }
        lr = settings["learning_rate"] or scorer_learning_rate(recipe, spec)
        scorer = {"epochs": settings["epochs"], "learning_rate": lr}
        if done.exists() and not force:
            res = json.loads(done.read_text())
            same_scorer = all(res["scorer"].get(k) == v for k, v in scorer.items())
            if all(res.get(k) == v for k, v in wanted.items()) and same_scorer:
                out[spec.dataset.flip_rate] = res
                continue
        out[spec.dataset.flip_rate] = run_audit(recipe, spec.name, out=folder, **settings)[0]
    return out


def with_audited_eps(recipe: Recipe, audits: dict[float, dict]) -> Recipe:
    """The recipe with each cdpo/rdpo cell's eps the audit's suggestion for its flip rate."""
    raw = recipe.model_dump(mode="json", serialize_as_any=True)
    for stage in raw["stages"]:
        if stage["type"] == "dpo" and stage["loss"]["name"] in AUDITED_LOSSES:
            stage["loss"]["eps"] = audits[stage["dataset"]["flip_rate"]]["suggested_eps"]
    return parse_recipe(raw)


def run_bench(
    recipe: Recipe, force: bool = False, seeds: int = 1, audit: dict | None = None
) -> tuple[list[dict], Path]:
    """Run (or finish) the bench recipe, at `seeds` seeds; write robustness.{json,md,png} into its run dir.
    `audit` (run_audit's folds, epochs, learning_rate): set cdpo/rdpo's eps from an audit of each seed's pairs at
    each flip rate (audit_eps). Returns rows, md path."""
    from accelerate import PartialState

    from alignlab.pipeline import run_pipeline

    out = recipe.run_dir
    runs = seed_recipes(recipe, seeds)
    per_seed = []
    for i, r in enumerate(runs):
        if audit is not None:
            audits = audit_eps(r, audit, force=force)
            runs[i] = r = with_audited_eps(r, audits)
        if audit is not None and force:  # the stages before the cells were forced (and audited) already
            for spec in r.stages:
                if spec.type in (*CELL_TYPES, "eval"):
                    run_pipeline(r, only=spec.name, force=True)
        else:
            run_pipeline(r, force=force)
        cells = collect(r)
        if audit is not None:
            for cell in cells:
                res = audits.get(cell["flip_rate"])
                cell["audit_flip_rate"] = res["flip_rate"] if res else None
        per_seed.append(cells)
    rows = per_seed[0] if seeds == 1 else over_seeds(per_seed)
    if PartialState().is_main_process:
        doc = {"recipe": recipe.name, "seeds": [r.seed for r in runs], "rows": rows}
        if seeds > 1:
            doc["per_seed"] = {str(r.seed): cells for r, cells in zip(runs, per_seed)}
        (out / "robustness.json").write_text(json.dumps(doc, indent=2))
        (out / "robustness.md").write_text(markdown(rows, recipe, [r.seed for r in runs]))
        plot(rows, out / "robustness.png")
    return rows, out / "robustness.md"
