"""SFT throughput: tokens/s and model-FLOPs utilisation (MFU) of alignlab's sft stage, against the fp32 matmul
peak of this machine measured in the same process right before training.

    python bench/sft_mfu.py                       # default: llama-100m, 3 layouts, ~5 minutes on 2 CPUs
    python bench/sft_mfu.py --configs pad:16:256,wrapped:8:512 --steps 8
    python bench/sft_mfu.py --device cuda --model llama-350m --configs wrapped:16:2048,bfd:16:2048

Model: a ~100M-parameter Llama built from config (random init: throughput does not depend on the weights) with
the builtin tokenizer; data: builtin:arith SFT demonstrations (short chat rows, ~20 tokens each).
Layouts (`--configs KIND:BATCH:MAX_LENGTH,...`):
- pad:     one example per row, padded to the longest row of the batch (alignlab's default, packing: false);
- wrapped: packing: true with TRL's "wrapped" strategy: examples concatenated and cut into full rows of
           MAX_LENGTH (no padding; attention crosses example boundaries inside a row);
- bfd:     packing: true with TRL's default "bfd" strategy: best-fit-decreasing bins, padding-free (the batch is
           one flattened sequence with position ids restarting per example).
MFU = model FLOPs per second / measured peak. Two columns: against the peak measured right next to each step
(median over steps; fair when the shared machine's load changes, but a burst of load during the short peak
measurement inflates it), and against the best peak seen anywhere in the run (conservative: the verdict uses it). Model FLOPs per step = 6 * N * real tokens (N = parameters used in
matmuls: every Linear including lm_head, not the embedding lookup) + attention 12 * L * d * sum over attended
segments of (segment length)^2 (PaLM's convention, causal halving not taken), counting real (non-pad) tokens
only. Peak = best of 3 fp32 (bf16 on cuda) torch.mm of 2048x2048 matrices on the same threads, taken right
after each step (outside its timed span): the machine is shared, so step and peak are measured side by side.
"""

from __future__ import annotations

import argparse
import shutil
import time

from _common import (
    CACHE,
    command_line,
    machine,
    median,
    run_child,
    setup_worker,
    table,
    versions,
    worker_main,
    write_result,
)


