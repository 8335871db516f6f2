"""GRPO: alignlab's grpo stage against TRL 1.16's `GRPOTrainer`, same model, prompts, group size, response length,
generation backend (transformers' generate, no vLLM) and loss.

    python bench/grpo_vs_trl.py                              # tiny model, full FT and LoRA, a few minutes on 2 CPUs
    python bench/grpo_vs_trl.py --model llama-20m --peft lora --steps 12 --repeats 3

Each run is a child process (bench/_common.py); contenders alternate (A B, B A, ...), and each reports the median
seconds per update over its updates after the warm-up ones, the share of that time spent in generate(), and its own
peak RSS (VmHWM).

The same on both: builtin:arith prompts (chat template), `prompts` prompts x `group` responses per update,
`response_length` new tokens at most (stop at EOS), temperature 1, no top-p / top-k / repetition penalty, fp32, no
gradient checkpointing, dropout off, AdamW at a constant learning rate, gradient clipping at 1.0, one update per batch
(TRL: per_device_train_batch_size = prompts x group, gradient_accumulation_steps 1, num_iterations 1; alignlab:
train.epochs 1, one minibatch), beta 0 (no reference pass on either), GRPO advantages (r - mean) / (std + 1e-4) and
the per-response token mean (TRL loss_type "grpo", alignlab loss_agg sequence_mean), clip 0.2 on both sides, reward
builtin:arith. alignlab's collapse watch is off (watch_steps null: its KL needs a reference pass). What differs by
design: alignlab samples with one seeded random stream per response (a logits processor on the greedy path) and reads
the old log-probs off the sampling pass; TRL samples with do_sample and, at these settings, uses the training
forward's detached log-probs as the old ones (no extra pass on either side).
"""

from __future__ import annotations

import argparse
import os
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

CONTENDERS = {
    "alignlab": {"kind": "alignlab"},
    "trl": {"kind": "trl"},
}


def _time_generate(rec: dict) -> None:
    """Add the wall time of every transformers generate() call to rec["generate_s"] (both sides sample with it)."""
    from transformers import GenerationMixin

    generate = GenerationMixin.generate

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return generate(self, *args, **kwargs)
        finally:
            rec["generate_s"][-1] += time.perf_counter() - t0

    GenerationMixin.generate = timed


def time_grpo_steps(rec: dict, sync=lambda: None) -> None:
    """Append each alignlab GRPO step's wall time to rec["step_s"] (and open its rec["generate_s"] slot); `sync`
    waits for the device before each clock read."""
    from alignlab.rl.grpo import GRPOTrainer

    train_step = GRPOTrainer.train_step

    def timed_step(self):
        rec["generate_s"].append(0.0)
        sync()
        t0 = time.perf_counter()
        out = train_step(self)
        sync()
        rec["step_s"].append(time.perf_counter() - t0)
        return out

    GRPOTrainer.train_step = timed_step


def _peft(cfg: dict) -> dict:
    return {"method": "none"} if cfg["peft"] == "none" else {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0}


def _sync(cfg: dict) -> None:
    if cfg["device"] == "cuda":
        import torch

        torch.cuda.synchronize()


def alignlab_recipe(cfg: dict, run_dir) -> dict:
    """The recipe alignlab's side runs: one grpo stage from the base model at the bench's settings."""
    return {
        "name": "bench-grpo",
        "seed": 0,
        "output_dir": str(run_dir),
        "model": {"name_or_path": cfg["model_path"]},
        "peft": _peft(cfg),
        "stages": [
            {
                "name": "grpo",
                "type": "grpo",
                "input": "base",
                "dataset": {"path": "builtin:arith", "split": "sft", "size": cfg["size"]},
                "reward_fn": "builtin:arith",
                "train": {
                    "max_steps": cfg["steps"],
                    "learning_rate": 1e-5,
                    "max_grad_norm": 1.0,
                    "logging_steps": 1000,
                },
                "rollout": {
                    "batch_size": cfg["prompts"],
                    "num_samples": cfg["group"],
                    "max_new_tokens": cfg["response_length"],
                    "temperature": 1.0,
                },
                "advantage": "grpo",
                "loss_agg": "sequence_mean",
                "watch_steps": None,
            }
        ],
    }


def alignlab_worker(cfg: dict) -> dict:
    setup_worker(cfg["threads"])
    if cfg["dtype"] == "bfloat16":  # autocast, as TRL's bf16=True
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    from alignlab.pipeline import run_pipeline
    from alignlab.recipe import parse_recipe

    base = rss_mb()
    rec = {"step_s": [], "generate_s": []}
    _time_generate(rec)
    time_grpo_steps(rec, lambda: _sync(cfg))
    run_dir = CACHE / "runs" / f"grpo-alignlab-{int(time.time() * 1000)}"
    run_pipeline(parse_recipe(alignlab_recipe(cfg, run_dir)), force=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"base_rss_mb": base, **peak_memory(cfg["device"]), **rec}


