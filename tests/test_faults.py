"""Failures that say what to change: a nan/inf loss stops a stage before the value reaches the weights, naming the
step and the likely causes, keeping the last good checkpoint and writing no final model or stage_output.json; an
out-of-memory error names the settings that need less memory, with their current values."""

import math

import pytest
import torch
from safetensors.torch import load_file

from alignlab.cli import main
from tests.helpers import lora, make_recipe, write_yaml
from tests.helpers import rows as _rows

pytestmark = pytest.mark.slow
REWARD_CALLS = {"n": 0}


def nan_on_third_call(prompts, completions):
    """A reward function that breaks at PPO step 3: nan for every completion of its third call in training (its
    fourth in all: validation tries it once first, alignlab.rewards.check_reward_fn)."""
    REWARD_CALLS["n"] += 1
    return [math.nan if REWARD_CALLS["n"] == 4 else float(len(c)) for c in completions]


def _write(tmp_path, stage, peft="lora"):
    raw = make_recipe([stage], tmp_path / "run", name="faults", peft=lora(r=4, alpha=8, dropout=None, method=peft))
    return write_yaml(tmp_path / "r.yaml", raw)


SFT = {
    "name": "sft",
    "type": "sft",
    "dataset": {"path": "builtin:arith", "split": "sft", "size": 64},
    "train": {
        "max_steps": 6,
        "per_device_batch_size": 8,
        "learning_rate": 1e-3,
        "max_length": 48,
        "logging_steps": 1,
        "save_steps": 1,
    },
}


def test_nan_loss_stops_sft_keeping_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from alignlab.stages.sft import GuardedSFTTrainer

    real_loss = GuardedSFTTrainer.compute_loss

    def loss_nan_at_step_3(self, *args, **kwargs):  # as a too-high learning rate or overflow would make it
        loss = real_loss(self, *args, **kwargs)
        return loss * math.nan if self.state.global_step == 2 else loss

    monkeypatch.setattr(GuardedSFTTrainer, "compute_loss", loss_nan_at_step_3)
    assert main(["run", _write(tmp_path, SFT)]) == 1
    err = capsys.readouterr().err
    assert "stage 'sft' (sft): the training loss is nan at step 3 of 6" in err
    assert "Likely causes: a learning rate too high (train.learning_rate = 0.001" in err and "bad data" in err
    assert "fp16" not in err  # named only when the run uses fp16
    stage = tmp_path / "run" / "sft"
    assert f"last good checkpoint is {stage / 'checkpoints' / 'checkpoint-2'}" in err
    assert sorted(p.name for p in (stage / "checkpoints").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    weights = load_file(str(stage / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (stage / "stage_output.json").exists() and not (stage / "model").exists()
    assert all(math.isfinite(r["loss"]) for r in _rows(stage) if "loss" in r)  # the nan was never logged


def test_nan_reward_stops_ppo(tmp_path, capsys):
    REWARD_CALLS["n"] = 0
    ppo = {
        "name": "ppo",
        "type": "ppo",
        "train": {"max_steps": 4, "save_steps": 1, "epochs": 1, "minibatch_size": 4},
        "dataset": {"path": "builtin:arith", "split": "sft", "size": 32},
        "reward_fn": "tests.test_faults:nan_on_third_call",
        "rollout": {"batch_size": 4, "max_new_tokens": 3},
        "ppo": {},
    }
    assert main(["run", _write(tmp_path, ppo)]) == 1
    err = capsys.readouterr().err
    assert "stage 'ppo' (ppo): stopped at PPO step 3 of 4: the reward (reward_fn / reward model) gave nan" in err
    stage = tmp_path / "run" / "ppo"
    assert f"last good checkpoint is {stage / 'checkpoints' / 'step-2'}" in err
    assert not (stage / "stage_output.json").exists() and not (stage / "model").exists()


@pytest.mark.parametrize(
    "stage, error, advice",
    [
        (
            SFT,
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total)"),
            [
                "lower train.per_device_batch_size (now 8) and raise train.gradient_accumulation_steps (now 1)",
                "lower train.max_length (now 48)",
                "set model.gradient_checkpointing: true",
                "use peft.method: qlora",
            ],
        ),
        (
            {
                "name": "ppo",
                "type": "ppo",
                "dataset": {"path": "builtin:arith", "split": "sft"},
                "reward_fn": "tests.helpers:length_reward",
            },
            RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"),
            [
                "lower rollout.batch_size (now 16) and train.minibatch_size (now 8)",
                "lower rollout.max_new_tokens (now 32)",
            ],
        ),
    ],
)
def test_out_of_memory_names_the_settings_to_change(tmp_path, monkeypatch, capsys, stage, error, advice):
    import importlib

    def run_out_of_memory(ctx):
        raise error

    monkeypatch.setattr(importlib.import_module(f"alignlab.stages.{stage['type']}"), "run", run_out_of_memory)
    assert main(["run", _write(tmp_path, stage)]) == 1
    err = capsys.readouterr().err
    assert f"stage '{stage['name']}' ({stage['type']}) ran out of memory ({str(error).splitlines()[0]})" in err
    for text in advice:
        assert text in err
    assert not (tmp_path / "run" / stage["name"] / "stage_output.json").exists()
