"""Every private name of TRL (and of transformers' Trainer) that alignlab relies on, in one place.

TRL's API moves between minor releases (pyproject.toml pins the tested range). Public names break loudly; private
ones can break silently: an override of a method TRL renamed is simply never called again. So each private name is
listed here with why alignlab needs it, the trainer code reaches TRL's private state and methods only through the
functions and mixins below (each private method alignlab overrides is routed to a public-named method of the
trainer class), and `missing_private_names()` (run by tests/test_trl_compat.py) says which of them an upgrade
removed. tests/test_trl_compat.py also fails on any private name of a TRL or transformers object used elsewhere in the
package.
"""

from __future__ import annotations

import importlib

# (module, class or None, attribute) -> why alignlab uses it
PRIVATE_NAMES: dict[tuple[str, str | None, str], str] = {
    ("transformers", "Trainer", "_save_checkpoint"): "overridden (CheckpointHook) to write checkpoints atomically",
    ("trl", "DPOTrainer", "_precompute_ref_logps"): "overridden (ReferenceLogpsHook): reference log-probs cached on "
    "disk, gathered in order",
    ("trl", "DPOTrainer", "compute_ref_log_probs"): "called for reference log-probs of a batch",
    ("trl.trainer.dpo_trainer", None, "add_fused_lm_head"): "DPOTrainer patches the model's forward with "
    "`fused_lm_head=True` (log-probs without materialising the logits); alignlab's loss calls it that way",
    ("trl.models", None, "prepare_deepspeed"): "places the policy as reference for ZeRO-3 precomputation",
}
# Instance attributes set in TRL's __init__ (checked on a built trainer by the tests, not here).
PRIVATE_ATTRIBUTES = {
    "_metrics": "TRL's per-mode metric lists, averaged into each log line (DPOTrainer, RewardTrainer)",
    "_precompute_model_hash": "DPOTrainer's hash of the reference weights, part of the ref log-prob cache key",
    "_precompute_engine": "DPOTrainer's DeepSpeed engine for precomputation under ZeRO-3",
}


class CheckpointHook:
    """Mixed in before a TRL trainer: Trainer writes each checkpoint through its private `_save_checkpoint(model,
    trial)`; here that call goes to the trainer class's `write_checkpoint(model, trial, write)`, `write` being
    Trainer's own (which writes checkpoint-N into args.output_dir)."""

    def _save_checkpoint(self, model, trial):
        return self.write_checkpoint(model, trial, super()._save_checkpoint)

    def write_checkpoint(self, model, trial, write) -> None:
        write(model, trial)


class ReferenceLogpsHook:
    """Mixed in before DPOTrainer: its private `_precompute_ref_logps(dataset, name, batch_size)` (the reference
    log-probs of every pair, computed before training when precompute_ref_log_probs is set) goes to the trainer
    class's `precompute_reference_logps(dataset, name, batch_size)`, which returns the dataset with the columns
    `ref_chosen_logps` and `ref_rejected_logps` added."""

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return self.precompute_reference_logps(dataset, name, batch_size)

    def precompute_reference_logps(self, dataset, name, batch_size):
        return super()._precompute_ref_logps(dataset, name, batch_size)


class _NoReference:
    """The `ref_model` a reference-free DPO stage passes (see WithoutReference)."""

    def __repr__(self) -> str:
        return "NO_REFERENCE"


NO_REFERENCE = _NoReference()


class WithoutReference:
    """Mixed in before DPOTrainer: `ref_model=NO_REFERENCE` builds the trainer with no reference at all.

    TRL 1.16's DPOTrainer has no reference-free mode (its config has no such flag). Given ref_model=None it always
    makes one: for a PeftModel, a frozen copy of the adapter as adapter "ref" (or it disables the adapter), for
    full fine-tuning a second model loaded from the policy's path; `precompute_ref_log_probs` avoids keeping the
    second model, but still loads it or runs the policy as reference over the whole dataset first. Passing any
    `ref_model` skips all of that: TRL then only assigns it to `self.ref_model`, and touches it afterwards behind
    `self.ref_model is not None` (dropout, fused LM head, accelerate / DeepSpeed / FSDP preparation, reference
    forwards). This property turns the sentinel into None on assignment, so nothing is loaded, copied, prepared or
    run. This relies on TRL's __init__ flow, not on a private name: tests/test_dpo_stage.py checks it (no "ref"
    adapter, no reference model, no reference forward).
    """

    @property
    def ref_model(self):
        return self.__dict__.get("_alignlab_ref_model")

    @ref_model.setter
    def ref_model(self, value):
        self.__dict__["_alignlab_ref_model"] = None if value is NO_REFERENCE else value


def missing_private_names() -> list[str]:
    """The listed private names the installed TRL / transformers lack, with why alignlab needs each."""
    missing = []
    for (module, cls, attr), why in PRIVATE_NAMES.items():
        owner = importlib.import_module(module)
        owner = getattr(owner, cls, None) if cls else owner
        if owner is None or not hasattr(owner, attr):
            missing.append(f"{module}.{cls + '.' if cls else ''}{attr} ({why})")
    return missing


def log_metric(trainer, mode: str, key: str, value: float) -> None:
    """Append a value to TRL's metric list for `mode` ("train" | "eval"); TRL averages it into the next log."""
    trainer._metrics[mode][key].append(value)


def reference_weights_hash(trainer) -> str:
    """DPOTrainer's hash of the reference weights (part of the reference log-prob cache key)."""
    return str(trainer._precompute_model_hash)


def deepspeed_reference_engine(trainer):
    """The policy wrapped for ZeRO-3 forward passes (parameters gathered), built once, as TRL's precomputation does."""
    from trl.models import prepare_deepspeed

    trainer._precompute_engine = trainer._precompute_engine or prepare_deepspeed(trainer.model, trainer.accelerator)
    return trainer._precompute_engine
