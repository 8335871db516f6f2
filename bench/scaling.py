"""Step time of alignlab's sft stage against sequence length and batch size (full fine-tuning), with an optional
PNG plot (bench/results/scaling.png).

    python bench/scaling.py                                   # default: llama-20m, 4 x 3 grid, ~4 minutes
    python bench/scaling.py --model llama-100m --seq 128,256,512,1024 --batch 1,4,8 --plot
    python bench/scaling.py --device cuda --model llama-350m --seq 512,1024,2048,4096 --batch 1,8,32

One child process runs the whole grid (the model is loaded once per point by the stage, as a user's run would).
Rows are packed (TRL's "wrapped" strategy), so a step sees exactly batch x seq tokens. Time per step: median of
the steps after the first. `us/token` shows where fixed per-step overhead stops mattering (flat) and where
attention's quadratic term starts (rising with seq).
"""

from __future__ import annotations

import argparse
import shutil
import time

from _common import (
    CACHE,
    RESULTS,
    command_line,
    hook_trainer_steps,
    machine,
    median,
    run_child,
    setup_worker,
    step_seconds,
    table,
    versions,
    worker_main,
    write_result,
)


def grid_worker(cfg: dict) -> dict:
    setup_worker(cfg["threads"])
    from alignlab.pipeline import run_pipeline
    from alignlab.recipe import parse_recipe

    rec = hook_trainer_steps(cuda=cfg["device"] == "cuda")
    points = []
    for seq in cfg["seq"]:
        for batch in cfg["batch"]:
            rec["steps"].clear()
            run_dir = CACHE / "runs" / f"scaling-{seq}x{batch}-{int(time.time() * 1000)}"
            raw = {
                "name": "bench-scaling",
                "seed": 0,
                "output_dir": str(run_dir),
                "model": {"name_or_path": cfg["model_path"], "dtype": cfg["dtype"]},
                "stages": [
                    {
                        "name": "sft",
                        "type": "sft",
                        "dataset": {
                            "path": "builtin:arith",
                            "split": "sft",
                            "size": max(1000, seq * batch * cfg["steps"] // 10),
                            "eval_size": 8,
                        },  # fmt: skip
                        "packing": True,
                        "train": {
                            "max_steps": cfg["steps"],
                            "per_device_batch_size": batch,
                            "learning_rate": 1e-4,
                            "max_length": seq,
                            "logging_steps": 10,
                            "bf16": cfg["dtype"] == "bfloat16",
                            "extra": {"packing_strategy": "wrapped"},
                        },
                    }
                ],
            }
            run_pipeline(parse_recipe(raw), force=True)
            shutil.rmtree(run_dir, ignore_errors=True)  # the saved model is not needed
            s = median(step_seconds(rec, 1))
            tokens = median([st["tokens"] for st in rec["steps"]])
            points.append({"seq": seq, "batch": batch, "s_per_step": s, "tokens_per_step": tokens})
            print(f"seq {seq} batch {batch}: {s:.3f} s/step", flush=True)
    return {"points": points}


def plot(points: list[dict], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for batch in sorted({p["batch"] for p in points}):
        ps = [p for p in points if p["batch"] == batch]
        ax1.plot([p["seq"] for p in ps], [p["s_per_step"] for p in ps], marker="o", label=f"batch {batch}")
        ax2.plot([p["seq"] for p in ps], [1e6 * p["s_per_step"] / p["tokens_per_step"] for p in ps], marker="o",
                 label=f"batch {batch}")  # fmt: skip
    for ax, ylabel in ((ax1, "seconds per step"), (ax2, "microseconds per token")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax1.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-20m")
    ap.add_argument("--seq", default="64,128,256,512", help="sequence lengths")
    ap.add_argument("--batch", default="1,4,8", help="batch sizes")
    ap.add_argument("--steps", type=int, default=3, help="steps per point (the first is not timed)")
    ap.add_argument("--plot", action="store_true", help="also write bench/results/NAME.png")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (cuda default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="scaling")
    a = ap.parse_args()
    dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    models = run_child("_models.py", "prepare", {"model": a.model}, threads=a.threads)
    cfg = dict(model_path=models["policy"], seq=[int(x) for x in a.seq.split(",")],
               batch=[int(x) for x in a.batch.split(",")], steps=a.steps, device=a.device, dtype=dtype, threads=a.threads)  # fmt: skip
    res = run_child("scaling.py", "grid", cfg, threads=a.threads, timeout=7200)
    points = res["points"]
    by = {(p["seq"], p["batch"]): p for p in points}
    base = by[(cfg["seq"][0], cfg["batch"][0])]["s_per_step"]
    rows = []
    for seq in cfg["seq"]:
        row = [seq]
        for batch in cfg["batch"]:
            p = by[(seq, batch)]
            row.append(f"{p['s_per_step']:.3f} s ({1e6 * p['s_per_step'] / p['tokens_per_step']:.0f} us/tok)")
        rows.append(row)
    main_table = table(["seq \\ batch"] + [str(b) for b in cfg["batch"]], rows)
    setting = (f"alignlab sft stage, model {a.model} ({models['params'] / 1e6:.1f}M params), full fine-tuning, "
               f"packed rows, {dtype}, {a.device}, {a.threads} thread(s); median of {a.steps - 1} step(s) per point; "
               f"cell = seconds per step (microseconds per token); relative to the smallest point: see JSON")  # fmt: skip
    print("\n" + setting + "\n\n" + main_table)
    for p in points:
        p["relative_to_smallest"] = p["s_per_step"] / base
    payload = {"bench": "scaling", "command": command_line(), "setting": setting, "machine": machine(),
               "versions": versions(), "model": models, "points": points, "table": main_table}  # fmt: skip
    if a.plot:
        png = RESULTS / f"{a.name}.png"
        RESULTS.mkdir(parents=True, exist_ok=True)
        plot(points, png, f"alignlab sft step time, {a.model}, {dtype}, {a.device}, {a.threads} thread(s)")
        payload["plot"] = str(png.name)
        print(f"wrote {png}")
    path = write_result(a.name, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    if not worker_main({"grid": grid_worker}):
        main()
