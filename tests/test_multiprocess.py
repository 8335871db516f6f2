"""Every stage under `accelerate launch --multi_gpu --num_processes 2` (two gloo processes on CPU) computes what one
process computes at the same GLOBAL batch (1 process x 8 vs 2 processes x 4).

One recipe chains all six stage types: SFT (LoRA) -> DPO with KLDPO (its batch mean is gathered over processes)
and precomputed reference log-probs; a reward model; PPO with a programmatic reward; GRPO; eval; generate (sampled
preference pairs from the PPO model); distill (the SFT model into a fresh adapter, on-policy and offline steps, with
layer-wise learning rates). It runs once in this
process and once under two processes. Dropout is 0 and each PPO rollout batch is one minibatch, the settings under
which the two runs are the same computation. They differ only by float summation order (gradients averaged over
processes, batches padded to other lengths). Measured, largest over the steps: SFT loss identical, DPO (KLDPO) loss
2e-5 and reward loss 2e-6 relative, gradient norms up to 7e-4 relative (DPO); PPO scores and response lengths
identical (same samples), KL 1e-5 relative, policy and value losses 3e-7 absolute; eval numbers 1e-5 relative.

How far the two runs drift depends on the CPU's kernels. Each AdamW update turns float noise in a gradient
coordinate near 0 into a full step of either sign (m / sqrt(v)), so the difference grows about tenfold per update.
Measured on an AMD EPYC without AVX-512 (PPO / GRPO, largest over the logged numbers): 1e-6 at step 1 (the updated
SFT adapter, then one rollout: float order alone), 5e-5 at step 2, 3e-4 / 1.3e-3 at step 3; the final adapters
differ by 0.26% / 0.35% of their update's norm; eval's sampled KL 0.2%. So the first RL step is held to float
noise, the later ones and the eval to 1%, and the weights to 1% of the update.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import lora, make_recipe

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _recipe(output_dir, batch):
    train = {"max_steps": 4, "per_device_batch_size": batch, "max_length": 48, "logging_steps": 1}
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
            "dataset": {"path": "builtin:arith", "split": "preference", "size": 64, "eval_size": 16},
            "loss": {"name": "kldpo", "beta": 0.1, "tau": 0.5},
            "precompute_ref_logps": True,
            "train": {**train, "learning_rate": 2e-3},
        },
        {
            "name": "reward",
            "type": "reward",
            "input": "sft",
            "dataset": {"path": "builtin:arith", "split": "preference", "size": 64, "eval_size": 16},
            "train": {**train, "max_steps": 3, "learning_rate": 1e-3},
        },
        {
            "name": "ppo",
            "type": "ppo",
            "train": {"max_steps": 3, "epochs": 2, "minibatch_size": batch, "learning_rate": 1e-3},
            "input": "sft",
            "dataset": {"path": "builtin:arith", "split": "sft", "size": 64},
            "reward_fn": "tests.helpers:length_reward",
            "rollout": {"batch_size": batch, "max_new_tokens": 4, "temperature": 1.0},
            "ppo": {"kl_coef": 0.05, "kl_target": 1.0},
        },
        {  # groups stay whole on one process: 1 process x 4 prompts = 2 processes x 2 prompts (x 4 responses)
            "name": "grpo",
            "type": "grpo",
            "train": {"max_steps": 3, "epochs": 2, "learning_rate": 1e-3},
            "rollout": {"batch_size": batch // 2, "num_samples": 4, "max_new_tokens": 4},
            "input": "sft",
            "dataset": {"path": "builtin:arith", "split": "sft", "size": 64},
            "reward_fn": [{"fn": "tests.helpers:length_reward"}, {"fn": "builtin:arith", "weight": 0.5}],
            "beta": 0.1,
            "loss_agg": "token_mean",
            "skip_zero_std_groups": True,
            "watch_steps": None,
        },
        {
            "name": "eval",
            "type": "eval",
            "rollout": {"max_new_tokens": 6},
            "input": "ppo",
            "reference": "sft",
            "reward_model": "reward",
            "reward_fn": "alignlab.builtin.tasks:arith_reward",
            "dataset": {"path": "builtin:arith", "split": "eval", "size": 8},
            "num_prompts": 8,
        },
        {
            "name": "pairs",
            "type": "generate",
            "rollout": {"num_samples": 3, "max_new_tokens": 4, "batch_size": 3},
            "input": "ppo",
            "dataset": {"path": "builtin:arith", "split": "eval", "size": 10},
            "reward_fn": "alignlab.builtin.tasks:arith_reward",
            # 4 prompt groups: process 0 samples groups 0 and 2, process 1 groups 1 and 3
        },
        {  # on-policy and offline steps (a draw seeded by the step), a fresh adapter, the SFT model as teacher
            "name": "distill",
            "type": "distill",
            "input": "base",
            "teacher": "sft",
            "mode": "on_policy",
            "on_policy_share": 0.5,
            "dataset": {"path": "builtin:arith", "split": "sft", "size": 64, "eval_size": 8},
            "train": {"max_steps": 4, "learning_rate": 1e-3, "layer_lr_decay": 0.8},
            "rollout": {"batch_size": batch, "max_new_tokens": 4},
        },
    ]
    return make_recipe(stages, output_dir, name="multiprocess", peft=lora(dropout=0.0))


def test_row_seeded_sampling_is_the_softmax_whatever_the_batch():
    """PPO samples each response from its own generator, so a batch split over processes samples the same."""
    import torch

    from alignlab.generation import RowSeededSampler

    z, n = torch.tensor([2.0, 1.0, 0.0, -1.0, -5.0]), 20000
    freq = torch.bincount(RowSeededSampler(range(n), 0.5, 1.0)(None, z.repeat(n, 1)).argmax(-1), minlength=5) / n
    assert torch.allclose(freq, torch.softmax(z / 0.5, -1), atol=0.01)  # 0.01: over 3 standard errors at n = 20000
    # top_p 0.8 keeps the two likeliest tokens (softmax 0.64 + 0.24 >= 0.8), renormalised: 0.73 / 0.27.
    freq = torch.bincount(RowSeededSampler(range(n), 1.0, 0.8)(None, z.repeat(n, 1)).argmax(-1), minlength=5) / n
    assert torch.allclose(freq, torch.softmax(torch.tensor([2.0, 1.0, -1e9, -1e9, -1e9]), -1), atol=0.01)
    # Rows 2 and 3 alone draw what they draw in a batch of 4, token after token.
    whole, half = RowSeededSampler(range(4), 1.0, 1.0), RowSeededSampler([2, 3], 1.0, 1.0)
    for _ in range(3):
        assert torch.equal(whole(None, z.repeat(4, 1))[2:], half(None, z.repeat(2, 1)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(recipe_path, *args, timeout=400):
    """`accelerate launch --multi_gpu --num_processes 2 -m alignlab run RECIPE ...` on CPU, one thread each (whatever
    ALIGNLAB_THREADS this session has). (`--cpu --num_processes 2` would start a single process.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGNLAB_THREADS": "1", "PYTHONPATH": str(REPO)}
    env["ACCELERATE_USE_CPU"] = "false"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(_free_port()), "-m", "alignlab", "run", str(recipe_path), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(stage_dir):
    rows = [json.loads(line) for line in (Path(stage_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r or "score" in r], next(r for r in rows if r.get("final"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from alignlab.cli import main

    tmp = tmp_path_factory.mktemp("multiprocess")
    (tmp / "one.yaml").write_text(yaml.safe_dump(_recipe(tmp / "one", batch=8)))
    (tmp / "two.yaml").write_text(yaml.safe_dump(_recipe(tmp / "two", batch=4)))
    done = launch_two_processes(tmp / "two.yaml")
    assert done.returncode == 0, done.stderr[-4000:]
    assert main(["run", str(tmp / "one.yaml")]) == 0
    return tmp / "one", tmp / "two", done


def _tolerance(step: int) -> tuple[float, float]:
    """(rel, abs) for an RL step's logged numbers: float noise at step 1, 1% after updates (module docstring)."""
    return (1e-4, 1e-5) if step == 1 else (1e-2, 1e-4)


def _assert_same_update(stage1, stage2, start):
    """The two runs' final adapters differ by under 1% of what the stage changed (the norm of final - start)."""
    import torch
    from safetensors.torch import load_file

    a, b, s = (load_file(str(Path(d) / "model" / "adapter_model.safetensors")) for d in (stage1, stage2, start))
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    update = torch.cat([(a[k] - s[k]).flatten() for k in a]).norm()
    assert update > 0 and diff < 0.01 * update, (float(diff), float(update))


def test_two_processes_ran_as_one_data_parallel_job(runs):
    one, two, done = runs
    assert sorted(p.name for p in (two / "logs").iterdir()) == ["run.0.log", "run.1.log"]
    assert "ParallelMode.DISTRIBUTED" not in done.stderr and "parallel_mode !=" not in done.stderr
    # Logged and saved once: one metrics row per step, one summary on the console.
    assert done.stdout.count("alignlab: run 'multiprocess' finished") == 1
    sft_rows, _ = _rows(two / "sft")
    assert [r["step"] for r in sft_rows] == [1, 2, 3, 4]
    # Each process took its own half of the batch: the same tokens per step as one process with 8 rows.
    assert [r["num_tokens"] for r in sft_rows] == [r["num_tokens"] for r in _rows(one / "sft")[0]]


@pytest.mark.parametrize("stage", ["sft", "dpo", "reward"])
def test_trainer_stages_match_one_process(runs, stage):
    one, two, _ = runs
    (rows1, final1), (rows2, final2) = _rows(one / stage), _rows(two / stage)
    assert len(rows1) == len(rows2) >= 3
    for a, b in zip(rows1, rows2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (stage, a["step"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-3), (stage, a["step"])
    assert final2["train_loss"] == pytest.approx(final1["train_loss"], rel=1e-4)
    assert final2["eval_loss"] == pytest.approx(final1["eval_loss"], rel=1e-4)
    if stage == "dpo":  # KLDPO's weights are relative to the batch mean over BOTH processes' pairs
        assert rows1[1]["kldpo/weight_max"] > 1.01  # the weights moved off 1 after the first update
        for a, b in zip(rows1, rows2):
            for key in ("kldpo/weight_max", "kldpo/weight_min", "kldpo/weight_mean"):
                assert b[key] == pytest.approx(a[key], rel=1e-3), (key, a["step"])


def test_ppo_matches_one_process(runs):
    one, two, _ = runs
    rows1, rows2 = _rows(one / "ppo")[0], _rows(two / "ppo")[0]
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [1, 2, 3]
    for a, b in zip(rows1, rows2):
        # Each process sampled its half of the prompts with each response's own random stream: the same responses
        # (equal lengths; the mean score equal up to the float32 rounding of a gathered mean, ~1e-8).
        assert b["response_length"] == a["response_length"]
        assert b["score"] == pytest.approx(a["score"], rel=0, abs=1e-6)
        assert b["kl_coef"] == pytest.approx(a["kl_coef"], rel=1e-6)  # one KL controller, fed the global KL
        rel, tol = _tolerance(a["step"])
        for key in ("kl", "policy_loss", "value_loss", "entropy", "clipfrac"):
            assert b[key] == pytest.approx(a[key], rel=rel, abs=tol), (key, a["step"])
    # The policy moved off its reference (k1, a sampled estimate, can be negative): the comparison covers updates.
    assert abs(rows1[-1]["kl"]) > 0.01
    _assert_same_update(one / "ppo", two / "ppo", one / "sft")


def test_grpo_matches_one_process(runs):
    """Token-mean loss (and flat groups dropped, where a step has any): the two processes hold different numbers of
    tokens, and each weighs its loss by its share, so the update is still the one-process update."""
    one, two, _ = runs
    rows1, rows2 = (
        [json.loads(x) for x in (d / "grpo" / "metrics.jsonl").read_text().splitlines()] for d in (one, two)
    )
    rows1, rows2 = [r for r in rows1 if not r.get("final")], [r for r in rows2 if not r.get("final")]
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [1, 2, 3]
    for a, b in zip(rows1, rows2):
        assert b["response_length"] == a["response_length"]  # the same responses
        for key in ("reward", "reward/builtin:arith", "zero_std_groups"):
            assert b[key] == pytest.approx(a[key], rel=0, abs=1e-6), (key, a["step"])
        rel, tol = _tolerance(a["step"])
        for key in ("policy_loss", "kl", "entropy", "ratio", "clip_low_frac", "clip_high_frac"):
            assert b[key] == pytest.approx(a[key], rel=rel, abs=tol), (key, a["step"])
    assert rows1[-1]["kl"] > 0.01  # the policy moved: the comparison covers updates, not only sampling
    _assert_same_update(one / "grpo", two / "grpo", one / "sft")


def test_eval_matches_one_process(runs):
    one, two, _ = runs
    ev1 = json.loads((one / "eval" / "eval.json").read_text())
    ev2 = json.loads((two / "eval" / "eval.json").read_text())
    for key in ("true_reward", "true_reward_reference", "win_rate"):  # greedy answers: the same texts
        assert ev1[key] is not None and ev2[key] == pytest.approx(ev1[key], rel=0, abs=1e-9), key
    # The reward model's scores and the KL: models after 4 (reward) and 3 (PPO) updates (see the module docstring).
    for key in ("mean_score", "mean_score_reference", "kl"):
        assert ev1[key] is not None and ev2[key] == pytest.approx(ev1[key], rel=1e-2, abs=1e-6), key
    outputs = {n: json.loads((two / n / "stage_output.json").read_text()) for n in ("reward", "ppo", "eval")}
    assert outputs["reward"]["head"] == "sequence_classification" and outputs["ppo"]["kind"] == "adapter"


def test_generate_writes_the_one_process_dataset(runs):
    """Each process samples its share of the prompt groups, every sample from its own random stream: the data
    written (and every sample with its score) equals one process's, byte for byte."""
    one, two, _ = runs
    for name in ("data/train.jsonl", "samples.jsonl", "generation.json"):
        assert (two / "pairs" / name).read_text() == (one / "pairs" / name).read_text(), name
    assert len((one / "pairs" / "samples.jsonl").read_text().splitlines()) == 10


def test_distill_matches_one_process(runs):
    """Each process samples (on-policy steps) or reads (offline steps) its half of the rows, and weighs its token
    means by its share of the step's tokens: the one-process losses, KLs and held-out KL, and the same samples."""
    import torch
    from safetensors.torch import load_file

    one, two, _ = runs
    (rows1, final1), (rows2, final2) = _rows(one / "distill"), _rows(two / "distill")
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [1, 2, 3, 4]
    assert [r["on_policy"] for r in rows1] == [r["on_policy"] for r in rows2]
    assert {r["on_policy"] for r in rows1} == {0.0, 1.0}  # both kinds of step ran
    for a, b in zip(rows1, rows2):
        assert b["response_length"] == a["response_length"]  # the same samples, the same rows
        rel, tol = _tolerance(a["step"])
        for key in ("loss", "forward_kl", "reverse_kl"):
            assert b[key] == pytest.approx(a[key], rel=rel, abs=tol), (key, a["step"])
    assert final2["eval_forward_kl"] == pytest.approx(final1["eval_forward_kl"], rel=1e-2)
    assert final2["first_eval_forward_kl"] == pytest.approx(final1["first_eval_forward_kl"], rel=1e-5)
    a, b = (load_file(str(d / "distill" / "model" / "adapter_model.safetensors")) for d in (one, two))
    lora_b = [k for k in a if "lora_B" in k]  # zero at the start: their values are the update
    diff = torch.cat([(a[k] - b[k]).flatten() for k in lora_b]).norm()
    assert diff < 0.01 * torch.cat([a[k].flatten() for k in lora_b]).norm()
