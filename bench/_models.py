"""Models the benches train, saved locally (no download): the builtin tiny model, or a Llama built from a config
preset with the builtin tokenizer (random init: throughput and memory do not depend on the weights' values),
plus a reward model on the same backbone (sequence-classification head, one label). Main environment only.

    python bench/_models.py llama-100m      # build it (cached in bench/.cache/models/), print the paths

`smollm2` is the real `builtin:smollm2-135m-instruct` (fetched once, its own tokenizer and chat template);
`smollm2-random` is the same architecture and tokenizer, randomly initialised, for machines without its weights
(a GPU machine that cannot fetch them): it needs only the config and tokenizer files, taken from the builtin's
cache or from the folder $BENCH_SMOLLM2_CONFIG.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from _common import CACHE

# Llama shapes, builtin byte-level BPE tokenizer (747 tokens). Parameter counts include embeddings and lm_head.
PRESETS: dict[str, dict] = {
    "tiny": {},  # builtin:tiny-llama, pretrained by alignlab (~3.1M)
    "llama-20m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8),
    "llama-50m": dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=10, num_attention_heads=10),
    "llama-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=12),
    "llama-350m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16),
    "smollm2": {},  # builtin:smollm2-135m-instruct, the real weights (134.5M, vocabulary 49152, tied embeddings)
    "smollm2-random": {},  # its config and tokenizer, random init
}


def ensure(name: str) -> dict:
    """{"policy": dir, "reward": dir, "params": N, "config": {...}}, building what is missing."""
    if name not in PRESETS:
        raise SystemExit(f"unknown model {name!r}; presets: {', '.join(PRESETS)}")
    from alignlab.builtin import builtin_model_path

    tiny = builtin_model_path("tiny-llama")
    if name == "tiny":
        policy = tiny
    elif name == "smollm2":
        policy = builtin_model_path("smollm2-135m-instruct")
    else:
        policy = CACHE / "models" / name
        if not (policy / ".complete").exists():
            if name == "smollm2-random":
                _build_from_config(_smollm2_config_dir(), policy)
            else:
                _build_causal_lm(name, tiny, policy)
    reward = CACHE / "models" / f"{name}-rm"
    if not (reward / ".complete").exists():
        _build_reward_model(policy, reward)
    config = json.loads((Path(policy) / "config.json").read_text())
    return {"name": name, "policy": str(policy), "reward": str(reward), "params": _count(config), "config": config}


def _count(c: dict) -> int:
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h * c.get("num_key_value_heads", c["num_attention_heads"]) // c["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o, k, v, mlp, 2 norms
    return n * per_layer + v * h * (1 if c.get("tie_word_embeddings") else 2) + h


def _build_causal_lm(name: str, tokenizer_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.model_max_length = 4096
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlamaConfig(
        vocab_size=len(tok), max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
        **PRESETS[name], **ids,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    _save(model, tok, out)


def _smollm2_config_dir() -> Path:
    """A folder with SmolLM2's config.json and tokenizer files: $BENCH_SMOLLM2_CONFIG, else the builtin's cache."""
    if os.environ.get("BENCH_SMOLLM2_CONFIG"):
        return Path(os.environ["BENCH_SMOLLM2_CONFIG"])
    from alignlab.builtin.models import built_model_path

    found = built_model_path("smollm2-135m-instruct")
    if found is None:
        raise SystemExit(
            "smollm2-random needs SmolLM2's config and tokenizer: run `alignlab builtin smollm2-135m-instruct` once, "
            "or point $BENCH_SMOLLM2_CONFIG at a folder holding its config.json, tokenizer*.json, "
            "chat_template.jinja and generation_config.json"
        )
    return found


def _build_from_config(source: Path, out: Path) -> None:
    """A causal LM with `source`'s config and tokenizer and random weights (seeded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(source)
    config = AutoConfig.from_pretrained(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig.from_pretrained(source)
    _save(model, tok, out)


def _build_reward_model(policy: Path, out: Path) -> None:
    """The policy's backbone with a fresh 1-label score head (seeded), as a reward stage would start."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    _save(model, tok, out)


def _save(model, tok, out: Path) -> None:
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / ".complete").write_text("")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def prepare_worker(config: dict) -> dict:
    """Worker form (run as a child by the benches): build the models, return their paths."""
    out = ensure(config["model"])
    if config.get("prompts"):
        out["prompts"] = arith_prompts(config["prompts"])
    return out


def arith_prompts(n: int, seed: int = 0) -> list:
    """The prompts of alignlab's ppo stage in the benches: builtin:arith, split sft (chat messages)."""
    from alignlab.builtin.tasks import generate_task

    rows = generate_task("arith", "sft", n, seed=seed)
    return [r["prompt"] for r in rows]


if __name__ == "__main__":
    from _common import worker_main

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if not worker_main({"prepare": prepare_worker}):
        print(
            json.dumps({k: v for k, v in ensure(sys.argv[1] if len(sys.argv) > 1 else "tiny").items() if k != "config"})
        )
