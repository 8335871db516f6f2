"""DPO: alignlab's dpo stage against TRL's DPOTrainer used directly (the TRL of the main environment), same model,
data (builtin:arith, split preference), batch, sequence length and steps.

    python bench/dpo_vs_trl.py                         # default: builtin tiny model, ~4 minutes on 2 CPUs
    python bench/dpo_vs_trl.py --model llama-20m --steps 30 --repeats 3
    python bench/dpo_vs_trl.py --device cuda --model llama-350m --batch 32

Contenders (each a child process, alternating, `--repeats` runs each):
- trl:            TRL's DPOTrainer with its defaults: full fine-tuning, a separate reference model (a second full
                  copy, created by TRL from the model's path), reference log-probs computed every step.
- alignlab:       alignlab's dpo stage in that same configuration (peft none, precompute_ref_logps false).
                  Target: no overhead, time ratio alignlab/trl <= 1.02.
- alignlab-fast:  alignlab's dpo stage with LoRA (the reference is the backbone with the adapter disabled: no
                  second model) and precompute_ref_logps: true. Target: >= 1.4x faster per step than `trl`.
- trl-fast:       TRL used directly in the fast configuration (LoRA + precompute_ref_log_probs), for reference.
- trl-gc:         `trl` with TRL's literal default gradient_checkpointing=True (every other contender has it off,
                  as alignlab's recipes do): the configuration a user gets from DPOConfig() untouched.
All run in float32 (TRL's bf16=True default is turned off: the setting is fp32 on both sides).
Seconds per step = median interval between consecutive optimizer steps (on_step_end to on_step_end, so data
collation and logging count), after `--warmup` steps. Precomputing reference log-probs happens before the first
step; its time is reported apart, and `amortised s/step` adds it back over the run's steps (one epoch here: the
precompute pays for itself over more epochs, or a second run, which reads alignlab's on-disk cache).
"""

from __future__ import annotations

import argparse
import shutil
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

CONTENDERS = {
    "trl": dict(kind="trl", peft="none", precompute=False),
    "alignlab": dict(kind="alignlab", peft="none", precompute=False),
    "alignlab-fast": dict(kind="alignlab", peft="lora", precompute=True),
    "trl-fast": dict(kind="trl", peft="lora", precompute=True),
    "trl-gc": dict(kind="trl", peft="none", precompute=False, gc=True),
}


