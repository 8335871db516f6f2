"""How well `alignlab audit preferences` recovers an injected label-flip rate: the "Auditing preference labels"
table of docs/robustness.md.

For each flip rate, the quickstart recipe's dpo stage (builtin:arith `preference` split, builtin:tiny-llama) with
`dataset.flip_rate` (and `dataset.flip_mode`) set, audited with 5 folds; the truth is the fraction of rows whose
chosen/rejected differ from the same data built without flips. Writes bench/results/audit_flip_rates.json (per rate:
truth, estimate, interval, raw disagreement, seconds, and every pair's margin with its true flip flag, so that the
estimator can be studied offline) and prints the table as markdown.

    python bench/audit_flip_rates.py                                  # 0, 0.1, 0.2, 0.3, 0.4 uniform (~25 min, 2 CPUs)
    python bench/audit_flip_rates.py --rates 0.2 --mode near_tie      # near-tie noise
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH_ENV, CACHE, REPO, RESULTS  # noqa: E402

os.environ.update({k: v for k, v in BENCH_ENV.items() if k not in os.environ})
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0,0.1,0.2,0.3,0.4")
    ap.add_argument("--mode", default="uniform", help="dataset.flip_mode: uniform or near_tie")
    ap.add_argument("--size", type=int, default=1000, help="preference pairs audited")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "audit_flip_rates.json"))
    ap.add_argument(
        "--refit",
        action="store_true",
        help="train nothing: fit the flip rate again on every stored row's margins with the current estimator",
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from alignlab.audit.command import run_audit
    from alignlab.data import build_datasets
    from alignlab.recipe import load_recipe

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"rows": []}
    if args.refit:
        for row in results["rows"]:
            _refit(row)
        out.write_text(json.dumps(results) + "\n")
    for rate in (float(r) for r in args.rates.split(",")) if not args.refit else ():
        sets = [
            f"stages.dpo.dataset.size={args.size}",
            f"stages.dpo.dataset.flip_rate={rate}",
            f"stages.dpo.dataset.flip_mode={args.mode}",
            f"seed={args.seed}",
            f"output_dir={CACHE / 'audit' / f'{args.mode}-{rate}'}",
        ]
        recipe = load_recipe(REPO / "recipes/quickstart.yaml", sets)
        spec = recipe.stage("dpo")
        clean, _ = build_datasets(
            spec.dataset.model_copy(update={"flip_rate": 0.0}), recipe, "dpo", True, with_eval=False
        )
        noisy, _ = build_datasets(spec.dataset, recipe, "dpo", True, with_eval=False)
        flipped = [a != b for a, b in zip(clean["chosen"], noisy["chosen"])]
        start = time.time()
        res, _ = run_audit(
            recipe, "dpo", folds=args.folds, seed=args.seed, epochs=args.epochs, learning_rate=args.learning_rate
        )
        row = {
            "mode": args.mode,
            "rate": rate,
            "truth": sum(flipped) / len(flipped),
            "estimate": res["flip_rate"],
            "interval": res["interval"],
            "disagreement": res["disagreement_rate"],
            "components": res["mixture"]["components"],
            "seconds": time.time() - start,
            "size": args.size,
            "folds": args.folds,
            "epochs": args.epochs,
            "learning_rate": args.learning_rate,
            "seed": args.seed,
            "margins": [round(p["margin"], 5) for p in res["pairs"]],
            "fold": [p["fold"] for p in res["pairs"]],
            "flipped": [int(f) for f in flipped],
        }
        results["rows"] = [
            r
            for r in results["rows"]
            if (r["mode"], r["rate"], r["size"], r["seed"]) != (args.mode, rate, args.size, args.seed)
        ] + [row]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results) + "\n")
        print(_line(row), flush=True)
    print(
        "\n| noise | seed | flipped (truth) | flipped among separated pairs | estimate | 95% interval | raw disagreement "
        "| time |\n|---|---:|---:|---:|---:|---|---:|---:|"
    )
    for r in sorted(results["rows"], key=lambda r: (r["mode"], r["seed"], r["rate"])):
        print(_line(r))


def _refit(row: dict) -> None:
    """The estimate, interval and components of a stored row, from its margins, as run_audit fits them now."""
    import numpy as np

    from alignlab.audit.command import _scale_per_fold
    from alignlab.audit.mixture import fit_flip_rate

    fit = fit_flip_rate(_scale_per_fold(np.array(row["margins"]), np.array(row["fold"])), seed=row["seed"])
    row.update(estimate=fit.eps, interval=list(fit.interval), components=fit.components, refitted=True)


def seen_truth(r: dict) -> float:
    """The true flip rate among the pairs the scorers separate: |m| above half its fold's RMS (on builtin:arith the
    margins fall in two clusters, near 0 (pairs differing only in arithmetic) and near +-1.2 RMS (in manners)); the
    mixture can only see flips there. Uses the true flags, for the table only."""
    import numpy as np

    from alignlab.audit.command import _scale_per_fold

    x = _scale_per_fold(np.array(r["margins"]), np.array(r["fold"]))
    seen = np.abs(x) > 0.5
    return float(np.mean(np.array(r["flipped"], dtype=bool)[seen])) if seen.any() else float("nan")


def _line(r: dict) -> str:
    lo, hi = r["interval"]
    return (
        f"| {r['mode']} {r['rate']:.1f} | {r['seed']} | {r['truth']:.3f} | {seen_truth(r):.3f} | {r['estimate']:.3f} | "
        f"{lo:.3f} to {hi:.3f} | {r['disagreement']:.3f} | {r['seconds'] / 60:.1f} min |"
    )


if __name__ == "__main__":
    main()
