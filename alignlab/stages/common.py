"""Glue shared by the trainer-based stages: recipe train keys -> TRL config, metrics as JSON lines, the
train call with resume, and the final atomic save. Everything TRL/transformers-version-specific about
training arguments lives here."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import TrainerCallback

from alignlab.models import merge_adapter, save_model_atomic
from alignlab.outputs import StageOutput

if TYPE_CHECKING:
    from alignlab.pipeline import StageContext
    from alignlab.recipe import TrainSpec

log = logging.getLogger("alignlab")
TRACKERS = ("tensorboard", "trackio", "wandb", "mlflow", "comet_ml", "clearml", "swanlab")


def trainer_args(config_cls, ctx: StageContext, train: TrainSpec, has_eval: bool, **stage_kwargs):
    """Build a TRL config (SFTConfig, DPOConfig, ...) from the recipe's train keys."""
    ckpt_dir = ctx.stage_dir / "checkpoints"
    kwargs = dict(
        output_dir=str(ckpt_dir),
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_batch_size,
        per_device_eval_batch_size=train.eval_batch_size or train.per_device_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        max_length=train.max_length,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if (has_eval and train.eval_steps) else "no",
        eval_steps=train.eval_steps,
        save_strategy="steps" if train.save_steps else "no",
        save_steps=train.save_steps or 500,
        save_total_limit=train.save_total_limit,
        report_to=available_trackers(train.report_to),
        bf16=train.bf16,
        fp16=train.fp16,
        seed=ctx.recipe.seed,
        data_seed=ctx.recipe.seed,
        gradient_checkpointing=ctx.recipe.model.gradient_checkpointing,
        disable_tqdm=False,
        dataloader_num_workers=0,
    )
    kwargs.update(stage_kwargs)
    kwargs.update(train.extra)
    return config_cls(**kwargs)


def check_extra_args(config_cls, train: TrainSpec, where: str) -> None:
    """`train.extra` keys must be fields of the stage's TRL config; say which are not, and the closest."""
    import difflib

    names = {f.name for f in dataclasses.fields(config_cls)}
    for key in train.extra:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"{where}.train.extra.{key}: not a field of TRL's {config_cls.__name__}.{hint}")


def available_trackers(wanted: list[str]) -> list[str] | str:
    """Pass the recipe's trackers through to the Trainer when their package is installed; warn otherwise.
    The JSON-lines metrics file is always written, with or without trackers."""
    import importlib.util

    module = {"tensorboard": "tensorboard", "comet_ml": "comet_ml"}
    ok = []
    for name in wanted:
        if importlib.util.find_spec(module.get(name, name)) is None:
            log.warning("report_to: %s is not installed; skipping it (pip install %s)", name, name)
        else:
            ok.append(name)
    return ok or "none"


class JsonlMetrics(TrainerCallback):
    """Appends every log event as one JSON line: {"step": N, "epoch": E, <metric>: value, ...}."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}, default=float) + "\n")


def train_and_save(trainer, ctx: StageContext, *, kind_if_peft="adapter", head="causal_lm", base: str) -> StageOutput:
    """Train (resuming from the last complete checkpoint when asked), evaluate, save atomically, merge on
    request. Returns the stage's output record."""
    metrics_path = ctx.stage_dir / "metrics.jsonl"
    resume = ctx.resume and last_checkpoint(ctx.stage_dir / "checkpoints") is not None
    if not resume and trainer.is_world_process_zero():
        metrics_path.unlink(missing_ok=True)
    trainer.add_callback(JsonlMetrics(metrics_path))
    result = trainer.train(resume_from_checkpoint=last_checkpoint(ctx.stage_dir / "checkpoints") if resume else None)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    metrics["train_loss"] = result.training_loss
    if trainer.eval_dataset is not None:
        ev = trainer.evaluate()
        metrics.update({k: v for k, v in ev.items() if isinstance(v, int | float)})
        if "eval_loss" in ev and ctx.spec.type == "sft":
            metrics["eval_perplexity"] = math.exp(min(ev["eval_loss"], 50.0))
    model = trainer.accelerator.unwrap_model(trainer.model)
    is_peft = hasattr(model, "peft_config")
    out = StageOutput(
        stage=ctx.spec.name,
        type=ctx.spec.type,
        path=str(ctx.stage_dir / "model"),
        kind=kind_if_peft if is_peft else "full",
        base=base,
        head=head,
        metrics=metrics,
    )
    if trainer.is_world_process_zero():
        if is_peft and "ref" in model.peft_config:
            model.delete_adapter("ref")  # the frozen reference copy is not part of the output
        save_model_atomic(model, trainer.processing_class, ctx.stage_dir / "model")
        if ctx.spec.merge and is_peft:
            out.merged_path = merge_adapter(ctx.recipe, out, ctx.stage_dir / "merged")
        with (ctx.stage_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": trainer.state.global_step, "final": True, **metrics}, default=float) + "\n")
    trainer.accelerator.wait_for_everyone()
    return out


def last_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint: Trainer writes trainer_state.json last, so a checkpoint without it was
    cut off mid-write and is ignored."""
    if not ckpt_dir.is_dir():
        return None
    done = [p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    if not done:
        return None
    return str(max(done, key=lambda p: int(p.name.split("-")[-1])))
