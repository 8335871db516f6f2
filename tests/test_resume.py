"""Surviving kills: a run SIGKILLed mid-step or mid-checkpoint resumes (`alignlab run R --resume`) from its last
complete checkpoint and ends exactly where an uninterrupted run ends.

One recipe chains SFT (LoRA) -> DPO (fresh LoRA on the base, precomputed reference log-probs) -> PPO (adaptive KL
controller), each with a checkpoint every 2 of its 6 steps. It is killed three times, each in a fresh process
(`python -m tests.test_resume KILL run R --resume`, which SIGKILLs itself at the KILL point), then resumed to
the end; an uninterrupted run of the same recipe is the reference:
  1. inside SFT step 5, after checkpoint-4;
  2. while writing DPO's checkpoint-4 (weights written, optimizer not): DPO resumes from checkpoint-2;
  3. while writing PPO's step-4 checkpoint: PPO resumes from step-2, with its KL controller.
Measured on CPU: per-step losses, final metrics and saved weights of the resumed run equal the uninterrupted run's
exactly (the tolerances below only allow for float noise on other hardware).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import lora, make_recipe

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _recipe(output_dir):
    train = {"max_steps": 6, "per_device_batch_size": 8, "max_length": 48, "logging_steps": 1, "save_steps": 2}
    stages = [
        {
            "name": "sft",
            "type": "sft",
            "dataset": {"path": "builtin:arith", "split": "sft", "size": 64, "eval_size": 16},
            "train": {**train, "learning_rate": 3e-3},
        },
        {
            "name": "dpo",
            "type": "dpo",
            "input": "base",
            "dataset": {"path": "builtin:arith", "split": "preference", "size": 64},
            "precompute_ref_logps": True,
            "train": {**train, "learning_rate": 2e-3},
        },
        {
            "name": "ppo",
            "type": "ppo",
            "train": {"max_steps": 6, "save_steps": 2, "epochs": 2, "minibatch_size": 4, "learning_rate": 1e-3},
            "input": "base",
            "dataset": {"path": "builtin:arith", "split": "sft", "size": 64},
            "reward_fn": "tests.helpers:length_reward",
            "rollout": {"batch_size": 8, "max_new_tokens": 4, "temperature": 1.0},
            "ppo": {"kl_coef": 0.05, "kl_target": 1.0},
        },
    ]
    # dropout: the RNG state must resume too
    return make_recipe(stages, output_dir, name="resume", peft=lora(dropout=0.05))


def _start_killed_run(*argv, kill: str) -> subprocess.Popen:
    """The alignlab CLI in a fresh process (one thread) that SIGKILLs itself at `kill` (see _arm)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGNLAB_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tests.test_resume", kill, *argv]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _killed(proc: subprocess.Popen) -> None:
    """Wait for a process of _start_killed_run: it must have died by its own SIGKILL."""
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == -signal.SIGKILL, err[-3000:]


def _killed_run(*argv, kill: str) -> None:
    _killed(_start_killed_run(*argv, kill=kill))


def _arm(kill: str) -> None:
    """`train-step:N`: SIGKILL when a Trainer starts optimizer step N. `save:NAME`: SIGKILL at the first
    torch.save into checkpoint folder NAME (Trainer: after the weights, before the optimizer state; PPO, whose
    folder is .NAME.tmp until complete: after the trainable weights)."""
    import torch
    from transformers import Trainer

    what, arg = kill.split(":")

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if what == "train-step":
        real_step = Trainer.training_step

        def training_step(self, *args, **kwargs):
            if self.state.global_step + 1 == int(arg):
                die()
            return real_step(self, *args, **kwargs)

        Trainer.training_step = training_step
    elif what == "save":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if Path(str(f)).parent.name in (arg, f".{arg}.tmp"):
                die()
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    else:
        raise ValueError(kill)


