"""PPO: alignlab's ppo stage against TRL 1.9's `trl.experimental.ppo.PPOTrainer` (TRL's last PPO trainer; TRL
1.16, which alignlab uses, has none), same model, prompts, batch, response length, PPO epochs and minibatches.

    python bench/ppo_vs_trl.py                      # default: llama-20m, full FT and LoRA, ~6 minutes on 2 CPUs
    python bench/ppo_vs_trl.py --model llama-100m --peft lora --steps 6 --repeats 3
    python bench/ppo_vs_trl.py --device cuda --model llama-350m --batch 64 --minibatch 16 --response-length 64

TRL 1.9 runs in its own virtual environment, bench/.venv-trl19 (created on first use: torch==2.13.0 from the
local wheel, trl==1.9.*, peft; pip resolves transformers 5.23 / accelerate 1.15 / datasets 5.2, which work).
Each run is a child process; contenders alternate (A B, B A, ...), and each reports the median seconds per PPO
update over its updates after the first (warm-up), a phase profile, and its own peak RSS (VmHWM).

What runs (TRL's design needs four models; alignlab's three or two):
- TRL: policy, reference (a full copy; with LoRA the policy with its adapter disabled), value model (a separate
  sequence-classification model, trained in full even with LoRA), reward model. Policy log-probs of the rollout
  come from generate()'s scores; a training forward runs the policy and the value backbone.
- alignlab: policy + value head on one backbone (one forward gives logits and values; in the rollout both are read
  off the sampling pass, no extra forward), reference (a frozen copy under full FT; the adapter disabled under
  LoRA), reward model (the same directory as TRL's). rollout.forward_batch_size = batch, as TRL's
  local_rollout_forward_batch_size.
Same settings on both: fp32, no gradient checkpointing, dropout off, AdamW, constant learning rate, no gradient
clipping (TRL's PPO loop does not clip, so alignlab's train.max_grad_norm is set to 0), stop at EOS, k1 KL estimate,
kl_coef 0.05, gamma 1, lam 0.95, whitened advantages, cliprange 0.2, vf_coef 0.1. TRL: per_device_train_batch_size
= batch, gradient_accumulation_steps = 1, num_mini_batches = batch / minibatch (one optimizer step per
minibatch, as alignlab), local_rollout_forward_batch_size = batch (one generate() call, as alignlab).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

from _common import (
    BENCH_DIR,
    CACHE,
    command_line,
    machine,
    median,
    peak_rss_mb,
    rss_mb,
    run_child,
    setup_worker,
    table,
    versions,
    worker_main,
    write_result,
)

VENV = BENCH_DIR / ".venv-trl19"
VENV_PY = VENV / "bin" / "python"
TRL_REQUIREMENTS = ["torch==2.13.0", "trl==1.9.*", "peft"]


# ------------------------------------------------------------------------------------------------ TRL venv


def ensure_trl_venv() -> Path:
    """Create bench/.venv-trl19 with TRL 1.9 unless it is there and imports. $BENCH_TRL19_PYTHON names another
    interpreter that imports TRL 1.9 (a machine that cannot run pip against the registry: a wrapper script that puts
    a TRL 1.9 install first on PYTHONPATH)."""
    import subprocess

    if os.environ.get("BENCH_TRL19_PYTHON"):
        python = os.environ["BENCH_TRL19_PYTHON"]
        check = [python, "-c", "import trl, trl.experimental.ppo; assert trl.__version__.startswith('1.9')"]
        subprocess.run(check, check=True)
        return Path(python)

    check = [str(VENV_PY), "-c", "import trl, trl.experimental.ppo; assert trl.__version__.startswith('1.9')"]
    if VENV_PY.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return VENV_PY
    print(f"creating {VENV} (TRL 1.9, its own torch/transformers); a few minutes, once", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV_PY), "-m", "pip", "install", "-q", *TRL_REQUIREMENTS], check=True)
    subprocess.run(check, check=True)
    return VENV_PY


# ------------------------------------------------------------------------------------------------ workers


class Phases:
    """Wall time per named phase, per PPO update."""

    def __init__(self):
        self.now: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.widths: list[int] = []

    def wrap(self, fn, key):
        def timed(*args, **kwargs):
            k = key(args, kwargs) if callable(key) else key
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.now[k] += time.perf_counter() - t0

        return timed

    def end_step(self, total: float):
        self.now["update"] = total
        self.steps.append(dict(self.now))
        self.now = defaultdict(float)

    def summary(self, warmup: int) -> dict:
        timed = self.steps[warmup:] or self.steps
        keys = sorted({k for s in timed for k in s})
        return {k: median([s.get(k, 0.0) for s in timed]) for k in keys}

    def result(self, contender: str, base_rss: float, warmup: int) -> dict:
        """What a worker reports: its memory, per-update seconds and the per-phase profile."""
        return {
            "contender": contender,
            "base_rss_mb": base_rss,
            "peak_rss_mb": peak_rss_mb(),
            "update_s": [s["update"] for s in self.steps],
            "profile": self.summary(warmup),
            "phase_steps": self.steps[warmup:],
            "response_width": self.widths,
        }


def alignlab_recipe(cfg: dict, run_dir: Path) -> dict:
    """The recipe alignlab's side runs: one ppo stage at the bench's settings."""
    peft = {"method": "none"} if cfg["peft"] == "none" else {
        "method": cfg["peft"], "r": cfg["lora_r"], "alpha": 2 * cfg["lora_r"], "dropout": 0.0}  # fmt: skip
    return {
        "name": "bench-ppo",
        "seed": cfg["seed"],
        "output_dir": str(run_dir),
        "model": {"name_or_path": cfg["policy"], "dtype": cfg["dtype"]},
        "peft": peft,
        "stages": [
            {
                "name": "ppo",
                "type": "ppo",
                "reward_model": cfg["reward"],
                "dataset": {"path": "builtin:arith", "split": "sft", "size": cfg["n_prompts"]},
                "train": {
                    "max_steps": cfg["steps"],
                    "logging_steps": 1,
                    "epochs": cfg["epochs"],
                    "minibatch_size": cfg["minibatch"],
                    "learning_rate": cfg["lr"],
                    "max_grad_norm": 0.0,
                },
                "rollout": {
                    "batch_size": cfg["batch"],
                    "max_new_tokens": cfg["response_length"],
                    "temperature": cfg["temperature"],
                    "forward_batch_size": cfg["batch"],  # as TRL's local_rollout_forward_batch_size
                },
                "ppo": {"kl_coef": 0.05},
            }
        ],
    }


def alignlab_worker(cfg: dict) -> dict:
    setup_worker(cfg["threads"])
    import torch

    import alignlab.rl.ppo as pt
    import alignlab.stages.ppo as sp
    import alignlab.stages.rl_glue as glue
    from alignlab.pipeline import run_pipeline
    from alignlab.recipe import parse_recipe

    base_rss = rss_mb()
    ph = Phases()

    def generate(*args, **kwargs):
        ro = gen(*args, **kwargs)
        ph.widths.append(int(ro.completion_ids.shape[1]))
        return ro

    gen = ph.wrap(pt.generate, "generate")
    pt.generate = generate
    ref, scorer = sp.reference_logprobs, glue.reward_model_scorer
    sp.reference_logprobs = lambda *a, **k: ph.wrap(ref(*a, **k), "ref_forward")
    glue.reward_model_scorer = lambda *a, **k: ph.wrap(scorer(*a, **k), "reward_forward")
    pt.PPOTrainer.make_rollout = ph.wrap(pt.PPOTrainer.make_rollout, "rollout")
    pt.PPOTrainer.optimize = ph.wrap(pt.PPOTrainer.optimize, "ppo_epochs")
    train_step = pt.PPOTrainer.train_step

    def timed_step(self):
        if cfg["device"] == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = train_step(self)
        if cfg["device"] == "cuda":
            torch.cuda.synchronize()
        ph.end_step(time.perf_counter() - t0)
        return out

    pt.PPOTrainer.train_step = timed_step
    run_dir = CACHE / "runs" / f"ppo-alignlab-{int(time.time() * 1000)}"
    run_pipeline(parse_recipe(alignlab_recipe(cfg, run_dir)), force=True)
    rows = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(run_dir, ignore_errors=True)  # the saved model is not needed (and is large for big presets)
    return {
        **ph.result("alignlab", base_rss, cfg["warmup"]),
        "response_length": [r["response_length"] for r in rows if "response_length" in r and not r.get("final")],
    }


def trl_worker(cfg: dict) -> dict:
    setup_worker(cfg["threads"])
    import tempfile

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as m

    base_rss = rss_mb()
    ph = Phases()
    dtype = getattr(torch, cfg["dtype"])

    def batch_generation(model, queries, *args, **kwargs):
        out = gen(model, queries, *args, **kwargs)
        ph.widths.append(int(out[0].shape[1] - queries.shape[1]))
        return out

    gen = ph.wrap(m.batch_generation, "generate")
    m.batch_generation = batch_generation
    m.forward = ph.wrap(m.forward, lambda a, k: "ref_forward" if not torch.is_grad_enabled() else "train_forward")
    reward_model = None
    m.get_reward = ph.wrap(m.get_reward, lambda a, k: "reward_forward" if a[0] is reward_model else "value_forward")

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cfg["device"] == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            ph.end_step(now - self.t)
            self.t = now

    tok = AutoTokenizer.from_pretrained(cfg["policy"])
    tok.padding_side = "left"  # TRL's PPO concatenates queries and responses: left-padded queries
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in cfg["prompts"]]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]  # as alignlab's encode_prompts
    train = Dataset.from_dict({"input_ids": ids})
    load = dict(dtype=dtype)
    policy = AutoModelForCausalLM.from_pretrained(cfg["policy"], **load)
    ref = AutoModelForCausalLM.from_pretrained(cfg["policy"], **load) if cfg["peft"] == "none" else None
    reward_model = AutoModelForSequenceClassification.from_pretrained(cfg["reward"], num_labels=1, **load)
    value_model = AutoModelForSequenceClassification.from_pretrained(cfg["reward"], num_labels=1, **load)
    peft_config = None
    if cfg["peft"] != "none":
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg["lora_r"], lora_alpha=2 * cfg["lora_r"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    out_dir = tempfile.mkdtemp(dir=CACHE, prefix="ppo-trl-")
    args = PPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=cfg["batch"],
        gradient_accumulation_steps=1,
        num_mini_batches=cfg["batch"] // cfg["minibatch"],
        num_ppo_epochs=cfg["epochs"],
        total_episodes=cfg["batch"] * cfg["steps"],
        local_rollout_forward_batch_size=cfg["batch"],
        response_length=cfg["response_length"],
        temperature=cfg["temperature"],
        stop_token="eos",
        learning_rate=cfg["lr"],
        lr_scheduler_type="constant",
        kl_coef=0.05,
        bf16=cfg["dtype"] == "bfloat16",
        fp16=False,
        gradient_checkpointing=False,
        num_sample_generations=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=cfg["seed"],
        use_cpu=cfg["device"] == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train,
        eval_dataset=train.select(range(min(8, len(train)))),
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    return ph.result(f"trl {trl.__version__}", base_rss, cfg["warmup"])


# ------------------------------------------------------------------------------------------------ main

PHASES = [
    ("generate", "generate (sampling)"),
    ("policy_value_forward", "rollout: rest (alignlab: log-probs, values read off sampling)"),
    ("value_forward", "rollout: value-model forward (TRL)"),
    ("ref_forward", "rollout: reference forward"),
    ("reward_forward", "rollout: reward-model forward"),
    ("ppo_epochs", "PPO epochs (forward, backward, AdamW)"),
    ("train_forward", "  of which training forwards (TRL)"),
    ("other", "other (GAE, whitening, logging, ...)"),
]


def phase_table(prof: dict) -> dict:
    """Normalise both contenders' phase timers into PHASES."""
    out = {k: prof.get(k, 0.0) for k in ("generate", "ref_forward", "reward_forward", "value_forward", "train_forward")}
    if "rollout" in prof:  # alignlab: make_rollout and optimize are timed whole
        out["policy_value_forward"] = prof["rollout"] - prof["generate"] - prof["ref_forward"] - prof["reward_forward"]
        out["ppo_epochs"] = prof["ppo_epochs"]
        out["other"] = prof["update"] - prof["rollout"] - prof["ppo_epochs"]
    else:  # TRL: one train() loop; the PPO epochs are what the rollout timers do not cover
        rollout = sum(out[k] for k in ("generate", "ref_forward", "reward_forward", "value_forward"))
        out["policy_value_forward"] = 0.0
        out["ppo_epochs"] = prof["update"] - rollout
        out["other"] = 0.0  # inside ppo_epochs for TRL (its loop cannot be split without editing it)
    out["update"] = prof["update"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--model", default="llama-20m", help="tiny | llama-20m | ... | llama-350m | smollm2 | smollm2-random"
    )
    ap.add_argument("--peft", default="none,lora", help="comma list of: none (full FT), lora")
    ap.add_argument("--steps", type=int, default=4, help="PPO updates per run (the first is warm-up, not timed)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per contender and configuration, alternating")
    ap.add_argument("--batch", type=int, default=16, help="prompts per PPO update")
    ap.add_argument("--minibatch", type=int, default=8, help="responses per optimizer step")
    ap.add_argument("--epochs", type=int, default=4, help="PPO epochs per update")
    ap.add_argument("--response-length", type=int, default=16, help="max new tokens (stops at EOS)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (cuda default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="ppo_vs_trl", help="results file: bench/results/NAME.json")
    a = ap.parse_args()
    dtype = a.dtype or ("bfloat16" if a.device == "cuda" else "float32")
    venv_py = ensure_trl_venv()
    n_prompts = max(256, a.batch * a.steps)
    models = run_child("_models.py", "prepare", {"model": a.model, "prompts": n_prompts}, threads=a.threads)
    cfg = dict(
        policy=models["policy"], reward=models["reward"], prompts=models["prompts"], n_prompts=n_prompts,
        steps=a.steps, warmup=1, batch=a.batch, minibatch=a.minibatch, epochs=a.epochs,
        response_length=a.response_length, temperature=0.7, lr=1e-5, seed=0, lora_r=a.lora_r,
        device=a.device, dtype=dtype, threads=a.threads,
    )  # fmt: skip
    contenders = {"alignlab": (None, "alignlab"), "trl": (str(venv_py), "trl")}
    runs: dict[str, dict[str, list]] = {}
    for peft in a.peft.split(","):
        runs[peft] = {"alignlab": [], "trl": []}
        for rep in range(a.repeats):
            order = ["alignlab", "trl"] if rep % 2 == 0 else ["trl", "alignlab"]
            for name in order:
                python, worker = contenders[name]
                r = run_child("ppo_vs_trl.py", worker, {**cfg, "peft": peft}, python=python, threads=a.threads,
                              tag=peft)  # fmt: skip
                r["s_per_update"] = median(r["update_s"][cfg["warmup"] :])
                runs[peft][name].append(r)
                print(f"  {peft:5s} {name:9s} run {rep + 1}: {r['s_per_update']:.3f} s/update, "
                      f"peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)  # fmt: skip

    rows, summary, profiles = [], {}, []
    for peft, by in runs.items():
        al = {k: median([r[k] for r in by["alignlab"]]) for k in ("s_per_update", "peak_rss_mb", "base_rss_mb")}
        tr = {k: median([r[k] for r in by["trl"]]) for k in ("s_per_update", "peak_rss_mb", "base_rss_mb")}
        speedup = tr["s_per_update"] / al["s_per_update"]
        mem = al["peak_rss_mb"] / tr["peak_rss_mb"]
        mem_model = (al["peak_rss_mb"] - al["base_rss_mb"]) / (tr["peak_rss_mb"] - tr["base_rss_mb"])
        label = "full FT" if peft == "none" else peft
        rows.append([label, al["s_per_update"], tr["s_per_update"], speedup, al["peak_rss_mb"], tr["peak_rss_mb"],
                     mem, mem_model, "yes" if speedup >= 2 else "no", "yes" if mem <= 0.5 else "no"])  # fmt: skip
        summary[peft] = dict(alignlab=al, trl=tr, speedup=speedup, peak_rss_ratio=mem,
                             peak_rss_above_imports_ratio=mem_model)  # fmt: skip
        # Phases per update (so "other" is exact per update), then the median of each over all timed updates.
        pa, pt = ({k: median([v[k] for v in per]) for k in per[0]} for per in (
            [phase_table(st) for r in by[c] for st in r["phase_steps"]] for c in ("alignlab", "trl")))  # fmt: skip
        summary[peft]["profile"] = {"alignlab": pa, "trl": pt}
        for key, title in PHASES + [("update", "whole update")]:
            if pa.get(key, 0.0) or pt.get(key, 0.0):
                profiles.append([label, title, pa.get(key, 0.0), pt.get(key, 0.0)])

    headers = ["config", "alignlab s/update", "TRL 1.9 s/update", "speedup (TRL/alignlab)", "alignlab peak MiB",
               "TRL peak MiB", "peak ratio (alignlab/TRL)", "ratio above imports", ">= 2x faster", "<= half memory"]  # fmt: skip
    main_table = table(headers, rows)
    prof_table = table(["config", "phase (median s per update)", "alignlab", "TRL 1.9"], profiles)
    setting = (f"model {a.model} ({models['params'] / 1e6:.1f}M params), batch {a.batch} prompts, minibatch "
               f"{a.minibatch}, {a.epochs} PPO epochs, response <= {a.response_length} tokens, {dtype}, {a.device}, "
               f"{a.threads} thread(s); {a.steps} updates per run (first = warm-up), {a.repeats} runs per contender, "
               "alternating; medians")  # fmt: skip
    print("\n" + setting + "\n\n" + main_table + "\n\n" + prof_table)
    widths = {p: {c: sorted({w for r in by[c] for w in r["response_width"]}) for c in by} for p, by in runs.items()}
    print(f"\nresponse widths (padded tokens) seen: {widths}")
    path = write_result(a.name, {
        "bench": "ppo_vs_trl", "command": command_line(), "setting": setting, "machine": machine(),
        "versions": {"main": versions(), "trl_venv": versions(str(venv_py))}, "model": {k: v for k, v in models.items() if k != "prompts"},
        "config": {k: v for k, v in cfg.items() if k != "prompts"}, "summary": summary, "table": main_table,
        "profile_table": prof_table, "runs": runs,
    })  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    if not worker_main({"alignlab": alignlab_worker, "trl": trl_worker}):
        main()
