"""A TRL upgrade that removes a private name alignlab relies on fails here, with the name and why it matters,
instead of silently (an override TRL no longer calls) in the middle of a run."""

from __future__ import annotations

from alignlab.stages.trl_compat import PRIVATE_ATTRIBUTES, missing_private_names


def test_trl_private_names_exist():
    missing = missing_private_names()
    assert not missing, "the installed TRL/transformers lack private names alignlab uses: " + "; ".join(missing)


def test_private_instance_attributes_exist_on_a_built_trainer(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from alignlab.builtin import builtin_model_path
    from alignlab.models import load_tokenizer
    from alignlab.recipe import parse_recipe

    path = str(builtin_model_path("tiny-llama"))
    recipe = parse_recipe(
        {
            "name": "x",
            "model": {"name_or_path": path},
            "stages": [{"type": "eval", "dataset": {"path": "builtin:arith"}}],
        }
    )
    from transformers import AutoModelForCausalLM

    pairs = Dataset.from_list([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 2)
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", max_steps=1, use_cpu=True)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        args=args,
        train_dataset=pairs,
        processing_class=load_tokenizer(recipe, path),
    )
    missing = [f"{name} ({why})" for name, why in PRIVATE_ATTRIBUTES.items() if not hasattr(trainer, name)]
    assert not missing, "TRL's DPOTrainer lacks attributes alignlab uses: " + "; ".join(missing)
