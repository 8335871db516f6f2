"""`alignlab plan`: memory per GPU from the model's config alone. The counts equal the model's own (meta device vs
loaded weights, PEFT's trainable parameters); the parts equal the documented formulas, computed here by hand; the
verdict picks the cheapest engine that fits; bad arguments and unreadable configs give clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignlab.cli import main
from alignlab.plan import GB, estimate, model_shape, parse_memory
from alignlab.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bench" / "configs"


def _recipe(peft="none", **stage):
    p = {"method": peft} if peft == "none" else {"method": peft, "r": 8, "alpha": 16, "target_modules": "all-linear"}
    stage = {"name": "s", "type": "sft", "dataset": {"path": "builtin:arith", "split": "sft"}, **stage}
    return parse_recipe({"name": "p", "model": {"name_or_path": "builtin:tiny-llama"}, "peft": p, "stages": [stage]})


def test_counts_from_the_config_equal_the_models(tiny_model_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from alignlab.models import lora_config

    recipe = _recipe("lora")
    shape = model_shape(recipe, tiny_model_path, 8)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.layers == model.config.num_hidden_layers and shape.vocab == model.config.vocab_size
    assert shape.largest_layer == sum(p.numel() for p in model.model.layers[0].parameters())
    peft_model = get_peft_model(model, lora_config(recipe))
    assert shape.lora[8] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_parts_are_the_documented_formulas(tiny_model_path):
    recipe = _recipe(train={"per_device_batch_size": 2, "max_length": 16})
    shape = model_shape(recipe, tiny_model_path, 8)
    p, h, i, v = shape.params, shape.hidden, shape.intermediate, shape.vocab
    one, two = (estimate(recipe, recipe.stages[0], shape, n, 0, device="cpu") for n in (1, 2))
    assert one.parts["weights"] == one.parts["gradients"] == 4 * p and one.parts["optimizer"] == 8 * p
    assert one.parts["ddp buckets"] == 0 and two.parts["ddp buckets"] == 4 * p  # DDP's buckets: 2 processes
    rows, length = 2, 16  # eager attention on CPU: heads x length^2 per row and layer; float32 activations
    per_layer = rows * length * (10 * h + 4 * i) + rows * shape.heads * length * length
    logits = 2 * rows * length * v * 4
    assert one.parts["activations"] == shape.layers * per_layer * 4 + logits
    assert one.engines["DDP"] == sum(one.parts.values())
    unit = 2 * shape.largest_layer * 4
    assert two.engines["FSDP2"] == pytest.approx(16 * p / 2 + unit + one.parts["activations"])
    assert two.engines["FSDP2 + CPU offload"] == pytest.approx(unit + one.parts["activations"])
    checkpointed = _recipe(train={"per_device_batch_size": 2, "max_length": 16})
    checkpointed.model.gradient_checkpointing = True
    act = estimate(checkpointed, checkpointed.stages[0], shape, 1, 0, device="cpu").parts["activations"]
    assert act == (shape.layers * rows * length * h + per_layer) * 4 + logits


def test_reference_and_sampling_follow_the_stage(tiny_model_path):
    grpo = {"type": "grpo", "reward_fn": "builtin:arith", "watch_steps": None,
            "rollout": {"batch_size": 2, "num_samples": 4, "max_new_tokens": 8}}  # fmt: skip
    full = _recipe(**grpo, beta=0.1)
    shape = model_shape(full, tiny_model_path, 8)
    est = estimate(full, full.stages[0], shape, 2, 24, device="cpu")
    assert est.parts["reference"] == est.parts["weights"]  # full fine-tuning: a frozen copy
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * 8 * (24 + 8) * 4
    assert est.parts["kv cache"] == kv
    # FSDP2 gathers every weight for sampling (gather: once)
    assert est.engines["FSDP2"] > est.parts["weights"] * (1 - 1 / 2)
    lora = _recipe("lora", **grpo, beta=0.1)
    assert estimate(lora, lora.stages[0], shape, 2, 24, device="cpu").parts["reference"] == 0  # the same backbone
    no_kl = _recipe(**grpo, beta=0.0)
    assert estimate(no_kl, no_kl.stages[0], shape, 2, 24, device="cpu").parts["reference"] == 0


def test_cli_prints_the_plan_and_picks_the_cheapest_engine(capsys):
    recipe = ROOT / "recipes" / "examples" / "qwen2.5-0.5b-instruct-sft-dpo-lora.yaml"
    args = ["plan", str(recipe), "--gpus", "8", "--config", str(CONFIGS / "llama-3.1-70b.json")]
    assert main([*args, "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "70.55B parameters (80 layers)" in out and "| sft | sft |" in out
    assert "| FSDP2 |" in out  # a 70B LoRA run does not fit in DDP on 80 GB GPUs: 140 GB of bf16 weights each
    assert main([*args, "--gpu-memory", "1GB"]) == 0
    assert "does not fit: try peft.method: qlora" in capsys.readouterr().out


def test_bad_arguments_and_unreadable_configs_are_clear_errors(tmp_path, capsys):
    recipe = ROOT / "recipes" / "examples" / "qwen2.5-0.5b-instruct-sft-dpo-lora.yaml"
    assert main(["plan", str(recipe), "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory: expected a size such as 80GB or 24GiB, got 'lots'" in capsys.readouterr().err
    assert main(["plan", str(recipe), "--gpus", "0"]) == 2
    assert "--gpus: expected a positive number" in capsys.readouterr().err
    assert main(["plan", str(recipe)]) == 2  # a hub id, offline, not in the cache
    err = capsys.readouterr().err
    assert "reads the model's config.json" in err and "--config FILE" in err
    assert parse_memory("80GB") == 80 * GB and parse_memory("24GiB") == 24 * 2**30 and parse_memory("40") == 40 * GB
