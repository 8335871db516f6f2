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


def test_without_reference_builds_no_reference(tmp_path, monkeypatch):
    """TRL 1.16's DPOTrainer has no reference-free mode: with ref_model=None it loads a second model (full
    fine-tuning) or copies the adapter as frozen adapter "ref" (a PeftModel). `ref_model=NO_REFERENCE` on a trainer
    with the WithoutReference mixin builds neither, prepares nothing, and leaves trainer.ref_model None."""
    import trl.trainer.dpo_trainer as dpo_module
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from alignlab.builtin import builtin_model_path
    from alignlab.stages.trl_compat import NO_REFERENCE, WithoutReference

    class Trainer(WithoutReference, DPOTrainer):
        pass

    loads = []
    real_create = dpo_module.create_model_from_path
    monkeypatch.setattr(dpo_module, "create_model_from_path", lambda *a, **k: loads.append(a) or real_create(*a, **k))
    path = str(builtin_model_path("tiny-llama"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    pairs = Dataset.from_list([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 2)
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", max_steps=1, use_cpu=True)

    def build(peft: bool, ref_model):
        model = AutoModelForCausalLM.from_pretrained(path)
        if peft:
            model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        trainer = Trainer(model=model, ref_model=ref_model, args=args, train_dataset=pairs, processing_class=tokenizer)
        return trainer, getattr(model, "peft_config", {})

    trainer, _ = build(peft=False, ref_model=NO_REFERENCE)
    assert trainer.ref_model is None and loads == []
    trainer, adapters = build(peft=True, ref_model=NO_REFERENCE)
    assert trainer.ref_model is None and set(adapters) == {"default"}
    # What TRL does without the sentinel (why the mixin exists): a second model, a frozen adapter copy.
    trainer, _ = build(peft=False, ref_model=None)
    assert trainer.ref_model is not None and len(loads) == 1
    trainer, adapters = build(peft=True, ref_model=None)
    assert set(adapters) == {"default", "ref"}