def measure_peak(device: str, dtype_name: str, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul (what a dense fp32 kernel reaches on these threads)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def attention_segments(inputs) -> list[int]:
    """Lengths of the causal attention segments of a batch: per packed example (padding-free), else per row's
    real tokens."""
    if "position_ids" in inputs and "attention_mask" not in inputs:
        pos = inputs["position_ids"].flatten().tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        return [b - a for a, b in zip(starts, starts[1:]) if b > a]
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum(dim=1).tolist()
    return [inputs["input_ids"].shape[1]] * inputs["input_ids"].shape[0]


def alignlab_worker(cfg: dict) -> dict:
    setup_worker(cfg["threads"])
    import torch

    from alignlab.pipeline import run_pipeline
    from alignlab.recipe import parse_recipe

    peak = measure_peak(cfg["device"], cfg["dtype"], reps=10)
    steps: list[dict] = []
    model_cfg = cfg["model_config"]
    L, d = model_cfg["num_hidden_layers"], model_cfg["hidden_size"]  # noqa: N806
    cuda = cfg["device"] == "cuda"

    # Hooks on transformers' Trainer itself, so they hold whatever trainer subclass the stage uses.
    from transformers import Trainer, TrainerCallback

    training_step, train = Trainer.training_step, Trainer.train

    def timed_training_step(self, model, inputs, *args, **kwargs):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = training_step(self, model, inputs, *args, **kwargs)
        segs = attention_segments(inputs)
        steps.append({"t0": t0, "tokens": sum(segs), "padded": int(inputs["input_ids"].numel()),
                      "attn_sq": sum(s * s for s in segs)})  # fmt: skip
        return loss

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            steps[-1]["t1"] = time.perf_counter()
            # The peak right next to this step, outside its timed span: the 2 cores are shared, so a peak taken
            # minutes away would compare the step with a different machine load.
            steps[-1]["peak"] = measure_peak(cfg["device"], cfg["dtype"], reps=3)

    def train_with_timer(self, *args, **kwargs):
        self.add_callback(StepEnd())
        return train(self, *args, **kwargs)

    Trainer.training_step, Trainer.train = timed_training_step, train_with_timer
    kind, batch, max_length = cfg["kind"], cfg["batch"], cfg["max_length"]
    extra = {"packing_strategy": kind} if kind != "pad" else {}
    run_dir = CACHE / "runs" / f"sft-{int(time.time() * 1000)}"
    raw = {
        "name": "bench-sft",
        "seed": 0,
        "output_dir": str(run_dir),
        "model": {"name_or_path": cfg["model_path"], "dtype": "float32"},
        "stages": [
            {
                "name": "sft",
                "type": "sft",
                "dataset": {"path": "builtin:arith", "split": "sft", "size": cfg["size"], "eval_size": 8},
                "packing": kind != "pad",
                "train": {
                    "max_steps": cfg["steps"],
                    "per_device_batch_size": batch,
                    "learning_rate": 1e-4,
                    "max_length": max_length,
                    "logging_steps": 10,
                    "bf16": cfg["dtype"] == "bfloat16",
                    "extra": extra,
                },
            }
        ],
    }
    run_pipeline(parse_recipe(raw), force=True)
    shutil.rmtree(run_dir, ignore_errors=True)  # the saved model is not needed
    timed = steps[cfg["warmup"] :]
    # Step time: training_step's start (batch collated) to on_step_end (after the optimizer step).
    seconds = [s["t1"] - s["t0"] for s in timed]
    flops = [6 * cfg["n_matmul"] * s["tokens"] + 12 * L * d * s["attn_sq"] for s in timed]
    tokens = sum(s["tokens"] for s in timed)
    best_peak = max([peak] + [s["peak"] for s in steps])
    return {
        "peak_flops": median([s["peak"] for s in timed]),
        "peak_flops_best": best_peak,
        "mfu_vs_best_peak": sum(flops) / sum(seconds) / best_peak,
        "peak_flops_start": peak,
        "tokens_per_s": tokens / sum(seconds),
        "model_flops_per_s": sum(flops) / sum(seconds),
        "mfu": median([f / t / s["peak"] for f, t, s in zip(flops, seconds, timed)]),
        "padding_fraction": 1 - tokens / sum(s["padded"] for s in timed),
        "tokens_per_step": tokens / len(timed),
        "s_per_step": sum(seconds) / len(timed),
        "steps": steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-100m")
    ap.add_argument("--configs", default="pad:16:256,wrapped:4:256,bfd:4:256", help="KIND:BATCH:MAX_LENGTH,...")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (cuda default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="sft_mfu")
    a = ap.parse_args()
    dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    models = run_child("_models.py", "prepare", {"model": a.model}, threads=a.threads)
    c = models["config"]
    n_matmul = models["params"] - c["vocab_size"] * c["hidden_size"]  # minus the embedding lookup
    rows, runs = [], {}
    for spec in a.configs.split(","):
        kind, batch, max_length = spec.split(":")
        batch, max_length = int(batch), int(max_length)
        cfg = dict(model_path=models["policy"], model_config=c, n_matmul=n_matmul, kind=kind, batch=batch,
                   max_length=max_length, steps=a.steps, warmup=a.warmup, size=max(2000, batch * a.steps * 40),
                   device=a.device, dtype=dtype, threads=a.threads)  # fmt: skip
        rs = [run_child("sft_mfu.py", "alignlab", cfg, threads=a.threads, tag=kind) for _ in range(a.repeats)]
        runs[spec] = rs
        m = {k: median([r[k] for r in rs]) for k in ("tokens_per_s", "model_flops_per_s", "mfu", "padding_fraction",
                                                      "tokens_per_step", "s_per_step", "peak_flops", "peak_flops_best",
                                                      "mfu_vs_best_peak")}  # fmt: skip
        rows.append([kind, batch, max_length, m["tokens_per_step"], m["padding_fraction"] * 100, m["s_per_step"],
                     m["tokens_per_s"], m["model_flops_per_s"] / 1e9, m["peak_flops_best"] / 1e9, m["peak_flops"] / 1e9,
                     m["mfu"] * 100, m["mfu_vs_best_peak"] * 100])  # fmt: skip
        print(f"  {spec}: {m['tokens_per_s']:.0f} tokens/s, MFU {m['mfu_vs_best_peak'] * 100:.1f}% of the best peak, "
              f"{m['mfu'] * 100:.1f}% of the peak next to each step", flush=True)  # fmt: skip
    headers = ["layout", "batch", "max_length", "real tokens/step", "padding %", "s/step", "tokens/s",
               "model GFLOP/s", "best peak GFLOP/s", "adjacent peak GFLOP/s", "MFU % (adjacent)",
               "MFU % (best peak)"]  # fmt: skip
    main_table = table(headers, rows)
    best = max(r[-1] for r in rows)
    setting = (f"alignlab sft stage, model {a.model} ({models['params'] / 1e6:.1f}M params, {n_matmul / 1e6:.1f}M in "
               f"matmuls), full fine-tuning, AdamW, {dtype}, {a.device}, {a.threads} thread(s); {a.steps} steps per "
               f"run ({a.warmup} warm-up)")  # fmt: skip
    verdict = (f"best MFU {best:.1f}% against the best matmul peak seen in the run (conservative; goal >= 40%): "
               f"{'met' if best >= 40 else 'NOT met'}")  # fmt: skip
    print("\n" + setting + "\n\n" + main_table + "\n\n" + verdict)
    for rs in runs.values():
        for r in rs:
            r.pop("steps", None)
    path = write_result(a.name, {
        "bench": "sft_mfu", "command": command_line(), "setting": setting, "machine": machine(), "versions": versions(),
        "model": {k: v for k, v in models.items()}, "table": main_table, "verdict": verdict, "runs": runs,
    })  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    if not worker_main({"alignlab": alignlab_worker}):
        main()
