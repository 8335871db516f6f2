"""What precision buys alignlab's GRPO on SmolLM2-135M-Instruct + LoRA on this machine, at a recipe's own settings.

Contenders (each a child process, alternated A B C, C B A, ...; `--threads` threads each):
- `fp32`: sampling, reference and training forwards in float32 (the recipes' default);
- `sample_bf16`: `rollout.dtype: bfloat16`: responses sampled from a bf16 copy with the adapter merged, refreshed each
  step (alignlab/rl/sampler.py); training, reference and the recomputed old log-probs in float32;
- `autocast_bf16`: accelerate's bf16 mixed precision (`accelerate launch --mixed_precision bf16`, here
  ACCELERATE_MIXED_PRECISION=bf16): every forward and backward under autocast, old log-probs recomputed.
Each child runs the grpo stage of `--recipe` (its settings: prompts per step, group size, response length, epochs,
minibatch, beta, the watch) from the base model with a fresh LoRA adapter for `--steps` steps and reports the
median seconds per step after `--warmup` steps, the share of it in generate(), and its peak RSS. Speed only: what
the precision does to learning is measured by running the recipe (bench/smollm2_results.py).

    python bench/grpo_precision.py                       # ~6 min on 2 CPU cores
    python bench/grpo_precision.py --steps 5 --repeats 2

Writes bench/results/grpo_precision.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CACHE, REPO, median, peak_memory, report, rss_mb, run_child, setup_worker, worker_main  # noqa: E402
from grpo_vs_trl import _time_generate, time_grpo_steps  # noqa: E402

CONTENDERS = {
    "fp32": {},
    "sample_bf16": {"rollout": {"dtype": "bfloat16"}},
    "autocast_bf16": {"env": {"ACCELERATE_MIXED_PRECISION": "bf16"}},
}


def grpo_recipe(cfg: dict, run_dir: Path) -> dict:
    """`--recipe` cut to its grpo stage, from the base model, for `--steps` steps, no checkpoints or stop_if, with the
    contender's `rollout:` keys."""
    import yaml

    raw = yaml.safe_load((REPO / cfg["recipe"]).read_text())
    stage = next(s for s in raw["stages"] if s["type"] == "grpo")
    stage.update(input="base", stop_if=None)
    stage["train"] = {**stage.get("train", {}), "max_steps": cfg["steps"], "save_steps": None}
    stage["rollout"] = {**stage.get("rollout", {}), **CONTENDERS[cfg["contender"]].get("rollout", {})}
    raw.update(output_dir=str(run_dir), stages=[stage])
    return raw


def worker(cfg: dict) -> dict:
    setup_worker(cfg["threads"])
    contender = CONTENDERS[cfg["contender"]]
    os.environ.update(contender.get("env", {}))
    from alignlab.pipeline import run_pipeline
    from alignlab.recipe import parse_recipe

    base = rss_mb()
    rec = {"step_s": [], "generate_s": []}
    _time_generate(rec)
    time_grpo_steps(rec)
    run_dir = CACHE / "runs" / f"grpo-precision-{cfg['contender']}-{int(time.time() * 1000)}"
    run_pipeline(parse_recipe(grpo_recipe(cfg, run_dir)), force=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"base_rss_mb": base, **peak_memory("cpu"), **rec}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="recipes/smollm2_revise_sft_grpo_lora.yaml", help="its grpo stage's settings")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--steps", type=int, default=3, help="steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="steps not timed")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="grpo_precision")
    a = ap.parse_args()
    names = a.contenders.split(",")
    cfg = {"recipe": a.recipe, "steps": a.steps, "threads": a.threads}
    runs: dict[str, list] = {}
    for rep in range(a.repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            r = run_child("grpo_precision.py", "grpo", {**cfg, "contender": name}, threads=a.threads, tag=name)
            steps, gens = r["step_s"][a.warmup :], r["generate_s"][a.warmup :]
            r["s_per_step"], r["generate_share"] = median(steps), sum(gens) / sum(steps)
            runs.setdefault(name, []).append(r)
            print(f"  {name:14s} run {rep + 1}: {r['s_per_step']:.1f} s/step ({r['generate_share']:.0%} in generate), "
                  f"peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)  # fmt: skip

    keys = ("s_per_step", "generate_share", "peak_rss_mb")
    med = {n: {k: median([r[k] for r in rs]) for k in keys} for n, rs in runs.items()}
    ref = med[names[0]]["s_per_step"]
    rows = [[n, m["s_per_step"], m["s_per_step"] / ref, m["generate_share"], m["peak_rss_mb"]] for n, m in med.items()]
    headers = ["contender", "s/step", f"time / {names[0]}", "in generate", "peak RSS MiB"]
    setting = (f"grpo stage of {a.recipe} on its base model (fresh LoRA), {a.steps} steps per run ({a.warmup} warm-up), "
               f"{a.repeats} run(s) per contender alternating, cpu, {a.threads} thread(s); medians")  # fmt: skip
    report("grpo_precision", a.name, setting, headers, rows, {}, {"config": cfg, "summary": med, "runs": runs})


if __name__ == "__main__":
    if not worker_main({"grpo": worker}):
        main()