def _rows(stage_dir):
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_last_checkpoint_picks_only_complete_ones(tmp_path):
    from alignlab.checkpoints import last_checkpoint

    ckpts = tmp_path / "checkpoints"
    for name, files in {
        "checkpoint-2": ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json"],
        "checkpoint-10": ["adapter_model.safetensors", "trainer_state.json"],  # numeric order, not text order
        "checkpoint-12": ["adapter_model.safetensors", "optimizer.pt"],  # cut off: no trainer_state.json
        ".staging/checkpoint-14": ["adapter_model.safetensors", "trainer_state.json"],  # never renamed into place
        "checkpoint-16": ["adapter_model.safetensors", "optimizer.pt"],  # trainer_state.json cut off, below
    }.items():
        (ckpts / name).mkdir(parents=True)
        for f in files:
            (ckpts / name / f).write_text("{}")
    (ckpts / "checkpoint-16" / "trainer_state.json").write_text('{"global_step": 16, "log_hi')
    assert last_checkpoint(ckpts) == ckpts / "checkpoint-10"
    assert last_checkpoint(tmp_path / "none") is None

    for name, files in {
        "step-2": ["COMPLETE"],
        "step-4": ["trainable.safetensors"],
        ".step-6.tmp": ["COMPLETE"],
    }.items():
        (ckpts / name).mkdir()
        for f in files:
            (ckpts / name / f).write_text("")
    assert last_checkpoint(ckpts, "step") == ckpts / "step-2"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # Every run on one thread, as the killed processes (_killed_run): the thread count changes how kernels split
    # their sums, hence float rounding (sampling's small decode matmuls), which is not what this test is about.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ALIGNLAB_THREADS", "1")  # `alignlab run` in this process too, whatever the session's setting
            yield _run_straight_and_killed(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _run_straight_and_killed(tmp_path_factory):
    from alignlab.cli import main

    tmp = tmp_path_factory.mktemp("resume")
    (tmp / "straight.yaml").write_text(yaml.safe_dump(_recipe(tmp / "straight")))
    (tmp / "killed.yaml").write_text(yaml.safe_dump(_recipe(tmp / "killed")))
    killed = tmp / "killed"
    recipe = str(tmp / "killed.yaml")
    # The first cut-off run works in its own folder, beside the uninterrupted one: one thread each, two cores.
    first = _start_killed_run("run", recipe, kill="train-step:5")
    try:
        assert main(["run", str(tmp / "straight.yaml")]) == 0
    finally:
        _killed(first)
    assert sorted(p.name for p in (killed / "sft" / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    _killed_run("run", recipe, "--resume", kill="save:checkpoint-4")
    dpo_ckpts = killed / "dpo" / "checkpoints"
    assert (dpo_ckpts / ".staging" / "checkpoint-4" / "adapter_model.safetensors").exists()  # the cut-off write
    assert [p.name for p in dpo_ckpts.glob("checkpoint-*")] == ["checkpoint-2"]  # ... never became "latest"
    _killed_run("run", recipe, "--resume", kill="save:step-4")
    assert (killed / "ppo" / "checkpoints" / ".step-4.tmp").exists()
    assert not (killed / "ppo" / "stage_output.json").exists()
    assert main(["run", recipe, "--resume"]) == 0
    return tmp / "straight", killed


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_trainer_stage_resumes_to_the_same_end(runs, stage):
    straight, killed = runs
    a, b = _rows(straight / stage), _rows(killed / stage)
    losses = [(r["step"], r["loss"]) for r in a if "loss" in r]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    # The resumed run's metrics read like the uninterrupted run's: no duplicated or missing steps.
    resumed = [(r["step"], r["loss"]) for r in b if "loss" in r]
    assert [s for s, _ in resumed] == [s for s, _ in losses]
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in losses], rel=1e-5)
    final_a, final_b = a[-1], b[-1]
    assert final_a["final"] and final_b["final"]
    for key in ("train_loss", "eval_loss"):  # train_loss: the whole run's mean, not only the resumed steps'
        if key in final_a:
            assert final_b[key] == pytest.approx(final_a[key], rel=1e-5), key
    wa, wb = (
        _weights(straight / stage / "model/adapter_model.safetensors"),
        _weights(killed / stage / "model/adapter_model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= 1e-5 * (1 + wa[k].abs().max().item()), k


def test_ppo_resumes_to_the_same_end(runs):
    straight, killed = runs
    a = [r for r in _rows(straight / "ppo") if not r.get("final")]
    b = [r for r in _rows(killed / "ppo") if not r.get("final")]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("score", "kl", "kl_coef", "policy_loss", "value_loss"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (key, ra["step"])
    assert a[-1]["kl_coef"] != 0.05  # the adaptive controller moved, and was restored on resume
    for name in ("model/adapter_model.safetensors", "value_head.safetensors"):
        wa, wb = _weights(straight / "ppo" / name), _weights(killed / "ppo" / name)
        for k in wa:
            assert (wa[k] - wb[k]).abs().max().item() <= 1e-5 * (1 + wa[k].abs().max().item()), k


def test_rerun_of_finished_stages_does_nothing(runs):
    from alignlab.cli import main

    _, killed = runs
    before = {s: (killed / s / "stage_output.json").stat().st_mtime_ns for s in ("sft", "dpo", "ppo")}
    assert main(["run", str(killed.parent / "killed.yaml"), "--resume"]) == 0
    assert {s: (killed / s / "stage_output.json").stat().st_mtime_ns for s in before} == before


if __name__ == "__main__":  # python -m tests.test_resume KILL alignlab-args...: the CLI, SIGKILLed at KILL
    _arm(sys.argv[1])
    from alignlab.cli import main

    sys.exit(main(sys.argv[2:]))
