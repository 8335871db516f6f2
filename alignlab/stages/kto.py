"""KTO stage: Kahneman-Tversky optimisation (Ethayarajh et al. 2024, arXiv 2402.01306) on unpaired binary feedback
(prompt, completion, label: desirable or not), on TRL's KTOTrainer (stable in TRL 1.16).

    accelerate launch -m alignlab run recipes/sft_kto_lora.yaml --stage kto

For each example, with r = log pi(y|x) - log pi_ref(y|x) and z_ref = max(0, KL estimate), detached:
    desirable:    lambda_D (1 - sigma(beta (r - z_ref)))
    undesirable:  lambda_U (1 - sigma(beta (z_ref - r)))
averaged over the batch (TRL's kto loss, eq. 7 of the paper; docs/algorithms.md, "KTO"). The KL estimate is the
batch mean of log pi(y'|x) - log pi_ref(y'|x) over mismatched pairs: TRL pairs each prompt with the previous row's
completion within a batch, hence sequential sampling (KTOConfig's default) and at least 2 rows per device batch
(checked by the recipe). At the start policy = reference, so every term is 1 - sigma(0) = 1/2 (with unit weights).

TRL does the tokenisation, batching, KL pairs, loss and logging; alignlab adds its checkpoints and nan/inf stop
(GuardedTrainer) and the hand-off: the reference is the stage's INPUT model, frozen. After a LoRA/QLoRA SFT stage
the policy continues the SFT adapter and TRL keeps a frozen copy of it as adapter "ref" on the same backbone; after
full fine-tuning TRL loads a second copy of the input weights. Both as in the dpo stage.
"""

from __future__ import annotations

from trl import KTOConfig, KTOTrainer

from alignlab.contract import StageContext
from alignlab.data import build_datasets
from alignlab.models import load_stage_model, load_tokenizer
from alignlab.stages.trl_glue import GuardedTrainer, train_and_save, trainer_args


def run(ctx: StageContext):
    spec, recipe = ctx.spec, ctx.recipe

    # Inputs
    model, base = load_stage_model(recipe, ctx.input)
    tokenizer = load_tokenizer(recipe, base)
    train_ds, eval_ds = build_datasets(spec.dataset, recipe, spec.type, tokenizer.chat_template is not None)

    # Trainer
    args = trainer_args(
        KTOConfig,
        ctx,
        spec.train,
        has_eval=eval_ds is not None,
        beta=spec.beta,
        desirable_weight=spec.desirable_weight,
        undesirable_weight=spec.undesirable_weight,
    )
    trainer = GuardedKTOTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer
    )

    # Train, save, report
    return train_and_save(trainer, ctx, base=base)


class GuardedKTOTrainer(GuardedTrainer, KTOTrainer):
    """TRL's KTOTrainer with alignlab's atomic checkpoints and nan/inf stop; nothing else differs."""
