"""How much can `alignlab bench robustness` tell apart? A power calculation from runs of the bench.

    python bench/robustness_power.py runs/bench-robustness-smollm2 [runs/...-seed1 ...] [--base dpo-flip00]

Each folder is a bench run (`--seeds N` runs are read from their seed-<s>/ folders); folders of the same recipe
seed (one grid run in parts) count as one seed. The measure is the
implicit-reward accuracy on the held-out pairs (eval.json `preference_accuracy`, its per-pair margins under
`per_pair`). For every cell it prints:
- its accuracy per seed, and the standard error from the pairs, sqrt(a (1 - a) / n);
- against the `--base` cell (default: DPO on clean labels) at the same seed, the paired difference and its standard
  error from the pairs, sqrt(var(o_cell - o_base) / n) with o the per-pair outcomes (1 right, 1/2 tie, 0 wrong):
  the same pairs score both cells, so only the pairs where they disagree add noise;
- the seed-to-seed standard deviation of the cell's accuracy, where there are several seeds.

Then the smallest difference between two cells that a comparison detects with 80% power at the 5% level (two-sided):
2.80 x sqrt(s_pairs^2 + 2 s_seed^2 / S) for S seeds, where s_pairs is the median paired standard error above and
s_seed the pooled seed standard deviation. With the smollm2 preset the held-out pairs are the same for every seed
(generated once), so the pairs' part does not shrink with seeds; the training noise does. Folders merged as one
seed must hold the same held-out pairs (e.g. copies of one run's generate stages). Writes bench/results/robustness_power.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

Z = 1.96 + 0.84  # two-sided 5% level, 80% power


def outcomes(margins: list[float]) -> list[float]:
    return [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]


def read_run(folder: Path) -> dict[str, dict]:
    """{cell: eval.json} of one bench run; a --seeds run's seed folders are read as runs of their own."""
    cells = {}
    for ev in sorted(folder.glob("eval-*/eval.json")):
        cells[ev.parent.name.removeprefix("eval-")] = json.loads(ev.read_text())
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="bench run folders, one per seed")
    ap.add_argument("--base", default="dpo-flip00", help="the cell the others are compared with")
    ap.add_argument("--seeds", default="1,2,3,5", help="seed counts to show the detectable difference for")
    args = ap.parse_args()

    folders = []
    for run in args.runs:
        seeds = sorted(run.glob("seed-*"))
        folders += seeds if seeds else [run]
    runs: dict[str, dict] = {}  # seed -> {cell: eval.json}: folders of one seed (a grid run in parts) merge
    for f in folders:
        seed = str(yaml.safe_load((f / "recipe.yaml").read_text()).get("seed", 0))
        runs.setdefault(seed, {}).update(read_run(f))
    names = sorted({c for cells in runs.values() for c in cells})
    rows, paired_se, seed_var = [], [], []
    for name in names:
        accs, pair_se, diffs, n, extra = [], [], [], None, []
        for seed, cells in runs.items():
            res = cells.get(name)
            if res is None or res.get("preference_accuracy") is None:
                continue
            a = res["preference_accuracy"]
            margins = (res.get("per_pair") or {}).get("preference_margin")
            n = len(margins) if margins else n
            accs.append(a)
            ci = res.get("preference_accuracy_ci") or [None, None]
            extra.append({"seed": seed, "ci": ci, "true_reward": res.get("true_reward"), "kl": res.get("kl")})
            base = cells.get(args.base)
            base_m = (base.get("per_pair") or {}).get("preference_margin") if base else None
            if margins and base_m and name != args.base:
                if len(margins) != len(base_m):
                    raise SystemExit(f"seed {seed}: {name} and {args.base} were scored on different pairs")
                d = [x - y for x, y in zip(outcomes(margins), outcomes(base_m))]
                diffs.append(statistics.fmean(d))
                pair_se.append(statistics.stdev(d) / len(d) ** 0.5)
                extra[-1].update(diff=diffs[-1], se_diff=pair_se[-1])
        if not accs:
            continue
        n_pairs = n or 0
        row = {
            "cell": name,
            "accuracy": accs,
            "pairs": n_pairs,
            "se_pairs": (accs[0] * (1 - accs[0]) / n_pairs) ** 0.5 if n_pairs else None,
            "diff_vs_base": diffs,
            "se_paired_diff": pair_se,
            "seed_sd": statistics.stdev(accs) if len(accs) > 1 else None,
            "per_seed": extra,
        }
        paired_se += pair_se
        if len(accs) > 1:
            seed_var.append(statistics.variance(accs))
        rows.append(row)

    print(f"| cell | seeds | accuracy | SE (pairs) | vs {args.base} (paired) | SE of that | seed SD |")
    print("|---|---:|---|---:|---|---:|---:|")
    for r in rows:
        f = ", ".join(f"{x:.3f}" for x in r["accuracy"])
        d = ", ".join(f"{x:+.3f}" for x in r["diff_vs_base"]) or "-"
        s = ", ".join(f"{x:.3f}" for x in r["se_paired_diff"]) or "-"
        sd = f"{r['seed_sd']:.3f}" if r["seed_sd"] is not None else "-"
        se = f"{r['se_pairs']:.3f}" if r["se_pairs"] else "-"
        print(f"| {r['cell']} | {len(r['accuracy'])} | {f} | {se} | {d} | {s} | {sd} |")

    print("\n| cell | seed | held-out pair accuracy [95%] | vs base (paired, 95%) | true reward | KL |")
    print("|---|---:|---|---|---:|---:|")
    for r in rows:
        for a, e in zip(r["accuracy"], r["per_seed"]):
            lo, hi = e["ci"]
            ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None else ""
            d = ""
            if "diff" in e:
                m, se = e["diff"], e["se_diff"]
                d = f"{m:+.3f} [{m - 1.96 * se:+.2f}, {m + 1.96 * se:+.2f}]"
            tr = f"{e['true_reward']:.3f}" if e["true_reward"] is not None else ""
            kl = f"{e['kl']:.2f}" if e["kl"] is not None else ""
            print(f"| {r['cell']} | {e['seed']} | {a:.3f}{ci} | {d} | {tr} | {kl} |")

    s_pairs = statistics.median(paired_se) if paired_se else None
    s_seed = statistics.fmean(seed_var) ** 0.5 if seed_var else None
    detect = {}
    if s_pairs is not None:
        print(
            f"\npaired SE from the pairs (median): {s_pairs:.3f}; pooled seed SD: {s_seed if s_seed is None else f'{s_seed:.3f}'}"
        )
        for k in (int(x) for x in args.seeds.split(",")):
            detect[k] = Z * (s_pairs**2 + 2 * (s_seed or 0.0) ** 2 / k) ** 0.5
            print(f"  {k} seed(s): a difference of {detect[k]:.3f} is detected with 80% power")
    out = Path(__file__).parent / "results" / "robustness_power.json"
    out.write_text(
        json.dumps(
            {
                "runs": [str(f) for f in folders],
                "seeds": list(runs),
                "base": args.base,
                "rows": rows,
                "se_paired_median": s_pairs,
                "seed_sd_pooled": s_seed,
                "detectable_difference_80pct": detect,
            },
            indent=2,
        )
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
