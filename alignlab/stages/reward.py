"""Reward stage: a Bradley-Terry reward model (sequence-classification head, one scalar per sequence) trained on
preference pairs, on TRL's RewardTrainer, full, LoRA or QLoRA.

    accelerate launch -m alignlab run recipes/sft_reward_ppo.yaml --stage reward

Loss (alignlab.losses.bradley_terry_loss): -mean log sigma(r_c - r_r - m) + eta mean (r_c + r_r)^2, with the
per-pair margin m read from a `margin` column when the data has one, and eta = `center_coef` (off by default).
The reward is read on the last non-padding token of prompt + completion (chat-templated when the tokenizer has a
template, so the sequence ends with the template's end-of-turn text). Reports held-out accuracy (mean [r_c > r_r], a tie
counting 1/2) as `eval_accuracy`.

Starting point: the input model (e.g. the SFT model) or the base, with a fresh score head. After a LoRA SFT stage
the SFT adapter is merged first and a fresh LoRA (task SEQ_CLS: the score head is trained in full through
modules_to_save) goes on top. Output: full weights loadable with AutoModelForSequenceClassification, or a PEFT
adapter over `base` (load the base with AutoModelForSequenceClassification(num_labels=1), then PeftModel).
"""

from __future__ import annotations

import dataclasses

from transformers import set_seed
from trl import RewardConfig, RewardTrainer

from alignlab.contract import StageContext
from alignlab.data import build_datasets
from alignlab.losses import bradley_terry_loss
from alignlab.models import check_target_modules, load_stage_model, load_tokenizer, save_model_atomic
from alignlab.rewards import load_reward_model
from alignlab.stages.trl_compat import log_metric
from alignlab.stages.trl_glue import GuardedTrainer, train_and_save, trainer_args


def run(ctx: StageContext):
    spec, recipe = ctx.spec, ctx.recipe

    # Inputs. The score head is initialised randomly: seed first so that a run is reproducible.
    set_seed(recipe.seed)
    model, base = load_stage_model(recipe, ctx.input, head="sequence_classification")
    check_target_modules(recipe, model)
    tokenizer = load_tokenizer(recipe, base)
    train_ds, eval_ds = build_datasets(spec.dataset, recipe, "reward", tokenizer.chat_template is not None)

    # Trainer
    args = trainer_args(RewardConfig, ctx, spec.train, has_eval=eval_ds is not None, disable_dropout=True)
    trainer = BradleyTerryRewardTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        center_coef=spec.center_coef,
    )

    # Train, save, report. Merging is done here: models.merge_adapter reloads the base with the default
    # 2-label head, which cannot take a reward model's 1-label score head.
    out = train_and_save(
        trainer,
        dataclasses.replace(ctx, spec=spec.model_copy(update={"merge": False})),
        head="sequence_classification",
        base=base,
    )
    if spec.merge and out.kind == "adapter":
        if trainer.is_world_process_zero():
            merged, tok = load_reward_model(recipe, out, quantize=False)
            save_model_atomic(merged.merge_and_unload(), tok, ctx.stage_dir / "merged")
        trainer.accelerator.wait_for_everyone()
        out.merged_path = str(ctx.stage_dir / "merged")
    return out


class BradleyTerryRewardTrainer(GuardedTrainer, RewardTrainer):
    """RewardTrainer whose loss is alignlab's `bradley_terry_loss`; only `compute_loss` differs from TRL.
    Batch rows are [chosen; rejected] (TRL's DataCollatorForPreference); `margin` is [B] when present."""

    def __init__(self, *args, center_coef: float | None = None, **kwargs):
        self.center_coef = center_coef
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        margin = inputs.pop("margin", None)
        outputs = model(**inputs, use_cache=False)
        chosen, rejected = outputs.logits.squeeze(-1).chunk(2)  # [2B, 1] -> [B], [B]
        loss, metrics = bradley_terry_loss(chosen, rejected, margin=margin, center_coef=self.center_coef)
        for key, value in metrics.items():  # logged as accuracy, margin, ... (eval_accuracy, ... in evaluation)
            log_metric(self, mode, key, self.accelerator.gather(value.reshape(1)).mean().item())
        return (loss, outputs) if return_outputs else loss
