"""PEFT builders: LoRA, DoRA, rsLoRA and QLoRA (4-bit NF4 on CPU) adapters saved and reloaded through the
stage hand-off give identical logits; merging gives the adapter's logits; QLoRA gradients are the same after an eval-mode
pass; bad target modules are named."""

import pytest
import torch

from alignlab.contract import StageOutput
from alignlab.models import load_stage_model, load_tokenizer, merge_adapter, save_model_atomic
from alignlab.recipe import parse_recipe
from tests.helpers import lora, make_recipe


def _recipe(tiny_model_path, **peft):
    stages = [{"type": "sft", "dataset": {"path": "builtin:arith", "split": "sft"}}]
    return parse_recipe(
        make_recipe(
            stages, name="p", seed=None, model=tiny_model_path, peft={"r": 4, "alpha": 8, "dropout": 0.0, **peft}
        )
    )


def _perturb(model):
    """Move the adapter off its zero init so that a reload that dropped it would be visible."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 11, 2]])


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize(
    "peft",
    [
        {"method": "lora"},
        {"method": "dora"},
        {"method": "lora", "use_rslora": True},
        {"method": "lora", "target_modules": ["q_proj", "v_proj"]},
        {"method": "qlora", "quantization": {"compute_dtype": "float32"}},
    ],
    ids=["lora", "dora", "rslora", "lora-qv", "qlora-nf4"],
)
def test_adapter_save_reload_identical_logits(tmp_path, tiny_model_path, peft):
    recipe = _recipe(tiny_model_path, **peft)
    model, base = load_stage_model(recipe, None)
    _perturb(model)
    before = _logits(model)
    save_model_atomic(model, load_tokenizer(recipe, base), tmp_path / "model")
    assert (tmp_path / "model" / "adapter_model.safetensors").exists()
    out = StageOutput(stage="s", type="sft", path=str(tmp_path / "model"), kind="adapter", base=base)
    reloaded, _ = load_stage_model(recipe, out)
    assert torch.equal(_logits(reloaded), before)
    if peft["method"] == "qlora":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in reloaded.modules())
        assert all(p.dtype == torch.uint8 for n, p in reloaded.named_parameters() if "q_proj.base_layer" in n)


def test_qlora_trains_on_cpu(tiny_model_path):
    recipe = _recipe(tiny_model_path, method="qlora", quantization={"compute_dtype": "float32"})
    model, _ = load_stage_model(recipe, None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_qlora_gradients_survive_an_eval_forward(tiny_model_path):
    """bitsandbytes' CPU backend repacks a Linear4bit's weights the first time it runs in eval mode without grad
    (an inference layout whose kernel has no backward, absmax in bf16). PPO's rollouts and every mid-training
    evaluation run such forwards; afterwards no gradient would flow through the quantized layers and the outputs
    would shift. The builder turns the repacking off: gradients and logits after an eval pass equal those before."""
    recipe = _recipe(tiny_model_path, method="qlora", quantization={"compute_dtype": "float32"})
    model, _ = load_stage_model(recipe, None)
    _perturb(model)

    def grads():
        model.train()
        model.zero_grad()
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    logits, before = grads()
    _logits(model)  # eval mode, no grad: where the repacking would happen
    logits_after, after = grads()
    assert torch.equal(logits_after, logits)
    assert before.keys() == after.keys() and len(before) > 0
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
    # The first layer's adapter gets its gradient through the quantized layers above it, not just the residual path.
    assert before[next(n for n in before if "layers.0.self_attn.q_proj.lora_A" in n)].abs().sum() > 0


def test_merge_matches_adapter(tmp_path, tiny_model_path):
    from transformers import AutoModelForCausalLM

    recipe = _recipe(tiny_model_path, method="lora")
    model, base = load_stage_model(recipe, None)
    _perturb(model)
    expected = _logits(model)
    save_model_atomic(model, None, tmp_path / "model")
    out = StageOutput(stage="s", type="sft", path=str(tmp_path / "model"), kind="adapter", base=base)
    merged_dir = merge_adapter(recipe, out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(_logits(merged), expected, atol=1e-4, rtol=1e-4)


def test_missing_target_module_lists_the_real_ones(tiny_model_path):
    from alignlab.models import check_target_modules

    recipe = _recipe(tiny_model_path, method="lora", target_modules=["q_proj", "query_key_value"])
    with pytest.raises(ValueError, match=r"query_key_value not found in the model; its linear modules are .*q_proj"):
        # Checked on the plain model, before PEFT wraps it (PEFT's own error is less helpful).
        from transformers import AutoModelForCausalLM

        check_target_modules(recipe, AutoModelForCausalLM.from_pretrained(tiny_model_path))


@pytest.mark.slow
def test_qlora_stages_keep_float32_adapters(write_recipe, tmp_path):
    """TRL's trainers cast a quantized model's trainable weights to bf16 (after taking DPO's "ref" copy of the SFT
    adapter in float32). alignlab puts the float32 weights back (alignlab.stages.trl_glue.keep_trainable_float32), so:
    the DPO policy continuing the SFT adapter equals its reference at step 1 (loss exactly ln 2: h = 0 for every
    pair, which a bf16-rounded policy is not), the saved adapters are float32, and the reward model's trainable
    score head meets float32 hidden states (in bf16 the run fails: "expected m1 and m2 to have the same dtype")."""
    import json
    import math

    from safetensors.torch import load_file

    from alignlab.cli import main

    train = {"max_steps": 2, "per_device_batch_size": 4, "learning_rate": 1e-2, "max_length": 48, "logging_steps": 1}
    data = {"path": "builtin:arith", "size": 8, "eval_size": 4}
    stages = [
        {"name": "sft", "type": "sft", "dataset": {**data, "split": "sft"}, "train": train},
        {"name": "dpo", "type": "dpo", "dataset": {**data, "split": "preference"}, "train": train},
        {"name": "rm", "type": "reward", "input": "base", "dataset": {**data, "split": "preference"}, "train": train},
    ]
    qlora = lora(r=4, alpha=8, dropout=0.0, method="qlora", quantization={"compute_dtype": "float32"})
    recipe = make_recipe(stages, name="qlora-stages", peft=qlora)
    assert main(["run", str(write_recipe(recipe))]) == 0
    run = tmp_path / "run"
    first = json.loads((run / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["rewards/margins"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6, abs=0)
    for stage in ("sft", "dpo", "rm"):
        tensors = load_file(run / stage / "model" / "adapter_model.safetensors")
        assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}, stage
    assert "eval_accuracy" in json.loads((run / "rm" / "stage_output.json").read_text())["metrics"]
