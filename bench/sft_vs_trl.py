"""SFT: alignlab's sft stage against TRL's SFTTrainer used directly (the TRL of the main environment), same model,
data (builtin:arith, split sft: conversational prompt-completion rows, loss on the completion), batch, sequence
length and steps.

    python bench/sft_vs_trl.py                                   # default: builtin tiny model, ~2 minutes on 2 CPUs
    python bench/sft_vs_trl.py --model smollm2 --steps 12 --warmup 2 --batch 8 --max-length 128
    python bench/sft_vs_trl.py --device cuda --model smollm2-random --batch 32 --max-length 256

alignlab's sft stage builds on TRL's SFTTrainer, so the target is no overhead: time ratio alignlab / TRL <= 1.02,
no more memory. Contenders, each a child process, alternating (`--repeats` runs each), per `--peft` setting:
- trl:      SFTTrainer(model, args=SFTConfig(completion_only_loss=True, packing=False, ...)) on the same rows;
- alignlab: a one-stage recipe `type: sft` with the same settings.
Both: no gradient checkpointing, constant learning rate, fp32 on CPU (bf16 autocast on CUDA unless --dtype).
Seconds per step = median interval between consecutive optimizer steps (on_step_end to on_step_end), after
`--warmup` steps.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from _common import (
    CACHE,
    median,
    peak_memory,
    report,
    rss_mb,
    run_child,
    setup_worker,
    trl_lora_config,
    worker_main,
)
from dpo_vs_trl import StepTimer

CONTENDERS = ("trl", "alignlab")


def alignlab_worker(cfg: dict) -> dict:
    setup_worker(cfg["threads"])
    from alignlab.pipeline import run_pipeline
    from alignlab.recipe import parse_recipe

    base = rss_mb()
    timer = StepTimer()
    timer.time_every_trainer(cfg["device"] == "cuda")
    peft = {"method": "none"} if cfg["peft"] == "none" else {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0}
    run_dir = CACHE / "runs" / f"sft-alignlab-{int(time.time() * 1000)}"
    raw = {
        "name": "bench-sft",
        "seed": 0,
        "output_dir": str(run_dir),
        "model": {"name_or_path": cfg["model_path"], "dtype": cfg["dtype"]},
        "peft": peft,
        "stages": [
            {
                "name": "sft",
                "type": "sft",
                "dataset": {"path": "builtin:arith", "split": "sft", "size": cfg["size"], "eval_size": 16},
                "train": {
                    "max_steps": cfg["steps"],
                    "per_device_batch_size": cfg["batch"],
                    "learning_rate": 1e-5,
                    "lr_scheduler": "constant",
                    "max_length": cfg["max_length"],
                    "logging_steps": 10,
                    "bf16": cfg["dtype"] == "bfloat16",
                },
            }
        ],
    }
    run_pipeline(parse_recipe(raw), force=True)
    shutil.rmtree(run_dir, ignore_errors=True)  # the saved model is not needed
    return {"base_rss_mb": base, "step_s": timer.steps, **peak_memory(cfg["device"])}


def trl_worker(cfg: dict) -> dict:
    setup_worker(cfg["threads"])
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from alignlab.builtin.tasks import generate_task

    base = rss_mb()
    timer = StepTimer()
    train = Dataset.from_list(generate_task("arith", "sft", cfg["size"], seed=0))  # the rows alignlab's stage reads
    tok = AutoTokenizer.from_pretrained(cfg["model_path"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=getattr(torch, cfg["dtype"]))
    peft_config = trl_lora_config(cfg)
    args = SFTConfig(
        output_dir=(out_dir := tempfile.mkdtemp(dir=CACHE, prefix="sft-trl-")),
        max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch"],
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        max_length=cfg["max_length"],
        completion_only_loss=True,
        packing=False,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=0,
        bf16=cfg["dtype"] == "bfloat16",
        gradient_checkpointing=False,
        use_cpu=cfg["device"] == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok, peft_config=peft_config)
    trainer.add_callback(timer.callback(cfg["device"] == "cuda"))
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"base_rss_mb": base, "step_s": timer.steps, **peak_memory(cfg["device"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny | llama-20m | ... | llama-350m | smollm2 | smollm2-random")
    ap.add_argument("--peft", default="none,lora", help="comma list of none, lora")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="steps not timed")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="rows per step")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (cuda default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="sft_vs_trl")
    a = ap.parse_args()
    dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    models = run_child("_models.py", "prepare", {"model": a.model}, threads=a.threads)
    cfg = dict(model_path=models["policy"], steps=a.steps, batch=a.batch, size=a.batch * a.steps + 16,
               max_length=a.max_length, device=a.device, dtype=dtype, threads=a.threads)  # fmt: skip
    mem = "cuda_peak_mb" if a.device == "cuda" else "peak_rss_mb"
    runs: dict[str, list] = {}
    for peft in a.peft.split(","):
        for rep in range(a.repeats):
            for name in CONTENDERS if rep % 2 == 0 else CONTENDERS[::-1]:
                r = run_child("sft_vs_trl.py", name, {**cfg, "peft": peft}, threads=a.threads, tag=f"{name}-{peft}")
                r["s_per_step"] = median(r["step_s"][a.warmup :])
                runs.setdefault(f"{name}/{peft}", []).append(r)
                print(f"  {name}/{peft:5s} run {rep + 1}: {r['s_per_step'] * 1000:.1f} ms/step, peak "
                      f"{'GPU' if a.device == 'cuda' else 'RSS'} {r[mem]:.0f} MiB", flush=True)  # fmt: skip

    med = {k: {m: median([r[m] for r in rs]) for m in ("s_per_step", "peak_rss_mb", mem)} for k, rs in runs.items()}
    rows, targets = [], {}
    for peft in a.peft.split(","):
        ours, theirs = med[f"alignlab/{peft}"], med[f"trl/{peft}"]
        ratio = ours["s_per_step"] / theirs["s_per_step"]
        weights = "full" if peft == "none" else "lora"
        rows.append([weights, theirs["s_per_step"] * 1000, ours["s_per_step"] * 1000, ratio, theirs[mem], ours[mem]])
        targets[f"time_ratio_{weights}"] = {"value": ratio, "target": "<= 1.02", "met": ratio <= 1.02}
    what = "GPU" if a.device == "cuda" else "RSS"
    headers = ["weights", "TRL ms/step", "alignlab ms/step", "alignlab / TRL", f"TRL peak {what} MiB",
               f"alignlab peak {what} MiB"]  # fmt: skip
    setting = (f"model {a.model} ({models['params'] / 1e6:.1f}M params), batch {a.batch}, max_length {a.max_length}, "
               f"{a.steps} steps per run ({a.warmup} warm-up), {a.repeats} runs per contender alternating, {dtype}, "
               f"{a.device}, {a.threads} thread(s); medians")  # fmt: skip
    report("sft_vs_trl", a.name, setting, headers, rows, targets, {"config": cfg, "summary": med, "runs": runs})


if __name__ == "__main__":
    if not worker_main({"alignlab": alignlab_worker, "trl": trl_worker}):
        main()
