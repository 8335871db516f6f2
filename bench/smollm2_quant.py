"""What Q4_1 costs SmolLM2-135M-Instruct, measured offline: the numbers of data_cards/smollm2-135m-instruct.md.

    python bench/smollm2_quant.py            # ~2 minutes on 2 CPU cores; fetches builtin:smollm2-135m-instruct

The unquantized original (bf16 on the hub) is not reachable offline, so its NLL cannot be compared directly.
What can be measured:

1. the NLL (nats/token) of the shipped model (the GGUF's dequantized weights) on a fixed text, given below;
2. the rounding step of every quantization block, read off the dequantized weights: a Q4_1 block of 32 weights is
   `d * q + m` with q in 0..15, and llama.cpp's quantizer maps the block's min to q=0 and its max to q=15, so
   d = (max - min) / 15 (checked: (w - min) / d lands on integers); a Q8_0 block is `d * q` with d = max|w| / 127.
   With rounding errors uniform in [-d/2, d/2], the expected error is d / sqrt(12) per weight: an estimate of the
   weight error relative to the (unknown) original;
3. a second error of the same size: add U(-d/2, d/2) noise to every quantized weight (3 seeds) and measure the NLL
   again. Its increase estimates what the first rounding cost (errors this small act roughly additively), an
   estimate, not a measurement of original-vs-Q4_1;
4. greedy decoding speed of the float32 model on this CPU.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEXT = (
    "The river starts in the mountains as a small stream of melted snow. Over hundreds of kilometres it collects "
    "water from smaller rivers, grows wide and slow, and finally reaches the sea through a large delta. Farmers "
    "have used its water for thousands of years, and the first towns along its banks were built where the land "
    "was flat and the soil was rich. Today the river is also used for transport: long boats carry grain, coal "
    "and wood to the port, where the goods are loaded onto ships. In spring, when the snow melts quickly, the "
    "water can rise by several metres in a few days, so the towns have built walls and channels to protect their "
    "streets. Scientists measure the height of the water every hour and publish warnings when a flood is likely. "
    "The delta itself is home to many birds, fish and plants, and a part of it has been protected as a national "
    "park since 1970. Visitors can walk along wooden paths, watch the birds from small towers, or take a boat "
    "trip through the narrow channels between the reeds."
)
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 + 30?",
    "Write one sentence about the sea.",
]


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.builtin import builtin_model_path
    from alignlab.builtin.pretrained import fetch_gguf

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    path = builtin_model_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok(TEXT, return_tensors="pt").input_ids  # [1, T]

    def nll() -> float:
        with torch.no_grad():
            return model(ids, labels=ids).loss.item()

    base = nll()
    quantized = _quantized_tensors(model, fetch_gguf("smollm2-135m-instruct"))
    steps, errors = {}, {}
    for name, (kind, w) in quantized.items():
        steps[name] = _block_steps(kind, w.detach())
        rel = (steps[name].square().mean().sqrt() / math.sqrt(12)) / w.detach().square().mean().sqrt()
        errors.setdefault(kind, []).append((w.numel(), rel.item()))
    rel_err = {k: sum(n * e for n, e in v) / sum(n for n, _ in v) for k, v in errors.items()}

    noisy = []
    originals = {name: w.detach().clone() for name, (_, w) in quantized.items()}
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, (_, w) in quantized.items():
                d = steps[name].repeat_interleave(32, dim=-1).view_as(w)
                w.copy_(originals[name] + (torch.rand(w.shape, generator=gen) - 0.5) * d)
        noisy.append(nll())
    with torch.no_grad():
        for name, (_, w) in quantized.items():
            w.copy_(originals[name])

    answers, speed = {}, []
    for prompt in PROMPTS:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        start = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
        new = out.shape[1] - enc["input_ids"].shape[1]
        speed.append(new / (time.perf_counter() - start))
        answers[prompt] = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    result = {
        "text_tokens": ids.shape[1],
        "nll_nats_per_token": round(base, 4),
        "perplexity": round(math.exp(base), 2),
        "estimated_relative_weight_error": {k: round(v, 4) for k, v in rel_err.items()},
        "nll_with_a_second_rounding_error": [round(x, 4) for x in noisy],
        "nll_increase_mean": round(sum(noisy) / len(noisy) - base, 4),
        "greedy_tokens_per_s": round(sorted(speed)[len(speed) // 2], 1),
        "answers": answers,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    out = Path(__file__).resolve().parent / "results" / "smollm2_quant.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _quantized_tensors(model, gguf_path) -> dict:
    """{hf parameter name: (ggml type name, parameter)} for the GGUF's quantized tensors (Q4_1 linears, the Q8_0
    token embedding, which is also the tied output head). Norms are F32 in the file: exact, not listed."""
    from gguf import GGUFReader

    kinds = {}
    for t in GGUFReader(str(gguf_path)).tensors:
        kinds[t.name] = t.tensor_type.name
    mapping = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }  # fmt: skip
    params = dict(model.named_parameters())
    out = {"model.embed_tokens.weight": (kinds["token_embd.weight"], params["model.embed_tokens.weight"])}
    for name, kind in kinds.items():
        if name.startswith("blk.") and kind != "F32":
            _, layer, part, _ = name.split(".")
            out[f"model.layers.{layer}.{mapping[part]}.weight"] = (
                kind,
                params[f"model.layers.{layer}.{mapping[part]}.weight"],
            )
    return out


def _block_steps(kind: str, w):
    """Rounding step d of every 32-weight block, [rows, cols / 32]. Blocks run along the input dimension (a GGUF
    row), which is a row of the [out, in] weight; transformers' q/k un-permutation moves whole rows only."""
    blocks = w.reshape(w.shape[0], -1, 32)
    if kind == "Q4_1":
        lo, hi = blocks.amin(-1), blocks.amax(-1)
        d = (hi - lo) / 15
        q = (blocks - lo[..., None]) / d.clamp_min(1e-12)[..., None]
        assert (q - q.round()).abs().max() < 1e-2, "not a Q4_1 grid"
        return d
    if kind == "Q8_0":
        d = blocks.abs().amax(-1) / 127
        q = blocks / d.clamp_min(1e-12)[..., None]
        assert (q - q.round()).abs().max() < 1e-2, "not a Q8_0 grid"
        return d
    raise ValueError(f"no rounding model for {kind}")


if __name__ == "__main__":
    main()
