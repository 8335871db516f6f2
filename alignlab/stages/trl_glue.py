"""Glue shared by the trainer-based stages: recipe train keys -> TRL config, metrics as JSON lines, atomic
checkpoints and a stop on nan/inf losses (GuardedTrainer), the train call with resume, and the final atomic save.
Everything TRL/transformers-version-specific about training arguments lives here."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from transformers import TrainerCallback
from transformers.trainer_optimizer import is_optimizer_factory
from transformers.trainer_utils import rotate_checkpoints

from alignlab.checkpoints import last_checkpoint
from alignlab.console import FILE_ONLY, progress_enabled
from alignlab.contract import StageOutput, TrainingDiverged, append_final_metrics, checkpoint_note, keep_metrics_until
from alignlab.models import save_stage_model
from alignlab.stages.trl_compat import CheckpointHook

if TYPE_CHECKING:
    from alignlab.contract import StageContext
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
        disable_tqdm=not progress_enabled(),  # a bar only on a terminal (alignlab/console.py); metrics print either way
        dataloader_num_workers=0,
        # `accelerate launch --multi_gpu` on a machine without GPUs: keep the gloo CPU processes that the pipeline
        # set up (TrainingArguments rebuilds the distributed state, and would otherwise fall back to one process).
        use_cpu=PartialState().distributed_type == DistributedType.MULTI_CPU,
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
            # The Trainer prints the row on the console; the run's log file gets it too.
            log.info("step %d: %s", state.global_step, json.dumps(logs, default=float), extra=FILE_ONLY)


class GuardedTrainer(CheckpointHook):
    """Mixed in before a TRL trainer (`class X(GuardedTrainer, SFTTrainer)`); swaps two Trainer methods (how a
    checkpoint is written: `write_checkpoint`, through trl_compat.CheckpointHook; the training step).

    Atomic checkpoints: Trainer writes checkpoint-N in place (weights, optimizer, each process its RNG state, then
    trainer_state.json, with no barrier between), so a kill mid-write leaves a checkpoint-N that looks newest.
    Here it is written under checkpoints/.staging/ and renamed into place once every process has written its part;
    older ones are rotated (save_total_limit) only after that. No checkpoint is written at the last step (the final
    model is saved right after it): Trainer resumed from one would train a step past max_steps.
    Finite loss: a nan or inf loss on any process stops training before the optimizer applies it, so no checkpoint
    holds its weights. (A TrainerCallback never sees the per-step loss: only logged averages, every logging_steps.)
    Float32 adapters on a quantized base: see `keep_trainable_float32`.
    Layer-wise learning rates (`layer_lr_decay`, set by train_and_save from `train.layer_lr_decay`): the optimizer's
    parameter groups come from alignlab/optim.py.
    """

    layer_lr_decay: float | None = None

    def __init__(self, *args, model=None, **kwargs):
        before = trainable_float32(model)
        super().__init__(*args, model=model, **kwargs)
        keep_trainable_float32(self, before)

    def create_optimizer(self, model=None):
        """Trainer's optimizer (`optim`, its settings), with one parameter group per depth of the model at the
        depth's rate (alignlab.optim.layer_lr_groups) when layer_lr_decay is set. The scheduler then scales every
        group's rate by the same factor, so the ratios between depths hold throughout training."""
        if self.layer_lr_decay is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from alignlab.optim import layer_lr_groups

        opt_model = self.model if model is None else model
        decays = set(self.get_decay_parameter_names(opt_model))
        no_decay = {n for n, _ in opt_model.named_parameters() if n not in decays}
        groups = layer_lr_groups(
            opt_model, self.args.learning_rate, self.layer_lr_decay, self.args.weight_decay, no_decay
        )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
            raise ValueError(
                f"train.layer_lr_decay sets the optimizer's parameter groups, which optim '{self.args.optim}' builds "
                "itself: remove layer_lr_decay, or use an AdamW optim (the default)"
            )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def write_checkpoint(self, model, trial, write):
        if self.state.global_step >= self.state.max_steps:
            return
        root = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        staging, final = root / ".staging", root / name
        if self.args.should_save:
            shutil.rmtree(staging / name, ignore_errors=True)  # a cut-off earlier attempt
        self.args.output_dir = str(staging)
        try:
            write(model, trial)
        finally:
            self.args.output_dir = str(root)
        self.accelerator.wait_for_everyone()  # every process's RNG state is in
        if self.args.should_save:
            if final.exists():  # the same step from an earlier run (--force): moved aside, deleted once replaced
                os.replace(final, staging / f"{name}.old")
            os.replace(staging / name, final)
            shutil.rmtree(staging / f"{name}.old", ignore_errors=True)
            if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint).parent == staging:
                self.state.best_model_checkpoint = str(root / Path(self.state.best_model_checkpoint).name)
            rotate_checkpoints(str(root), self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        bad = (~torch.isfinite(loss)).float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")  # every process stops together
        if bad.item() > 0:
            a = self.args
            fp16 = a.fp16 or getattr(self.model, "dtype", None) == torch.float16
            raise TrainingDiverged(
                f"the training loss is {loss.item() if not torch.isfinite(loss) else 'nan or inf on another process'}"
                f" at step {self.state.global_step + 1} of {self.state.max_steps}; training stopped before the "
                f"optimizer applied it. Likely causes: a learning rate too high (train.learning_rate = "
                f"{a.learning_rate}: lower it, or warm up with train.warmup_ratio); "
                + ("fp16 overflow (use bf16 or float32); " if fp16 else "")
                + "bad data (e.g. empty or extreme examples). "
                + checkpoint_note(last_checkpoint(Path(a.output_dir)))
            )
        return loss


def trainable_float32(model) -> dict:
    """{name: a copy} of a quantized model's trainable float32 weights (the adapters: small), else {}."""
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if not quantized:
        return {}
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float32}


