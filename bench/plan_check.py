"""How close `alignlab plan` comes to measured memory: its estimate for the settings of the CPU benches against the
peak they measured, per process (CPU: float32, eager attention; `--device cpu`).

Cases (each read from the bench's own results file, so rerun those benches first to refresh them):
- bench/results/shard_memory.json: full fine-tuning GRPO on SmolLM2-135M-Instruct, 2 processes, DDP and FSDP2:
  peak RSS above imports (the larger process);
- bench/results/peft_memory.json: the sft stage on llama-100m, 1 process, full / LoRA r16 / QLoRA r16: peak RSS
  while training, above imports.
RSS counts what the allocator holds, not only live tensors, and a sharded process first loads the whole model: the
measured side is a high-water mark. The goal: within 25%.

    python bench/plan_check.py          # seconds: no training, the estimates only

Writes bench/results/plan_check.json (its table goes into docs/multi-gpu.md).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, RESULTS, machine, table, write_result  # noqa: E402

sys.path.insert(0, str(REPO))

MB = 1024 * 1024


def _recipe(model: str, peft: str, stage: dict):
    from alignlab.recipe import parse_recipe

    p = {"method": peft}
    if peft != "none":
        p.update(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    return parse_recipe({"name": "plan-check", "model": {"name_or_path": model}, "peft": p, "stages": [stage]})


def _prompt_length(recipe, spec) -> int:
    """The longest prompt of the stage's data, in tokens (rows are padded to the longest of a batch)."""
    from alignlab.data import build_datasets
    from alignlab.generation import prompt_token_ids
    from alignlab.models import load_tokenizer

    tokenizer = load_tokenizer(recipe)
    rows, _ = build_datasets(spec.dataset, recipe, spec.type, tokenizer.chat_template is not None, with_eval=False)
    return max(len(prompt_token_ids(tokenizer, p)) for p in rows["prompt"])


def shard_cases() -> list[dict]:
    from alignlab.models import resolve_base
    from alignlab.plan import estimate, model_shape

    path = RESULTS / "shard_memory.json"
    if not path.exists():
        return []
    result = json.loads(path.read_text())
    args, cases = result["args"], []
    for m in result["memory"]:
        stage = {
            "name": "grpo",
            "type": "grpo",
            "dataset": {"path": "builtin:constraints", "split": "train", "size": 64},
            "reward_fn": "builtin:constraints",
            "train": {"max_steps": args["steps"]},
            "rollout": {"batch_size": 2, "num_samples": 4, "max_new_tokens": args["tokens"]},
            "beta": 0.0,
            "watch_steps": None,
        }
        recipe = _recipe(args["model"], "none", stage)
        spec = recipe.stages[0]
        shape = model_shape(recipe, resolve_base(recipe), 16)
        est = estimate(recipe, spec, shape, 2, _prompt_length(recipe, spec), device="cpu")
        engine = "DDP" if m["shard"] == "none" else "FSDP2"
        cases.append(
            {
                "case": f"grpo full FT, SmolLM2-135M, 2 processes, {engine}",
                "estimate_mb": est.engines[engine] / MB,
                "measured_mb": m["peak_above_imports_mb"],
            }
        )
    return cases


def peft_cases() -> list[dict]:
    from alignlab.plan import estimate, model_shape

    path = RESULTS / "peft_memory.json"
    if not path.exists():
        return []
    result = json.loads(path.read_text())
    config = Path(REPO / "bench" / ".cache" / "plan_check" / "llama-100m.json")
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(result["model"]["config"]))
    cases = []
    batch, length = (int(x) for x in re.search(r"batch (\d+) x (\d+) tokens", result["setting"]).groups())
    for method, runs in result["runs"].items():
        stage = {
            "name": "sft",
            "type": "sft",
            "dataset": {"path": "builtin:arith", "split": "sft"},
            "train": {"per_device_batch_size": batch, "max_length": length},
        }
        recipe = _recipe("builtin:tiny-llama", method, stage)  # only its keys are read; the shape is llama-100m's
        shape = model_shape(recipe, str(config), 16)
        est = estimate(recipe, recipe.stages[0], shape, 1, 0, device="cpu")
        measured = max(r["train_peak_rss_mb"] - r["base_rss_mb"] for r in runs)
        cases.append(
            {
                "case": f"sft {method}, llama-100m, batch {batch} x {length}, 1 process",
                "estimate_mb": est.engines["DDP"] / MB,
                "measured_mb": measured,
            }
        )
    return cases


def _gb(x: float) -> float:
    """GB, or nan (shown as '-') where an engine does not apply (own loops: no CPU offload)."""
    return x / 1e9 if x != float("inf") else float("nan")


def sizes_table(gpus: int = 8) -> str:
    """GB per GPU for 0.5B, 8B and 70B models (bench/configs/), bf16 on GPUs: an SFT stage (8 rows x 2048 tokens,
    gradient checkpointing) and a GRPO stage (8 prompts x 8 samples of 512 tokens after 256-token prompts, beta
    0.04, minibatches of 16 responses), full fine-tuning and LoRA r16, under each engine."""
    from alignlab.plan import ENGINES, estimate, model_shape

    stages = {
        "sft": {"type": "sft", "dataset": {"path": "builtin:arith", "split": "sft"},
                "train": {"per_device_batch_size": 8, "max_length": 2048}},
        "grpo": {"type": "grpo", "dataset": {"path": "builtin:arith", "split": "sft"}, "reward_fn": "builtin:arith",
                 "rollout": {"batch_size": 8, "num_samples": 8, "max_new_tokens": 512}, "beta": 0.04,
                 "train": {"minibatch_size": 16}},
    }  # fmt: skip
    rows = []
    for name in ("qwen2.5-0.5b", "llama-3.1-8b", "llama-3.1-70b"):
        for peft in ("none", "lora"):
            for stage, keys in stages.items():
                recipe = _recipe("builtin:tiny-llama", peft, {"name": stage, **keys})
                recipe.model.dtype = "bfloat16"
                recipe.model.gradient_checkpointing = True
                shape = model_shape(recipe, str(REPO / "bench" / "configs" / f"{name}.json"), 16)
                est = estimate(recipe, recipe.stages[0], shape, gpus, 256)
                per_layer = est.engines["FSDP2"] - est.gathered_for_sampling
                rows.append([name, "full" if peft == "none" else "LoRA r16", stage]
                            + [_gb(est.engines[e]) for e in ENGINES] + [_gb(per_layer)])  # fmt: skip
    headers = ["model", "training", "stage", *(f"{e} GB/GPU" for e in ENGINES), "FSDP2, gather per_layer"]
    return table(headers, rows)


def main() -> None:
    sizes = sizes_table()
    print(f"alignlab plan, 8 GPUs, bf16, gradient checkpointing:\n{sizes}\n")
    cases = shard_cases() + peft_cases()
    for c in cases:
        c["ratio"] = c["estimate_mb"] / c["measured_mb"]
    text = table(
        ["case", "estimate MB", "measured peak MB", "estimate / measured"],
        [[c["case"], c["estimate_mb"], c["measured_mb"], c["ratio"]] for c in cases],
    )
    print(text)
    within = sum(0.75 <= c["ratio"] <= 1.25 for c in cases)
    print(f"\n{within} of {len(cases)} within 25%")
    path = write_result(
        "plan_check",
        {"machine": machine(), "cases": cases, "table": text, "within_25pct": within, "sizes_table": sizes},
    )
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
