"""What the CPU recipes reach on `builtin:arith`: the numbers of docs/results.md's quickstart table.

Runs recipes/quickstart.yaml (SFT -> DPO -> its eval stage), recipes/sft_ppo_reward_fn.yaml and
recipes/sft_reward_ppo.yaml, each whole, in bench/.cache/quickstart/<name> (stages finished there with the same
settings are reused, as `alignlab run` does; --fresh deletes them first); evaluates the two PPO
policies with the quickstart's eval stage (`alignlab eval .../ppo --recipe recipes/quickstart.yaml --reference
sft`: same prompts, decoding and pairs), and writes bench/results/quickstart.json: every eval.json (without the
samples), the reward model's held-out accuracy, PPO's first and last logged EOS rate, the time the recipe's stages
took (from each stage's started.json to its stage_output.json), the machine and the versions. `python scripts/gen_docs.py` then rewrites the docs/results.md table from that file.

    python bench/quickstart_results.py                       # all three (~20-40 min on 2 shared CPU cores)
    python bench/quickstart_results.py --recipes quickstart  # one; the others keep their stored results
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CACHE, REPO, RESULTS, command_line, machine, versions  # noqa: E402

RECIPES = {  # name -> (recipe, the stage evaluated by the quickstart's eval stage, or None: the recipe's own eval)
    "quickstart": ("recipes/quickstart.yaml", None),
    "sft_ppo_reward_fn": ("recipes/sft_ppo_reward_fn.yaml", "ppo"),
    "sft_reward_ppo": ("recipes/sft_reward_ppo.yaml", "ppo"),
}
EVAL_RECIPE = "recipes/quickstart.yaml"


def _alignlab(*args: str, threads: str) -> None:
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "alignlab", *args, "--threads", threads]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, check=True)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def measure(name: str, threads: str, fresh: bool) -> dict:
    recipe, evaluated = RECIPES[name]
    run_dir = CACHE / "quickstart" / name
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    _alignlab("run", recipe, f"output_dir={run_dir}", threads=threads)  # reuses stages finished with these settings
    stages = [p.parent for p in run_dir.glob("*/stage_output.json")]
    seconds = sum((p / "stage_output.json").stat().st_mtime - (p / "started.json").stat().st_mtime for p in stages)
    if evaluated is None:
        eval_json = run_dir / "eval" / "eval.json"
    else:
        out = run_dir / f"{evaluated}-eval"
        _alignlab(
            "eval", str(run_dir / evaluated), "--recipe", EVAL_RECIPE, "--reference", "sft", "--out", str(out),
            threads=threads,
        )  # fmt: skip
        eval_json = out / "eval.json"
    res = json.loads(eval_json.read_text())
    res.pop("samples", None)
    entry = {"recipe": recipe, "seconds": round(seconds, 1), "eval": res}
    reward = run_dir / "reward" / "stage_output.json"
    if reward.exists():
        entry["reward_model_eval_accuracy"] = json.loads(reward.read_text())["metrics"].get("eval_accuracy")
    ppo = [r for r in _jsonl(run_dir / "ppo" / "metrics.jsonl") if "eos_rate" in r]
    if ppo:
        entry["ppo"] = {"first_eos_rate": ppo[0]["eos_rate"], "last_eos_rate": ppo[-1]["eos_rate"]}
        entry["ppo"]["updates"] = ppo[-1]["step"]
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    ap.add_argument("--threads", default="auto", help="torch CPU threads of every run (alignlab --threads)")
    ap.add_argument("--fresh", action="store_true", help="delete the run folders first (else finished stages stay)")
    args = ap.parse_args()
    path = RESULTS / "quickstart.json"
    payload = json.loads(path.read_text()) if path.exists() else {"results": {}}
    for name in args.recipes.split(","):
        payload["results"][name] = measure(name, args.threads, args.fresh)
        payload["results"][name]["date"] = machine()["date"]
    payload.update(command=command_line(), machine=machine(), versions=versions(), eval_recipe=EVAL_RECIPE)
    payload["commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
