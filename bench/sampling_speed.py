"""How fast a generate stage samples SmolLM2-135M-Instruct on this machine, by precision and form of the model.

Contenders (each a child process, alternated A B C D, D C B A, ...; `--threads` threads each, 2 by default: the
generate stage's own setting on 2 cores):
- `fp32`: the base model in float32 (what the eval and every float32 stage samples with);
- `bf16`: cast to bf16 (`dtype: bfloat16` of a generate stage), with `contiguous_head_input` as generate() uses it;
- `bf16_strided`: the same without that context (the LM head gets generate()'s strided view of the last position);
- `lora`: a LoRA adapter (r 16, all linear layers) over the float32 base, unmerged (`merged` folds it in, as the
  generate stage does: `merged_for_sampling`).
Each child samples `--rows` answers of up to `--tokens` new tokens to the first `--rows / --samples` prompts of
`builtin:constraints`' train split (`--samples` each, the per-row seeded sampler), `--repeats` times; the bench
reports the median seconds per call and the ratio to fp32 measured in the same run.

    python bench/sampling_speed.py                      # ~4 min on 2 CPU cores
    python bench/sampling_speed.py --rows 64 --repeats 3

Writes bench/results/sampling_speed.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import command_line, machine, median, run_child, setup_worker, table, versions, worker_main, write_result  # noqa: E402

CONTENDERS = ("fp32", "bf16", "bf16_strided", "lora", "merged")


def _worker(config: dict) -> dict:
    setup_worker(config["threads"])
    import contextlib

    import torch

    from alignlab import generation
    from alignlab.data import build_datasets
    from alignlab.models import load_frozen_model, load_tokenizer, merged_for_sampling, resolve_base
    from alignlab.recipe import parse_recipe
    from alignlab.schema import DatasetSpec
    from alignlab.stages.generate import sample_seed

    recipe = parse_recipe({
        "name": "sampling-speed",
        "output_dir": str(Path(__file__).parent / ".cache" / "sampling-speed"),
        "model": {"name_or_path": "builtin:smollm2-135m-instruct"},
        "stages": [{"name": "eval", "type": "eval", "dataset": {"path": "builtin:constraints", "split": "eval"}}],
    })  # fmt: skip
    tok = load_tokenizer(recipe, resolve_base(recipe))
    spec = DatasetSpec(path="builtin:constraints", split="train", size=config["rows"] // config["samples"])
    rows = build_datasets(spec, recipe, "generate", True, with_eval=False)[0]
    prompts = [p for p in rows["prompt"] for _ in range(config["samples"])]
    seeds = [sample_seed(0, "speed", i // config["samples"], i % config["samples"]) for i in range(len(prompts))]
    model = load_frozen_model(recipe, None)
    kind = config["kind"]
    if kind in ("lora", "merged"):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(model, lora).eval()
        if kind == "merged":
            model = merged_for_sampling(model)
    if kind.startswith("bf16"):
        model = model.to(torch.bfloat16)
    if kind == "bf16_strided":  # generate() without the contiguous LM-head input
        generation.contiguous_head_input = lambda model: contextlib.nullcontext()
    times, tokens = [], 0
    for _ in range(config["repeats"]):
        start = time.perf_counter()
        out = generation.generate(
            model, tok, prompts, max_new_tokens=config["tokens"], temperature=1.0, row_seeds=seeds
        )
        times.append(time.perf_counter() - start)
        tokens = int(out.completion_mask.sum())
    return {"seconds": times, "tokens": tokens, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=128, help="answers per sampling call (prompts x samples)")
    ap.add_argument("--samples", type=int, default=8, help="answers per prompt")
    ap.add_argument("--tokens", type=int, default=64, help="max new tokens")
    ap.add_argument("--repeats", type=int, default=2, help="calls per child")
    ap.add_argument("--rounds", type=int, default=2, help="children per contender (order alternated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    args = ap.parse_args()
    names = args.contenders.split(",")
    config = {k: getattr(args, k) for k in ("rows", "samples", "tokens", "repeats", "threads")}
    runs = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            res = run_child(Path(__file__).name, "sample", {**config, "kind": name}, threads=args.threads, tag=name)
            runs[name].append(res)
            print(f"{name}: {', '.join(f'{s:.1f}' for s in res['seconds'])} s", flush=True)
    med = {n: median([s for res in runs[n] for s in res["seconds"]]) for n in names}
    ref = med.get("fp32")
    rows = [[n, med[n], ref / med[n] if ref else float("nan"), runs[n][0]["tokens"]] for n in names]
    md = table(["model", "s per call (median)", "speed vs fp32", "tokens sampled"], rows)
    print(md)
    path = write_result(
        "sampling_speed",
        {"table": md, "config": config, "runs": runs, "command": command_line(), "machine": machine(),
         "versions": versions()},
    )  # fmt: skip
    print(f"written to {path}")


if __name__ == "__main__":
    if not worker_main({"sample": _worker}):
        main()
