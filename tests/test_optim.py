"""Layer-wise learning-rate decay (alignlab/optim.py): every trainable parameter's group rate against the formula
lr x decay^(L + 1 - depth), with the depth read off the parameter's name by hand (embeddings 0, decoder layer i
(0-based) i + 1, the final norm and the head L + 1), on the tiny model and on SmolLM2-135M's shape (30 layers, a
head tied to the embeddings), full and LoRA; and the optimizer the trainer stages build from it."""

import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from alignlab.optim import layer_lr_groups

LR, DECAY = 1e-3, 0.9


def _depth_by_name(name: str, n_layers: int) -> int:
    if "embed_tokens" in name:
        return 0
    layer = re.search(r"\.layers\.(\d+)\.", name)
    return int(layer.group(1)) + 1 if layer else n_layers + 1


def _rates(model, groups) -> dict[str, float]:
    """{parameter name: its group's lr}, each trainable parameter in exactly one group."""
    where = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(where)  # no parameter twice
    return {n: where[id(p)] for n, p in model.named_parameters() if p.requires_grad}


def _check(model, n_layers: int, lr: float = LR, decay: float = DECAY) -> dict[str, float]:
    rates = _rates(model, layer_lr_groups(model, lr, decay))
    assert rates, "no trainable parameters"
    for name, rate in rates.items():
        assert rate == pytest.approx(lr * decay ** (n_layers + 1 - _depth_by_name(name, n_layers)), rel=1e-12), name
    return rates


