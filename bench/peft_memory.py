"""QLoRA vs LoRA vs full fine-tuning: peak memory and step time of alignlab's sft stage on a >= 100M-parameter
Llama (built from config, saved locally), same data, batch and sequence length.

    python bench/peft_memory.py                   # default: llama-100m, ~4 minutes on 2 CPUs
    python bench/peft_memory.py --model llama-350m --batch 8 --max-length 512
    python bench/peft_memory.py --device cuda --model llama-350m      (peak = torch.cuda.max_memory_allocated)

Each method is a child process (alternating order over `--repeats`). Memory columns:
- peak RSS (process): the process's high-water RSS (VmHWM), loading included: QLoRA loads the fp32 checkpoint
  and quantises it, so its high-water mark can be set while loading, not while training;
- peak RSS (training): the largest RSS polled every 10 ms while Trainer.train() runs;
- above imports: training peak minus the RSS after the imports (torch, transformers, TRL, alignlab), i.e. what
  the model, optimizer and activations take.
Step time: median over steps after the warm-up. Rows are packed (`packing: true`, TRL's "wrapped" strategy) so
every step sees exactly batch x max_length tokens. LoRA: r 16, alpha 32, all linear layers; QLoRA: the same on
a 4-bit NF4 double-quantised base (bitsandbytes; compute dtype bfloat16, alignlab's default).
"""

from __future__ import annotations

import argparse
import shutil
import time

from _common import (
    CACHE,
    command_line,
    hook_trainer_steps,
    machine,
    median,
    peak_rss_mb,
    rss_mb,
    run_child,
    setup_worker,
    step_seconds,
    table,
    versions,
    worker_main,
    write_result,
)


def alignlab_worker(cfg: dict) -> dict:
    setup_worker(cfg["threads"])
    import torch

    from alignlab.pipeline import run_pipeline
    from alignlab.recipe import parse_recipe

    base = rss_mb()
    cuda = cfg["device"] == "cuda"
    rec = hook_trainer_steps(cuda=cuda, poll_rss=True)
    peft = {"method": cfg["method"]}
    if cfg["method"] != "none":
        peft.update(r=16, alpha=32, dropout=0.0)
    run_dir = CACHE / "runs" / f"peft-{cfg['method']}-{int(time.time() * 1000)}"
    raw = {
        "name": "bench-peft",
        "seed": 0,
        "output_dir": str(run_dir),
        "model": {"name_or_path": cfg["model_path"], "dtype": cfg["dtype"]},
        "peft": peft,
        "stages": [
            {
                "name": "sft",
                "type": "sft",
                "dataset": {"path": "builtin:arith", "split": "sft", "size": cfg["size"], "eval_size": 8},
                "packing": True,
                "train": {
                    "max_steps": cfg["steps"],
                    "per_device_batch_size": cfg["batch"],
                    "learning_rate": 1e-4,
                    "max_length": cfg["max_length"],
                    "logging_steps": 10,
                    "bf16": cfg["dtype"] == "bfloat16",
                    "extra": {"packing_strategy": "wrapped"},
                },
            }
        ],
    }
    run_pipeline(parse_recipe(raw), force=True)
    shutil.rmtree(run_dir, ignore_errors=True)  # the saved model is not needed
    out = {
        "base_rss_mb": base,
        "peak_rss_mb": peak_rss_mb(),
        "train_peak_rss_mb": rec["train_peak_rss_mb"],
        "s_per_step": median(step_seconds(rec, cfg["warmup"])),
        "tokens_per_step": median([s["tokens"] for s in rec["steps"]]),
    }
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-100m")
    ap.add_argument("--methods", default="none,lora,qlora", help="comma list of none (full FT), lora, qlora")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", help="dtype of the unquantised weights")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="peft_memory")
    a = ap.parse_args()
    models = run_child("_models.py", "prepare", {"model": a.model}, threads=a.threads)
    methods = a.methods.split(",")
    cfg = dict(model_path=models["policy"], batch=a.batch, max_length=a.max_length, steps=a.steps, warmup=a.warmup,
               size=max(2000, a.batch * a.steps * a.max_length // 10), device=a.device, dtype=a.dtype, threads=a.threads)  # fmt: skip
    runs: dict[str, list] = {m: [] for m in methods}
    for rep in range(a.repeats):
        for m in methods if rep % 2 == 0 else methods[::-1]:
            r = run_child("peft_memory.py", "alignlab", {**cfg, "method": m}, threads=a.threads, tag=m)
            runs[m].append(r)
            print(f"  {m:6s} run {rep + 1}: {r['s_per_step']:.2f} s/step, peak RSS {r['peak_rss_mb']:.0f} MiB "
                  f"(training {r['train_peak_rss_mb']:.0f})", flush=True)  # fmt: skip
    keys = ["s_per_step", "peak_rss_mb", "train_peak_rss_mb", "base_rss_mb"] + (
        ["cuda_peak_mb"] if a.device == "cuda" else []
    )
    med = {m: {k: median([r[k] for r in rs]) for k in keys} for m, rs in runs.items()}
    full = med.get("none")
    names = {"none": "full fine-tuning", "lora": "LoRA r16", "qlora": "QLoRA r16 (NF4)"}
    rows = []
    for m in methods:
        x = med[m]
        above = x["train_peak_rss_mb"] - x["base_rss_mb"]
        row = [names.get(m, m), x["s_per_step"], x["peak_rss_mb"], x["train_peak_rss_mb"], above]
        row += (
            [above / (full["train_peak_rss_mb"] - full["base_rss_mb"]), full["s_per_step"] / x["s_per_step"]]
            if full
            else []
        )
        row += [x["cuda_peak_mb"]] if a.device == "cuda" else []
        rows.append(row)
    headers = ["method", "s/step", "peak RSS (process) MiB", "peak RSS (training) MiB", "above imports MiB"]
    headers += ["memory vs full (above imports)", "speed vs full"] if full else []
    headers += ["CUDA peak MiB"] if a.device == "cuda" else []
    main_table = table(headers, rows)
    setting = (f"alignlab sft stage, model {a.model} ({models['params'] / 1e6:.1f}M params), batch {a.batch} x "
               f"{a.max_length} tokens (packed), {a.steps} steps ({a.warmup} warm-up), {a.dtype}, {a.device}, "
               f"{a.threads} thread(s), {a.repeats} run(s) per method")  # fmt: skip
    print("\n" + setting + "\n\n" + main_table)
    path = write_result(a.name, {
        "bench": "peft_memory", "command": command_line(), "setting": setting, "machine": machine(),
        "versions": versions(), "model": models, "summary": med, "table": main_table, "runs": runs,
    })  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    if not worker_main({"alignlab": alignlab_worker}):
        main()
