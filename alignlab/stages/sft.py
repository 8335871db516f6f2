"""SFT stage: supervised fine-tuning on TRL's SFTTrainer, full, LoRA or QLoRA.

    accelerate launch -m alignlab run recipes/quickstart.yaml --stage sft

Loss on the completion / assistant turns only (prompt tokens are masked) unless the recipe says
`completion_only_loss: false`; plain text trains on every token. `packing: true` packs short examples into
full-length rows. Reports eval loss and perplexity (exp of the mean token loss) on held-out data.
`loss: {name: unlikelihood, alpha: 1.0}` adds token-level unlikelihood on what a response already wrote
(alignlab/losses/sft.py); the eval loss stays the NLL, and the logs show both terms.
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from alignlab.contract import StageContext
from alignlab.data import build_datasets
from alignlab.data.chat import tokenize_chat_dataset
from alignlab.models import load_stage_model, load_tokenizer
from alignlab.stages.trl_compat import log_metric
from alignlab.stages.trl_glue import GuardedTrainer, train_and_save, trainer_args


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
        dataset_num_proc=None,
    )
    if spec.completion_only_loss and "messages" in train_ds.column_names:
        # Loss on assistant turns + their end-of-turn token, found on any template (alignlab.data.chat), handed
        # to TRL already tokenized (input_ids + assistant_masks): TRL's own path needs {% generation %} markers.
        where = f"stage '{spec.name}' ({spec.dataset.path})"
        train_ds = tokenize_for_sft(train_ds, tokenizer, args, f"{where}, training data")
        eval_ds = tokenize_for_sft(eval_ds, tokenizer, args, f"{where}, eval data")
    trainer = GuardedSFTTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer
    )
    if spec.loss.name != "nll":
        trainer.compute_loss_func = RecipeLoss(trainer, spec.loss.name, spec.loss.weight)

    # Train, save, report
    return train_and_save(trainer, ctx, base=base, perplexity=True)


def tokenize_for_sft(ds, tokenizer, args: SFTConfig, where: str):
    """`messages` rows -> input_ids + assistant_masks, truncated as TRL would (none when packing: packing chunks)."""
    if ds is None:
        return None
    max_length = None if args.packing else args.max_length
    return tokenize_chat_dataset(
        ds, tokenizer, max_length=max_length, truncation_mode=args.truncation_mode, where=where
    )


class RecipeLoss:
    """TRL's `compute_loss_func` for a recipe's `loss` (alignlab/losses/sft.py): the named loss in training, the
    plain NLL in evaluation (so eval_loss and perplexity mean what they say); both terms logged per step."""

    def __init__(self, trainer, name: str, alpha: float):
        self.trainer, self.name, self.alpha = trainer, name, alpha

    def __call__(self, outputs, labels, num_items_in_batch=None):
        from alignlab.losses.sft import sft_loss

        training = self.trainer.model.training
        name = self.name if training else "nll"
        loss, stats = sft_loss(outputs.logits, labels, name=name, alpha=self.alpha, num_items=num_items_in_batch)
        for key, value in stats.items():
            if training or key == "nll":
                log_metric(self.trainer, "train" if training else "eval", key, value.item())
        return loss


class GuardedSFTTrainer(GuardedTrainer, SFTTrainer):
    """TRL's SFTTrainer with atomic checkpoints and a stop on nan/inf losses (alignlab.stages.trl_glue)."""
