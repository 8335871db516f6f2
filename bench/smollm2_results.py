"""What alignment reaches on a real model: the numbers of docs/results.md's "On a real model" table.

Runs the SmolLM2-135M-Instruct recipes (`recipes/smollm2_*_lora.yaml`) on `builtin:constraints`, each whole, at the
seeds given, in bench/.cache/smollm2/<name>-s<seed> (stages finished there with the same settings are reused, as
`alignlab run` does). Every one of them ends in the same eval stage: 160 held-out prompts (10 per constraint kind,
held-out topics and combinations), greedy answers of the policy and of the base model on the same prompts, KL on
answers sampled at temperature 1, NLL on a fixed text. Writes bench/results/smollm2.json: per recipe and seed, its
eval.json (without the samples, with the first 3 of them), the time its stages took, the machine and the versions;
`python scripts/gen_docs.py` then rewrites the docs/results.md tables from that file.

    python bench/smollm2_results.py --recipes sft_dpo,grpo --seeds 0,1,2     # ~15-60 min per run on 2 CPU cores
    python bench/smollm2_results.py --recipes ppo --seeds 0 --collect runs/my-ppo-run --minutes 35   # a run by hand

A recipe's seed moves its training (sampling, data order, LoRA init); the eval's prompts and greedy decoding stay
fixed, so the base model's row is the same in every run (checked when the table is written).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CACHE, REPO, RESULTS, command_line, machine, versions  # noqa: E402

RECIPES = {
    "sft_dpo": "recipes/smollm2_sft_dpo_lora.yaml",
    "generate_dpo": "recipes/smollm2_generate_dpo_lora.yaml",
    "ppo": "recipes/smollm2_ppo_lora.yaml",
    "grpo": "recipes/smollm2_grpo_lora.yaml",
    "bon_sft": "recipes/smollm2_bon_sft_lora.yaml",
    "revise_sft": "recipes/smollm2_revise_sft_lora.yaml",
    "revise_sft_2rounds": "recipes/smollm2_revise_sft_2rounds_lora.yaml",
    "revise_sft_2rounds_ul": "recipes/smollm2_revise_sft_2rounds_ul_lora.yaml",
    "revise_sft_dpo": "recipes/smollm2_revise_sft_dpo_lora.yaml",
    "revise_sft_grpo": "recipes/smollm2_revise_sft_grpo_lora.yaml",
    "revise_sft_grpo_ul": "recipes/smollm2_revise_sft_grpo_ul_lora.yaml",
}


def _alignlab(*args: str, threads: str) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "alignlab", *args, "--threads", threads]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, check=True)


def collect(name: str, seed: int, run_dir: Path, seconds: float | None) -> dict:
    """One row's numbers from a finished run folder; `seconds`: the wall time of its `alignlab run` (file times cannot
    tell it: a rerun that reuses a finished stage touches its files)."""
    eval_json = run_dir / "eval" / "eval.json"
    if not eval_json.exists():
        raise SystemExit(f"{eval_json} does not exist: the run of {RECIPES[name]} has not finished its eval stage")
    recipe = json.loads(json.dumps(_yaml(run_dir / "recipe.yaml")))
    if recipe.get("seed") != seed:
        raise SystemExit(f"{run_dir}: its recipe.yaml has seed {recipe.get('seed')}, not {seed}")
    res = json.loads(eval_json.read_text())
    shown = [{k: s.get(k) for k in ("prompt", "policy", "reference", "policy_reward", "reference_reward")}
             for s in res.pop("samples", [])[:3]]  # fmt: skip
    return {
        "recipe": RECIPES[name],
        "seed": seed,
        "settings": settings_digest(run_dir / "recipe.yaml"),
        "seconds": None if seconds is None else round(seconds, 1),
        "eval": res,
        "samples": shown,
    }


def settings_digest(recipe_path: Path) -> str:
    """What the recipe at `recipe_path` trains and measures, less its seed (alignlab.fingerprint.recipe_settings):
    tests/test_docs.py checks that every row was measured with the settings its shipped recipe has now."""
    from alignlab.fingerprint import fingerprint, recipe_settings
    from alignlab.recipe import load_recipe

    return fingerprint(recipe_settings(load_recipe(recipe_path)))[:16]


def _record(path: Path, key: str, entry: dict) -> None:
    """Put one run's entry into the results file as it is now, under a lock: runs of other seeds, started beside
    this one, write theirs into the same file (read at the end, not at the start, so none is lost)."""
    from alignlab.cache import file_lock

    CACHE.mkdir(parents=True, exist_ok=True)
    with file_lock(CACHE / "smollm2-results.lock"):
        payload = json.loads(path.read_text()) if path.exists() else {"results": {}}
        payload["results"][key] = entry
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)


def _machine_cpu_seconds() -> float:
    """CPU seconds every process of the machine has used since boot (/proc/stat; 0 where there is none)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except OSError:
        return 0.0
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (each one a run)")
    ap.add_argument("--threads", default="1", help="torch CPU threads of every run (1: far faster on a busy CPU)")
    ap.add_argument("--collect", type=Path, help="read this finished run folder (one recipe, one seed); run nothing")
    ap.add_argument("--minutes", type=float, help="with --collect: the wall time that run took, from its log")
    args = ap.parse_args()
    names, seeds = args.recipes.split(","), [int(s) for s in args.seeds.split(",")]
    if args.collect and (len(names), len(seeds)) != (1, 1):
        raise SystemExit("--collect reads one run folder: give one recipe and one seed")
    path = RESULTS / "smollm2.json"
    for name in names:
        for seed in seeds:
            run_dir = args.collect or CACHE / "smollm2" / f"{name}-s{seed}"
            seconds = None if args.minutes is None else 60 * args.minutes
            if not args.collect:
                start, busy, ours = time.monotonic(), _machine_cpu_seconds(), _children_cpu_seconds()
                _alignlab("run", RECIPES[name], f"output_dir={run_dir}", f"seed={seed}", threads=args.threads)
                seconds = time.monotonic() - start
                others = (_machine_cpu_seconds() - busy) - (_children_cpu_seconds() - ours)
            entry = collect(name, seed, run_dir, seconds)
            entry.update(date=machine()["date"], machine=machine(), versions=versions(), command=command_line())
            if not args.collect:  # what else ran: a run beside another job takes up to 3 times as long
                entry.update(threads=int(args.threads), others_cpu_share=round(others / (seconds * os.cpu_count()), 3))
            entry["commit"] = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip()
            _record(path, f"{name}-s{seed}", entry)
            print(f"{name} seed {seed}: written to {path}")


if __name__ == "__main__":
    main()
