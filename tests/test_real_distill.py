"""Distillation and layer-wise learning rates on the real built-in model, SmolLM2-135M-Instruct (30 layers, a head
tied to the embeddings):

- builtin:smollm2-135m-instruct-half is the model's even decoder layers (15), the same tensors, and the same
  tokenizer (so validate lets it learn from the whole model);
- a short offline distill stage (full fine-tuning of that student, the whole model as teacher, builtin:constraints
  demonstrations): the held-out KL(teacher || student) per token falls;
- an sft stage's optimizer (LoRA on the 30 layers) has each adapter at lr x decay^(31 - depth).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_recipe, steps
from tests.helpers import rows as _rows
from tests.helpers import run as _run

pytestmark = pytest.mark.real

MODEL, HALF = "builtin:smollm2-135m-instruct", "builtin:smollm2-135m-instruct-half"


def test_half_student_is_the_even_layers():
    from safetensors.torch import load_file

    from alignlab.builtin import builtin_model_path

    whole, half = (builtin_model_path(m.split(":", 1)[1]) for m in (MODEL, HALF))
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(half / "model.safetensors"))
    assert {k for k in b if ".layers." in k} == {k for k in a if ".layers." in k and int(k.split(".")[2]) < 15}
    for i in range(15):
        key = f"model.layers.{i}.self_attn.q_proj.weight"
        assert torch.equal(b[key], a[key.replace(f".{i}.", f".{2 * i}.")])
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_offline_distillation_into_the_half_student(tmp_path, write_recipe):
    from alignlab.validate import validate_recipe

    stage = {
        "name": "distill",
        "type": "distill",
        "teacher": MODEL,
        "dataset": {"path": "builtin:constraints", "split": "sft", "size": 16, "eval_size": 2},
        "train": {"max_steps": 3, "learning_rate": 2e-4, "logging_steps": 1},
        "rollout": {"batch_size": 2, "max_new_tokens": 24},
    }
    raw = make_recipe([stage], tmp_path / "run", model=HALF)
    validate_recipe(write_recipe(raw))  # one tokenizer: validate finds nothing to say
    _run(raw)
    final = next(r for r in _rows(tmp_path / "run" / "distill") if r.get("final"))
    rows = steps(tmp_path / "run" / "distill")
    assert final["first_eval_forward_kl"] > 5  # half the layers gone: the student starts far from its teacher
    assert final["eval_forward_kl"] < 0.9 * final["first_eval_forward_kl"], final  # measured: 11.5 -> 9.2
    assert rows[-1]["forward_kl"] < rows[0]["forward_kl"]


def test_sft_trainer_groups_on_30_layers(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from alignlab.builtin import builtin_model_path
    from alignlab.stages.sft import GuardedSFTTrainer

    path = builtin_model_path(MODEL.split(":", 1)[1])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=4, target_modules="all-linear"))
    args = SFTConfig(output_dir=str(tmp_path), learning_rate=1e-3, report_to="none", max_steps=1, bf16=False)
    data = Dataset.from_list([{"prompt": "Hi", "completion": "Hello."}] * 2)
    trainer = GuardedSFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(path)
    )
    trainer.layer_lr_decay = 0.9
    groups = trainer.create_optimizer().param_groups
    assert sorted(g["layer"] for g in groups) == list(range(1, 31))  # one group per layer: adapters only
    for g in groups:
        assert g["lr"] == pytest.approx(1e-3 * 0.9 ** (31 - g["layer"]))
        names = [n for n, p in model.named_parameters() if any(p is q for q in g["params"])]
        assert len(names) == 14 and all(f".layers.{g['layer'] - 1}." in n for n in names)  # 7 modules x (A, B)
