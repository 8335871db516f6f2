"""What FSDP2 sharding saves per process, and what sampling from a sharded model costs, on 2 CPU processes.

Memory: a full fine-tuning GRPO stage (no reference: beta 0) on `--model` (default SmolLM2-135M-Instruct), run by 2
gloo processes (`accelerate launch --multi_gpu --num_processes 2`) with `parallel.shard: none` (DDP: whole
parameters, gradients and AdamW state on each process) and with `fsdp2` (each process holds half of each). Per
process it reports:
- the peak resident memory above what the process held after its imports (VmHWM - VmRSS after importing torch,
  transformers, TRL and alignlab), the largest of the two processes;
- parameters + gradients + AdamW's two moments held by process 0, in MB of float32, from the stage's record of the
  elements it holds (stage_output.json: params_per_rank, trainable_per_rank).
The goal: sharded parameters + gradients + optimizer state at most 0.55 of DDP's.

Sampling: a generate stage (`--prompts` prompts x 4 samples of up to `--tokens` tokens) on the same model and
processes, DDP against fsdp2 with `gather: once` (every layer gathered once per sampling pass) and `gather:
per_layer` (each layer gathered whenever it runs, so once per new token). Reported: the stage's wall time (model
load included, the same for every contender) and its ratio to DDP's.

    python bench/shard_memory.py                   # ~6 min on 2 CPU cores
    python bench/shard_memory.py --model builtin:tiny-llama --steps 2

Writes bench/results/shard_memory.json. Time it alone: two processes take both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CACHE, REPO, bench_env, machine, peak_rss_mb, rss_mb, table, versions, write_result  # noqa: E402

MB = 1024 * 1024


def _recipe(kind: str, shard: str, gather: str, args, out: Path) -> dict:
    base = {
        "name": f"shard-{kind}",
        "seed": 0,
        "output_dir": str(out),
        "model": {"name_or_path": args.model},
        "peft": {"method": "none"},
        "parallel": {"shard": shard, "gather": gather},
    }
    prompts = {"path": "builtin:constraints", "split": "train", "size": 64}
    if kind == "grpo":
        stage = {
            "name": "grpo",
            "type": "grpo",
            "dataset": prompts,
            "reward_fn": "builtin:constraints",
            "train": {"max_steps": args.steps, "learning_rate": 1e-6},
            "rollout": {"batch_size": 2, "num_samples": 4, "max_new_tokens": args.tokens},
            "beta": 0.0,
            "watch_steps": None,
        }
    else:
        stage = {
            "name": "sample",
            "type": "generate",
            "dataset": {**prompts, "size": args.prompts},
            "reward_fn": "builtin:constraints",
            "rollout": {"num_samples": 4, "max_new_tokens": args.tokens, "batch_size": 2},
        }
    return {**base, "stages": [stage]}


def rank_worker(recipe_path: str, out_dir: str) -> None:
    """One process of a launched run: its memory after imports, the run, its peak."""
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import alignlab.stages.generate  # noqa: F401
    import alignlab.stages.grpo  # noqa: F401
    from alignlab.cli import main

    rank = int(os.environ.get("RANK", "0"))
    before = rss_mb()
    t0 = time.perf_counter()
    code = main(["run", recipe_path, "--threads", "1"])
    seconds = time.perf_counter() - t0
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps({"code": code, "rss_after_imports_mb": before, "peak_rss_mb": peak_rss_mb(), "seconds": seconds})
    )


def launch(kind: str, shard: str, gather: str, args) -> dict:
    tag = f"{kind}-{shard}-{gather}"
    out = CACHE / "shard_memory" / tag
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    recipe = out / "recipe.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(_recipe(kind, shard, gather, args, out / "run")))
    env = {**bench_env(1), "ACCELERATE_USE_CPU": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(Path(__file__)), "--rank-worker", str(recipe), str(out)]
    log = out / "launch.log"
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{tag} failed; log {log}:\n{log.read_text()[-4000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    stage = "grpo" if kind == "grpo" else "sample"
    record = json.loads((out / "run" / stage / "stage_output.json").read_text())["parallel"]
    return {
        "shard": shard,
        "gather": gather,
        "parallel": record,
        "peak_above_imports_mb": max(r["peak_rss_mb"] - r["rss_after_imports_mb"] for r in ranks),
        "seconds": max(r["seconds"] for r in ranks),
    }


def state_mb(record: dict) -> dict:
    """float32 MB of parameters, gradients and AdamW's two moments that process 0 holds."""
    params, trainable = record["params_per_rank"], record["trainable_per_rank"]
    return {"params": 4 * params / MB, "grads": 4 * trainable / MB, "optimizer": 8 * trainable / MB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=2, help="GRPO steps")
    parser.add_argument("--tokens", type=int, default=16, help="rollout.max_new_tokens of both stages")
    parser.add_argument("--prompts", type=int, default=8, help="prompts of the generate stage")
    args = parser.parse_args()

    memory = [launch("grpo", shard, "once", args) for shard in ("none", "fsdp2")]
    for m in memory:
        m["state_mb"] = state_mb(m["parallel"])
        m["state_total_mb"] = sum(m["state_mb"].values())
    ddp, sharded = memory
    ratio = sharded["state_total_mb"] / ddp["state_total_mb"]
    sampling = [
        launch("generate", s, g, args) for s, g in (("none", "once"), ("fsdp2", "once"), ("fsdp2", "per_layer"))
    ]

    rows = [
        [
            "DDP" if m["shard"] == "none" else "FSDP2",
            m["state_mb"]["params"],
            m["state_mb"]["grads"],
            m["state_mb"]["optimizer"],
            m["state_total_mb"],
            m["state_total_mb"] / ddp["state_total_mb"],
            m["peak_above_imports_mb"],
            m["peak_above_imports_mb"] / ddp["peak_above_imports_mb"],
        ]
        for m in memory
    ]
    memory_table = table(
        ["engine", "params MB", "grads MB", "AdamW MB", "sum MB", "sum vs DDP", "peak RSS MB", "peak vs DDP"], rows
    )
    sampling_table = table(
        ["engine", "gather", "generate stage s", "vs DDP", "peak RSS MB"],
        [
            [
                "DDP" if s["shard"] == "none" else "FSDP2",
                "-" if s["shard"] == "none" else s["gather"],
                s["seconds"],
                s["seconds"] / sampling[0]["seconds"],
                s["peak_above_imports_mb"],
            ]
            for s in sampling
        ],
    )
    print(f"\nFull fine-tuning GRPO on {args.model}, 2 processes (per process):\n{memory_table}")
    print(f"\nsharded params + grads + AdamW = {ratio:.3f} of DDP's (goal: at most 0.55)")
    print(f"\nSampling ({args.prompts} prompts x 4 samples, up to {args.tokens} tokens):\n{sampling_table}")
    path = write_result(
        "shard_memory",
        {
            "machine": machine(),
            "versions": versions(),
            "args": vars(args),
            "memory": memory,
            "state_ratio": ratio,
            "sampling": sampling,
            "memory_table": memory_table,
            "sampling_table": sampling_table,
            "load": os.getloadavg()[0],
        },
    )
    print(f"\nwrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    if "--rank-worker" in sys.argv:
        i = sys.argv.index("--rank-worker")
        rank_worker(sys.argv[i + 1], sys.argv[i + 2])
    else:
        main()