def _smollm2_shape():
    """SmolLM2-135M's architecture (its config.json's sizes) on the meta device: no weights read or allocated."""
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_tiny_model_full_fine_tuning(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    rates = _check(model, 4)
    # the ends by hand: embeddings lr x 0.9^5, layer 0 x 0.9^4, the top layer x 0.9, the untied head the full lr
    assert rates["model.embed_tokens.weight"] == pytest.approx(LR * 0.59049)
    assert rates["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(LR * 0.6561)
    assert rates["model.layers.3.mlp.down_proj.weight"] == pytest.approx(LR * 0.9)
    assert rates["lm_head.weight"] == rates["model.norm.weight"] == LR


def test_tiny_model_lora_adapters_take_their_layers_rate(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    rates = _check(model, 4)
    assert all("lora_" in name for name in rates)  # the frozen base is in no group
    assert rates["base_model.model.model.layers.2.self_attn.v_proj.lora_B.default.weight"] == pytest.approx(LR * 0.9**2)


def test_smollm2_shape_30_layers_tied_head():
    model = _smollm2_shape()
    rates = _check(model, 30)
    assert len(set(rates.values())) == 32  # embeddings, 30 layers, the final norm: 32 distinct rates
    # the tied head is the embedding matrix (one tensor): it takes the embeddings' rate, lr x 0.9^31
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert rates["model.embed_tokens.weight"] == pytest.approx(LR * 0.9**31)
    assert rates["model.layers.29.self_attn.o_proj.weight"] == pytest.approx(LR * 0.9)


def test_smollm2_shape_lora():
    model = get_peft_model(_smollm2_shape(), LoraConfig(r=8, target_modules="all-linear"))
    rates = _check(model, 30, decay=0.5)
    assert len(rates) == 30 * 7 * 2  # q k v o gate up down, A and B, in each of 30 layers
    assert rates["base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"] == pytest.approx(LR * 0.5**30)


def test_weight_decay_splits_each_depth():
    model = _smollm2_shape()
    no_decay = {n for n, _ in model.named_parameters() if "norm" in n}
    groups = layer_lr_groups(model, LR, DECAY, weight_decay=0.1, no_decay=no_decay)
    for group in groups:
        names = {n for n, p in model.named_parameters() if any(p is q for q in group["params"])}
        assert group["weight_decay"] == (0.0 if names <= no_decay else 0.1) and (
            names <= no_decay or not names & no_decay
        )
        assert group["lr"] == pytest.approx(LR * DECAY ** (31 - group["layer"]))
    assert len(groups) == 1 + 30 * 2 + 1  # embeddings; each layer's matrices and its two norms; the final norm


def test_a_model_without_a_layer_stack_is_a_clear_error():
    with pytest.raises(ValueError, match="train.layer_lr_decay: cannot find the decoder layers of Linear"):
        layer_lr_groups(torch.nn.Linear(2, 2), LR, DECAY)


def _sft_trainer(model_path, tmp_path, decay):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from alignlab.stages.sft import GuardedSFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = Dataset.from_list([{"prompt": "1+1=", "completion": "2"}] * 4)
    args = SFTConfig(
        output_dir=str(tmp_path), learning_rate=LR, weight_decay=0.1, report_to="none", max_steps=1, bf16=False
    )
    trainer = GuardedSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.layer_lr_decay = decay
    return trainer


def test_trainer_stages_build_the_groups(tiny_model_path, tmp_path):
    """TRL's trainers (GuardedTrainer.create_optimizer): the same rates, transformers' weight-decay exemptions kept
    (norms take none), and the optimizer the recipe's `optim` names (AdamW)."""
    trainer = _sft_trainer(tiny_model_path, tmp_path, DECAY)
    optimizer = trainer.create_optimizer()
    assert type(optimizer).__name__ == "AdamW"
    rates = _rates(trainer.model, optimizer.param_groups)
    for name, rate in rates.items():
        assert rate == pytest.approx(LR * DECAY ** (5 - _depth_by_name(name, 4)), rel=1e-12), name
    for group in optimizer.param_groups:
        names = {n for n, p in trainer.model.named_parameters() if any(p is q for q in group["params"])}
        assert group["weight_decay"] == (0.0 if all("norm" in n for n in names) else 0.1), names
    # without the key: Trainer's own two groups at one rate
    plain = _sft_trainer(tiny_model_path, tmp_path / "plain", None).create_optimizer()
    assert {g["lr"] for g in plain.param_groups} == {LR} and len(plain.param_groups) == 2


@pytest.mark.slow
def test_sft_stage_resumes_with_its_layer_rates(tmp_path, monkeypatch):
    """An sft stage (LoRA) with layer_lr_decay: its checkpoints hold the groups (each depth's rate, scaled by the
    schedule alike), and a run cut off after checkpoint-2 and resumed ends with the uninterrupted run's adapter."""
    from safetensors.torch import load_file

    from alignlab.stages.sft import GuardedSFTTrainer
    from tests.helpers import make_recipe
    from tests.helpers import run as run_recipe

    def recipe(name):
        stage = {
            "name": "sft",
            "type": "sft",
            "dataset": {"path": "builtin:arith", "split": "sft", "size": 48, "eval_size": 8},
            "train": {"max_steps": 3, "per_device_batch_size": 8, "max_length": 48, "learning_rate": 3e-3,
                      "save_steps": 1, "save_total_limit": None, "layer_lr_decay": 0.5},
        }  # fmt: skip
        return make_recipe([stage], tmp_path / name, peft="lora")

    run_recipe(recipe("straight"))
    real_step = GuardedSFTTrainer.training_step

    def crashing_step(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise RuntimeError("simulated crash")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(GuardedSFTTrainer, "training_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(recipe("resumed"))
    calls = []

    def counted_step(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(GuardedSFTTrainer, "training_step", counted_step)
    run_recipe(recipe("resumed"), resume=True)
    assert calls == [2]  # only step 3 ran: the rest came from checkpoint-2

    groups = torch.load(tmp_path / "straight" / "sft" / "checkpoints" / "checkpoint-2" / "optimizer.pt")
    groups = groups["param_groups"]
    assert sorted({g["layer"] for g in groups}) == [1, 2, 3, 4]  # LoRA: adapters in the 4 layers only
    head = 3e-3 * groups[0]["lr"] / groups[0]["initial_lr"]  # the schedule's factor at step 2, times the full rate
    for g in groups:
        assert g["initial_lr"] == pytest.approx(3e-3 * 0.5 ** (5 - g["layer"]))
        assert g["lr"] == pytest.approx(head * 0.5 ** (5 - g["layer"]))
    a, b = (
        load_file(str(tmp_path / n / "sft" / "model" / "adapter_model.safetensors")) for n in ("straight", "resumed")
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
