"""What a distilled student saves against its teacher: SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`, 30
layers) against its half-depth student (`builtin:smollm2-135m-instruct-half`, its 15 even layers; the architecture a
distill stage trains, so a distilled student decodes exactly as fast as this one).

Contenders (each a child process, alternated A B, B A, ...; `--threads` threads each): `teacher` and `student`. Each
reports its parameters and weight file size, then greedily decodes up to `--tokens` new tokens for the first
`--rows` prompts of `builtin:constraints`' eval split (one batch, `--repeats` times) and the time of a training-shaped
forward (`--rows` rows of prompt + `--tokens` tokens). The table gives the medians and the student's ratios.

    python bench/distill_student.py                  # ~3 min on 2 CPU cores
    python bench/distill_student.py --rows 32 --tokens 64 --repeats 3

Writes bench/results/distill_student.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import command_line, machine, median, run_child, setup_worker, table, versions, worker_main, write_result  # noqa: E402

CONTENDERS = {"teacher": "smollm2-135m-instruct", "student": "smollm2-135m-instruct-half"}


def _worker(config: dict) -> dict:
    setup_worker(config["threads"])
    import torch

    from alignlab import generation
    from alignlab.builtin import builtin_model_path
    from alignlab.builtin.tasks import generate_task
    from alignlab.models import load_tokenizer
    from alignlab.recipe import parse_recipe

    path = builtin_model_path(CONTENDERS[config["kind"]])
    recipe = parse_recipe({
        "name": "distill-student",
        "output_dir": str(Path(__file__).parent / ".cache" / "distill-student"),
        "model": {"name_or_path": str(path)},
        "stages": [{"name": "eval", "type": "eval", "dataset": {"path": "builtin:constraints", "split": "eval"}}],
    })  # fmt: skip
    tok = load_tokenizer(recipe, str(path))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = generate_task("constraints", "eval", config["rows"], seed=0)
    prompts = [r["prompt"] for r in rows]  # chat messages
    decode = []
    for _ in range(config["repeats"]):
        start = time.perf_counter()
        out = generation.generate(model, tok, prompts, max_new_tokens=config["tokens"], temperature=0.0)
        decode.append(time.perf_counter() - start)
    ids = torch.cat([out.prompt_ids, out.completion_ids], dim=1)
    forward = []
    with torch.no_grad():
        for _ in range(config["repeats"]):
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            forward.append(time.perf_counter() - start)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "bytes": sum(f.stat().st_size for f in Path(path).glob("*.safetensors")),
        "layers": model.config.num_hidden_layers,
        "decode_seconds": decode,
        "forward_seconds": forward,
        "tokens": int(out.completion_mask.sum()),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16, help="prompts decoded at once")
    ap.add_argument("--tokens", type=int, default=48, help="max new tokens")
    ap.add_argument("--repeats", type=int, default=2, help="decodes (and forwards) per child")
    ap.add_argument("--rounds", type=int, default=2, help="children per contender (order alternated)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    names = list(CONTENDERS)
    config = {k: getattr(args, k) for k in ("rows", "tokens", "repeats", "threads")}
    runs = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            res = run_child(Path(__file__).name, "measure", {**config, "kind": name}, threads=args.threads, tag=name)
            runs[name].append(res)
            print(f"{name}: decode {', '.join(f'{s:.1f}' for s in res['decode_seconds'])} s", flush=True)
    med = {
        n: {k: median([s for res in runs[n] for s in res[k]]) for k in ("decode_seconds", "forward_seconds")}
        for n in names
    }
    t, s = runs["teacher"][0], runs["student"][0]
    rows = [
        [n, runs[n][0]["layers"], runs[n][0]["params"] / 1e6, runs[n][0]["bytes"] / 1e6, med[n]["decode_seconds"],
         med[n]["forward_seconds"]]
        for n in names
    ]  # fmt: skip
    rows.append(
        ["student / teacher", s["layers"] / t["layers"], s["params"] / t["params"], s["bytes"] / t["bytes"],
         med["student"]["decode_seconds"] / med["teacher"]["decode_seconds"],
         med["student"]["forward_seconds"] / med["teacher"]["forward_seconds"]]
    )  # fmt: skip
    headers = ["model", "layers", "parameters (M)", "weights (MB)", "greedy decode s (median)", "forward s (median)"]
    md = table(headers, rows)
    print(md)
    path = write_result(
        "distill_student",
        {"table": md, "config": config, "runs": runs, "command": command_line(), "machine": machine(),
         "versions": versions()},
    )  # fmt: skip
    print(f"written to {path}")


if __name__ == "__main__":
    if not worker_main({"measure": _worker}):
        main()
