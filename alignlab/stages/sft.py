"""SFT stage: supervised fine-tuning on TRL's SFTTrainer, full, LoRA or QLoRA.

    accelerate launch -m alignlab run recipes/quickstart.yaml --stage sft

Loss on the completion / assistant turns only (prompt tokens are masked) unless the recipe says
`completion_only_loss: false`; plain text trains on every token. `packing: true` packs short examples into
full-length rows. Reports eval loss and perplexity (exp of the mean token loss) on held-out data.
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from alignlab.contract import StageContext
from alignlab.data import build_datasets
from alignlab.models import load_stage_model, load_tokenizer
from alignlab.stages.common import GuardedTrainer, train_and_save, trainer_args


def run(ctx: StageContext):
    spec, recipe = ctx.spec, ctx.recipe

    # Inputs
    model, base = load_stage_model(recipe, ctx.input)
    tokenizer = load_tokenizer(recipe, base)
    chat = tokenizer.chat_template is not None
    train_ds, eval_ds = build_datasets(spec.dataset, recipe, "sft", chat)

    # Trainer
    args = trainer_args(
        SFTConfig,
        ctx,
        spec.train,
        has_eval=eval_ds is not None,
        packing=spec.packing,
        completion_only_loss=spec.completion_only_loss,
        # Chat data in `messages` form: loss on assistant turns, from the template's generation markers.
        assistant_only_loss=spec.completion_only_loss and "messages" in train_ds.column_names,
        dataset_num_proc=None,
    )
    trainer = GuardedSFTTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer
    )

    # Train, save, report
    return train_and_save(trainer, ctx, base=base)


class GuardedSFTTrainer(GuardedTrainer, SFTTrainer):
    """TRL's SFTTrainer with atomic checkpoints and a stop on nan/inf losses (alignlab.stages.common)."""
