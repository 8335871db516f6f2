"""Base rate of SmolLM2-135M-Instruct on `builtin:constraints`: does the task's reward have signal for it?

Greedy decoding, `--max-new-tokens` (64) new tokens, the model's own chat template (ChatML, with its default
system prompt), on the first `--n` (40) prompts of the fixed eval split; scores from
`alignlab.builtin.constraints.constraint_report`. Prints a Markdown table and writes
bench/results/constraints_base_rate.json (the report, every prompt/completion/reward, the command, the machine).

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python bench/constraints_base_rate.py   # --gguf FILE: another GGUF

The GGUF file is dequantized to float32 by transformers, so this is the Q4_1 model's weights in fp32, not the
original bf16 checkpoint (differences in greedy outputs are possible). ~2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from alignlab.builtin.constraints import constraint_report, constraints_reward  # noqa: E402
from alignlab.builtin.tasks import generate_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", help="a SmolLM2 GGUF file (default: builtin:smollm2-135m-instruct's, fetched once)")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "constraints_base_rate.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.gguf:
        gguf = Path(args.gguf)
    else:
        from alignlab.builtin.pretrained import fetch_gguf

        gguf = fetch_gguf("smollm2-135m-instruct")

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    tok.padding_side = "left"  # decoder-only batch generation: pad on the left so every prompt ends at the same place
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    rows = generate_task("constraints", "eval", args.n)
    prompts = [r["prompt"][0]["content"] for r in rows]
    completions: list[str] = []
    t0 = time.perf_counter()
    for i in range(0, len(rows), args.batch):
        texts = [
            tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
            for r in rows[i : i + args.batch]
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc, do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id
            )
        completions += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    gen_s = time.perf_counter() - t0

    report = constraint_report(prompts, completions)
    rewards = constraints_reward(prompts, completions)
    lines = [
        f"SmolLM2-135M-Instruct ({gguf.name}, fp32), {args.n} eval prompts, greedy, {args.max_new_tokens} new tokens",
        "",
        "| kind | constraints | satisfied |",
        "|---|---|---|",
    ]
    for kind, v in report["per_kind"].items():
        lines.append(f"| `{kind}` | {v['n']} | {v['accuracy']:.2f} |")
    lines += [
        "",
        f"strict accuracy {report['strict_accuracy']:.3f}, instruction accuracy {report['instruction_accuracy']:.3f}, "
        f"mean reward {report['mean_reward']:.3f}; load {load_s:.0f} s, generation {gen_s:.0f} s",
    ]
    print("\n".join(lines))
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "machine": platform.platform(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "args": vars(args),
        "report": report,
        "table": "\n".join(lines),
        "load_s": load_s,
        "generate_s": gen_s,
        "samples": [
            {"prompt": p, "completion": c, "reward": r, "kinds": row["kinds"]}
            for p, c, r, row in zip(prompts, completions, rewards, rows)
        ],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