def trl_worker(cfg: dict) -> dict:
    setup_worker(cfg["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignlab.builtin.rewards import builtin_reward_fn
    from alignlab.builtin.tasks import generate_task

    base = rss_mb()
    rec = {"step_s": [], "generate_s": []}
    _time_generate(rec)
    rows = generate_task("arith", "sft", cfg["size"], seed=0)  # the prompts alignlab's stage reads
    train = Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    tok = AutoTokenizer.from_pretrained(cfg["model_path"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"])
    peft_config = trl_lora_config(cfg)
    arith = builtin_reward_fn("builtin:arith")

    def arith_reward(prompts, completions, **kwargs):  # TRL passes chat messages; the task's reward reads them
        return arith(prompts, completions)

    args = GRPOConfig(
        output_dir=(out_dir := tempfile.mkdtemp(dir=CACHE, prefix="grpo-trl-")),
        max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["prompts"] * cfg["group"],
        gradient_accumulation_steps=1,
        num_generations=cfg["group"],
        max_completion_length=cfg["response_length"],
        num_iterations=1,
        temperature=1.0,
        beta=0.0,
        loss_type="grpo",
        scale_rewards="group",
        epsilon=0.2,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=cfg["device"] == "cpu",
        bf16=cfg["dtype"] == "bfloat16",
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=arith_reward, args=args, train_dataset=train, processing_class=tok,
        peft_config=peft_config,
    )  # fmt: skip

    class Timer(TrainerCallback):  # on_step_begin runs before the batch's generation (inside training_step)
        def on_step_begin(self, args, state, control, **kwargs):
            rec["generate_s"].append(0.0)
            _sync(cfg)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(cfg)
            rec["step_s"].append(time.perf_counter() - self.t0)

    trainer.add_callback(Timer())
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"base_rss_mb": base, **peak_memory(cfg["device"]), **rec}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny | llama-20m | ... | llama-350m | smollm2 | smollm2-random")
    ap.add_argument("--peft", default="none,lora", help="comma list of none, lora")
    ap.add_argument("--steps", type=int, default=20, help="updates per run")
    ap.add_argument("--warmup", type=int, default=3, help="updates not timed")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per update")
    ap.add_argument("--group", type=int, default=4, help="responses per prompt")
    ap.add_argument("--response-length", type=int, default=8)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="bfloat16: autocast on both sides (alignlab then recomputes the sampling log-probs)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="grpo_vs_trl")
    a = ap.parse_args()
    models = run_child("_models.py", "prepare", {"model": a.model}, threads=a.threads)
    cfg = dict(model_path=models["policy"], steps=a.steps, prompts=a.prompts, group=a.group,
               response_length=a.response_length, size=max(a.prompts * a.steps, 64), threads=a.threads,
               device=a.device, dtype=a.dtype)  # fmt: skip
    runs: dict[str, list] = {}
    for peft in a.peft.split(","):
        for rep in range(a.repeats):
            for name in list(CONTENDERS) if rep % 2 == 0 else list(CONTENDERS)[::-1]:
                key = f"{name}/{peft}"
                r = run_child("grpo_vs_trl.py", CONTENDERS[name]["kind"], {**cfg, "peft": peft}, threads=a.threads,
                              tag=f"{name}-{peft}")  # fmt: skip
                steps, gens = r["step_s"][a.warmup :], r["generate_s"][a.warmup :]
                r["s_per_step"] = median(steps)
                r["generate_share"] = sum(gens) / sum(steps)
                runs.setdefault(key, []).append(r)
                gpu = f", peak GPU {r['cuda_peak_mb']:.0f} MiB" if "cuda_peak_mb" in r else ""
                print(f"  {key:16s} run {rep + 1}: {r['s_per_step'] * 1000:.1f} ms/step ({r['generate_share']:.0%} "
                      f"in generate), peak RSS {r['peak_rss_mb']:.0f} MiB{gpu}", flush=True)  # fmt: skip

    keys = ("s_per_step", "generate_share", "peak_rss_mb") + (("cuda_peak_mb",) if a.device == "cuda" else ())
    med = {k: {m: median([r[m] for r in rs]) for m in keys} for k, rs in runs.items()}
    rows, targets = [], {}
    for peft in a.peft.split(","):
        ours, theirs = med[f"alignlab/{peft}"], med[f"trl/{peft}"]
        ratio = ours["s_per_step"] / theirs["s_per_step"]
        weights = "full" if peft == "none" else "lora"
        mem = "cuda_peak_mb" if a.device == "cuda" else "peak_rss_mb"
        rows.append([weights, theirs["s_per_step"] * 1000, ours["s_per_step"] * 1000, ratio,
                     theirs["generate_share"], ours["generate_share"], theirs[mem], ours[mem]])  # fmt: skip
        targets[f"time_ratio_{weights}"] = {"value": ratio, "target": "<= 1/1.3 (own loop)", "met": ratio <= 1 / 1.3}
    mem_name = "peak GPU MiB" if a.device == "cuda" else "peak RSS MiB"
    headers = ["weights", "TRL ms/step", "alignlab ms/step", "alignlab / TRL", "TRL in generate",
               "alignlab in generate", f"TRL {mem_name}", f"alignlab {mem_name}"]  # fmt: skip
    setting = (f"model {a.model} ({models['params'] / 1e6:.1f}M params), {a.prompts} prompts x {a.group} responses "
               f"x up to {a.response_length} tokens per update, {a.steps} updates per run ({a.warmup} warm-up), "
               f"{a.repeats} runs per contender alternating, {a.dtype}, {a.device}, {a.threads} thread(s); medians")  # fmt: skip
    report("grpo_vs_trl", a.name, setting, headers, rows, targets, {"config": cfg, "summary": med, "runs": runs})


if __name__ == "__main__":
    if not worker_main({"alignlab": alignlab_worker, "trl": trl_worker}):
        main()