def keep_trainable_float32(trainer, before: dict) -> None:
    """Undo TRL's cast of a quantized model's trainable weights to bfloat16 (SFT, DPO and Reward trainers, TRL 1.16,
    after the QLoRA paper's bf16 adapters) in unsharded runs: alignlab puts back the float32 weights (`before`, from
    `trainable_float32` ahead of TRL's __init__), values included.

    In bf16 they break three ways. (1) An AdamW step moves a weight by about the learning rate, and bf16 keeps 8
    significant bits: a LoRA A weight of 0.02 (SmolLM2's are uniform in +-1/sqrt(576) = +-0.042) does not move
    under an update below half its bf16 spacing, 2^-14 = 6e-5, so DPO at lr 5e-6 leaves the A matrices frozen, silently.
    (2) DPO's reference, continuing an SFT adapter, is a copy of it ("ref") that TRL takes before the cast: the policy
    is its bf16 rounding, so policy and reference differ at step 0 (SmolLM2 after a LoRA SFT: 0.1 nats per
    completion) and the first DPO loss is not ln 2. Casting back to float32 is not enough: the rounding stays.
    (3) A trainable score head (the reward model's, in `modules_to_save`) in bf16 meets float32 hidden states:
    without autocast (CPU, float32 training) the matmul fails with "expected m1 and m2 to have the same dtype".
    Under FSDP or DeepSpeed the cast is left alone (sharded parameters must share one dtype)."""
    if not before or trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    for name, param in model.named_parameters():
        if name in before and param.dtype != torch.float32:
            param.data = before[name]


def train_and_save(
    trainer, ctx: StageContext, *, kind_if_peft="adapter", head="causal_lm", base: str, perplexity: bool = False
) -> StageOutput:
    """Train (resuming from the last complete checkpoint when asked), evaluate, save atomically, merge on
    request. `perplexity`: also report eval_perplexity = exp(eval_loss) (a language-modelling loss). Returns the
    stage's output record."""
    metrics_path = ctx.stage_dir / "metrics.jsonl"
    ckpt = last_checkpoint(ctx.stage_dir / "checkpoints") if ctx.resume else None
    ckpt = str(ckpt) if ckpt else None
    state = json.loads((Path(ckpt) / "trainer_state.json").read_text()) if ckpt else {"global_step": 0}
    if trainer.is_world_process_zero():
        keep_metrics_until(metrics_path, state["global_step"])  # the rows up to the checkpoint (fresh run: none)
    trainer.add_callback(JsonlMetrics(metrics_path))
    trainer.layer_lr_decay = ctx.spec.train.layer_lr_decay
    if ckpt:
        log.info("stage %s: resuming from %s (step %d)", ctx.spec.name, ckpt, state["global_step"])
    check_rows_left(trainer, ctx)
    result = trainer.train(resume_from_checkpoint=ckpt)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    # Trainer's training_loss averages the steps of this call only; a resumed run reports the whole run's mean.
    steps_before, loss_before = state["global_step"], _summed_loss(state.get("log_history", []))
    total_steps = trainer.state.global_step
    metrics["train_loss"] = (loss_before + result.training_loss * (total_steps - steps_before)) / max(total_steps, 1)
    if trainer.eval_dataset is not None:
        ev = trainer.evaluate()
        metrics.update({k: v for k, v in ev.items() if isinstance(v, int | float)})
        if "eval_loss" in ev and perplexity:
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
    # FSDP and ZeRO-3 hold each parameter in shards: gather a full state dict (a collective, so on every process)
    # for the main process to save; the unwrapped model alone would save that process's shard.
    acc = trainer.accelerator
    sharded = trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled and acc.state.deepspeed_plugin.zero_stage == 3)
    state_dict = acc.get_state_dict(trainer.model_wrapped) if sharded else None
    if trainer.is_world_process_zero():
        save_stage_model(ctx.recipe, ctx.spec, model, trainer.processing_class, out, ctx.stage_dir, state_dict)
        append_final_metrics(ctx.stage_dir, trainer.state.global_step, metrics)
    trainer.accelerator.wait_for_everyone()
    return out


def check_rows_left(trainer, ctx: StageContext) -> None:
    """A DataError when TRL's preparation of the data left no rows. TRL drops a row whose trained tokens (its
    completion or assistant turns) all fall beyond max_length, and an empty dataset would fail inside torch's sampler
    ("num_samples=0") without a word of why. `alignlab validate` counts prompt tokens beforehand only for a model
    whose tokenizer is on disk (not a hub id offline), so this check runs here, once the model has loaded and before
    the first step."""
    from alignlab.data import DataError

    for which, ds in (("training", trainer.train_dataset), ("eval", trainer.eval_dataset)):
        if ds is None or not hasattr(ds, "__len__") or len(ds) > 0:
            continue  # an iterable dataset has no length to check
        args = trainer.args
        raise DataError(
            f"stage '{ctx.spec.name}' ({ctx.spec.dataset.path}): no {which} rows are left once tokenized: in every "
            f"row, the completion (or the assistant turns) starts beyond train.max_length = {args.max_length} "
            f"tokens (truncation_mode {getattr(args, 'truncation_mode', 'keep_start')}), so TRL dropped them all. "
            f"Found after the model loaded, before training: raise train.max_length, or shorten the prompts."
        )


def _summed_loss(log_history: list[dict]) -> float:
    """Sum of the per-step training losses over a Trainer log history (each logged loss averages its window)."""
    total, prev = 0.0, 0
    for row in log_history:
        if "loss" in row:
            total += row["loss"] * (row["step"] - prev)
            prev = row["step"]
    return total