class StepTimer:
    def __init__(self):
        self.steps: list[float] = []
        self.precompute = 0.0

    def callback(self, cuda: bool):
        from transformers import TrainerCallback

        timer = self

        class Timer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                self.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if cuda:
                    import torch

                    torch.cuda.synchronize()
                now = time.perf_counter()
                timer.steps.append(now - self.t)
                self.t = now

        return Timer()

    def time_every_trainer(self, cuda: bool) -> None:
        """Add this timer to every Trainer that trains in this process (patched on transformers' Trainer itself, so
        it covers whatever subclass a stage builds)."""
        from transformers import Trainer

        train = Trainer.train
        timer = self

        def train_with_timer(trainer, *args, **kwargs):
            trainer.add_callback(timer.callback(cuda))
            return train(trainer, *args, **kwargs)

        Trainer.train = train_with_timer

    def wrap_precompute(self, cls):
        orig = cls._precompute_ref_logps

        def timed(trainer, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(trainer, *args, **kwargs)
            finally:
                self.precompute += time.perf_counter() - t0

        cls._precompute_ref_logps = timed


def alignlab_worker(cfg: dict) -> dict:
    setup_worker(cfg["threads"])
    import alignlab.stages.dpo as dpo
    from alignlab.pipeline import run_pipeline
    from alignlab.recipe import parse_recipe

    base = rss_mb()
    timer = StepTimer()
    timer.wrap_precompute(dpo.RegistryDPOTrainer)
    timer.time_every_trainer(cfg["device"] == "cuda")
    peft = (
        {"method": "none"} if cfg["peft"] == "none" else {"method": cfg["peft"], "r": 16, "alpha": 32, "dropout": 0.0}
    )
    run_dir = CACHE / "runs" / f"dpo-alignlab-{int(time.time() * 1000)}"  # fresh: no reference-log-prob cache
    raw = {
        "name": "bench-dpo",
        "seed": 0,
        "output_dir": str(run_dir),
        "model": {"name_or_path": cfg["model_path"], "dtype": cfg["dtype"]},
        "peft": peft,
        "stages": [
            {
                "name": "dpo",
                "type": "dpo",
                "input": "base",
                "dataset": {"path": "builtin:arith", "split": "preference", "size": cfg["size"], "eval_size": 16},
                "loss": {"name": "dpo", "beta": 0.1},
                "precompute_ref_logps": cfg["precompute"],
                "train": {
                    "max_steps": cfg["steps"],
                    "per_device_batch_size": cfg["batch"],
                    "learning_rate": 5e-6,
                    "max_length": cfg["max_length"],
                    "logging_steps": 10,
                    "bf16": cfg["dtype"] == "bfloat16",
                },
            }
        ],
    }
    run_pipeline(parse_recipe(raw), force=True)
    shutil.rmtree(run_dir, ignore_errors=True)  # the saved model is not needed
    return {"base_rss_mb": base, **peak_memory(cfg["device"]), "step_s": timer.steps, "precompute_s": timer.precompute}


def trl_worker(cfg: dict) -> dict:
    setup_worker(cfg["threads"])
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from alignlab.builtin.tasks import generate_task

    base = rss_mb()
    timer = StepTimer()
    timer.wrap_precompute(DPOTrainer)
    rows = generate_task("arith", "preference", cfg["size"], seed=0)  # the rows alignlab's stage reads
    train = Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(cfg["model_path"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=getattr(torch, cfg["dtype"]))
    peft_config = trl_lora_config(cfg)
    args = DPOConfig(
        output_dir=(out_dir := tempfile.mkdtemp(dir=CACHE, prefix="dpo-trl-")),
        max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch"],
        learning_rate=5e-6,
        max_length=cfg["max_length"],
        beta=0.1,
        precompute_ref_log_probs=cfg["precompute"],
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=0,
        bf16=cfg["dtype"] == "bfloat16",
        gradient_checkpointing=cfg.get("gc", False),  # TRL's default is True; alignlab's recipes default to False
        use_cpu=cfg["device"] == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tok, peft_config=peft_config)
    trainer.add_callback(timer.callback(cfg["device"] == "cuda"))
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"base_rss_mb": base, **peak_memory(cfg["device"]), "step_s": timer.steps, "precompute_s": timer.precompute}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny | llama-20m | ... | llama-350m | smollm2 | smollm2-random")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list of {', '.join(CONTENDERS)}")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="steps not timed")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="preference pairs per step")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (cuda default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="dpo_vs_trl")
    a = ap.parse_args()
    dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    models = run_child("_models.py", "prepare", {"model": a.model}, threads=a.threads)
    cfg = dict(model_path=models["policy"], steps=a.steps, batch=a.batch, size=a.batch * a.steps, max_length=a.max_length,
               device=a.device, dtype=dtype, threads=a.threads)  # fmt: skip
    names = a.contenders.split(",")
    runs: dict[str, list] = {n: [] for n in names}
    for rep in range(a.repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            c = CONTENDERS[name]
            r = run_child("dpo_vs_trl.py", c["kind"], {**cfg, **c}, threads=a.threads, tag=name)
            r["s_per_step"] = median(r["step_s"][a.warmup :])
            r["amortised_s_per_step"] = (sum(r["step_s"]) + r["precompute_s"]) / len(r["step_s"])
            runs[name].append(r)
            print(f"  {name:14s} run {rep + 1}: {r['s_per_step'] * 1000:.1f} ms/step, precompute "
                  f"{r['precompute_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)  # fmt: skip

    mem = "cuda_peak_mb" if a.device == "cuda" else "peak_rss_mb"
    med = {n: {k: median([r[k] for r in rs]) for k in ("s_per_step", "amortised_s_per_step", "precompute_s",
                                                         "peak_rss_mb", mem)} for n, rs in runs.items()}  # fmt: skip
    ref = med.get("trl", {}).get("s_per_step")
    rows = []
    for n in names:
        c, m = CONTENDERS[n], med[n]
        vs = ref / m["s_per_step"] if ref else float("nan")
        rows.append([n, ("full" if c["peft"] == "none" else c["peft"]) + (" + grad ckpt" if c.get("gc") else ""),
                     "yes" if c["precompute"] else "no",
                     m["s_per_step"] * 1000, m["precompute_s"], m["amortised_s_per_step"] * 1000, vs,
                     m[mem]])  # fmt: skip
    headers = ["contender", "weights", "precompute ref", "ms/step", "precompute s", "amortised ms/step",
               "speedup vs trl default", "peak GPU MiB" if a.device == "cuda" else "peak RSS MiB"]  # fmt: skip
    targets = {}
    if "trl" in med and "alignlab" in med:
        ratio = med["alignlab"]["s_per_step"] / med["trl"]["s_per_step"]
        targets["same_config_time_ratio"] = {"value": ratio, "target": "<= 1.02", "met": ratio <= 1.02}
    if "trl" in med and "alignlab-fast" in med:
        sp = med["trl"]["s_per_step"] / med["alignlab-fast"]["s_per_step"]
        spa = med["trl"]["amortised_s_per_step"] / med["alignlab-fast"]["amortised_s_per_step"]
        targets["fast_speedup"] = {"value": sp, "target": ">= 1.4", "met": sp >= 1.4, "amortised": spa}
    setting = (f"model {a.model} ({models['params'] / 1e6:.1f}M params), batch {a.batch} pairs, max_length "
               f"{a.max_length}, {a.steps} steps per run ({a.warmup} warm-up), {a.repeats} runs per contender "
               f"alternating, {dtype}, {a.device}, {a.threads} thread(s); medians")  # fmt: skip
    report("dpo_vs_trl", a.name, setting, headers, rows, targets, {"config": cfg, "summary": med, "runs": runs})


if __name__ == "__main__":
    if not worker_main({"alignlab": alignlab_worker, "trl": trl_worker}):
        main()
