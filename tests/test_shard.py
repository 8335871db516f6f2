"""alignlab's own loops sharded with FSDP2 (`parallel: {shard: fsdp2}`), on CPU: two gloo processes under
`accelerate launch --multi_gpu --num_processes 2`, each holding half of every parameter, its gradient and its AdamW
state.

- 2 sharded processes compute what 1 process computes at the same global batch (1 x 8 = 2 x 4), for grpo and ppo
  with LoRA (the reference: the SFT adapter's frozen copy, inside the sharded layers) and with full fine-tuning (the
  reference: a second, frozen model, sharded too), and for generate (the written dataset, byte for byte). The
  tolerances are tests/test_multiprocess.py's: float noise at step 1, 1% after AdamW updates, final weights within 1%
  of their update.
- sampling gathers the weights once per pass (the recipe's `parallel`), or layer by layer (the LoRA grpo stage's own
  `parallel: {gather: per_layer}`).
- stage_output.json records the sharding, with the parameter elements process 0 holds (about half).
- resume under sharding equals the uninterrupted run; a distributed checkpoint written by 2 processes loads on 1 and
  the other way round, to the bit (weights and AdamW state).
- a 1-process run that asks for fsdp2 says there is nothing to shard, and runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_multiprocess import _tolerance, launch_two_processes

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _recipe(output_dir, batch: int, peft: str) -> dict:
    """grpo (beta > 0: the reference runs) -> ppo -> generate, sharded; `batch`: per process. LoRA: after an SFT
    stage (DDP), grpo and ppo continue its adapter (the reference: its frozen copy). Full fine-tuning: from the base
    (the reference: a frozen copy of it), so both runs start from the same weights (full SFT's AdamW steps on 2
    processes already differ from 1 process's by float noise, which grows with every update)."""
    lora = peft == "lora"
    rl_lr = 1e-3 if lora else 1e-4
    prompts = {"path": "builtin:arith", "split": "sft", "size": 64}
    sft = {
        "name": "sft",
        "type": "sft",
        "dataset": prompts,
        "train": {"max_steps": 2, "per_device_batch_size": batch, "max_length": 48, "learning_rate": 3e-3},
    }
    start = "sft" if lora else "base"
    return {
        "name": "shard",
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {"name_or_path": "builtin:tiny-llama"},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0} if lora else {"method": "none"},
        "parallel": {"shard": "fsdp2"},
        "stages": [
            *([sft] if lora else []),
            {
                "name": "grpo",
                "type": "grpo",
                "train": {"max_steps": 3, "save_steps": 2, "epochs": 2, "learning_rate": rl_lr},
                "rollout": {"batch_size": batch // 2, "num_samples": 4, "max_new_tokens": 4},
                "input": start,
                # LoRA: this stage's own setting, each layer gathered whenever it runs (sampling steps in sync)
                **({"parallel": {"shard": "fsdp2", "gather": "per_layer"}} if lora else {}),
                "dataset": prompts,
                "reward_fn": "tests.test_ppo:length_reward",
                "beta": 0.1,
                "loss_agg": "token_mean",
                "watch_steps": None,
            },
            {
                "name": "ppo",
                "type": "ppo",
                "train": {"max_steps": 3, "epochs": 2, "minibatch_size": batch, "learning_rate": rl_lr},
                "input": start,
                "dataset": prompts,
                "reward_fn": "tests.test_ppo:length_reward",
                "rollout": {"batch_size": batch, "max_new_tokens": 4, "temperature": 1.0},
                "ppo": {"kl_coef": 0.05},
            },
            {
                "name": "pairs",
                "type": "generate",
                "rollout": {"num_samples": 3, "max_new_tokens": 4, "batch_size": 3},
                "input": "base",  # the same weights in both runs: the same samples, byte for byte
                "dataset": {"path": "builtin:arith", "split": "eval", "size": 10},
                "reward_fn": "alignlab.builtin.tasks:arith_reward",
                # 4 groups of prompts: 2 per process
            },
            *([_EVAL] if lora else []),
        ],
    }


# Sharded, every process runs the same evaluation; the policy is an adapter over the reference's weights (one
# backbone, the adapter switched off for the reference), as after a LoRA SFT stage.
_EVAL = {
    "name": "eval",
    "type": "eval",
    "rollout": {"max_new_tokens": 6, "batch_size": 4},
    "input": "sft",
    "reference": "base",
    "reward_fn": "alignlab.builtin.tasks:arith_reward",
    "dataset": {"path": "builtin:arith", "split": "eval", "size": 8},
    "num_prompts": 8,
}


def _run_one(recipe_path, *args) -> str:
    """`alignlab run` in one process (a subprocess: its log, with the 1-process sharding note, comes back)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "alignlab", "run", str(recipe_path), *args], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module", params=["lora", "full"])
def runs(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"shard-{request.param}")
    (tmp / "two.yaml").write_text(yaml.safe_dump(_recipe(tmp / "two", 4, request.param)))
    (tmp / "one.yaml").write_text(yaml.safe_dump(_recipe(tmp / "one", 8, request.param)))
    done = launch_two_processes(tmp / "two.yaml")
    assert done.returncode == 0, done.stderr[-4000:]
    log = _run_one(tmp / "one.yaml")
    return tmp, log, request.param


def _weights(stage_dir: Path) -> dict:
    from safetensors.torch import load_file

    model = stage_dir / "model" if (stage_dir / "model").is_dir() else stage_dir
    name = "adapter_model.safetensors" if (model / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(model / name))


def _assert_same_update(tmp: Path, stage: str, peft: str) -> None:
    """The two runs' final weights (adapter or full) differ by under 1% of what the stage changed (the norm of
    final - start), as tests/test_multiprocess.py holds DDP to."""
    import torch

    from alignlab.builtin import builtin_model_path

    a, b = _weights(tmp / "one" / stage), _weights(tmp / "two" / stage)
    start = _weights(tmp / "one" / "sft") if peft == "lora" else _weights(builtin_model_path("tiny-llama"))
    keys = sorted(set(a) & set(start))
    assert set(a) == set(b) and len(keys) >= len(a) - 1  # a full model may store its tied LM head or not
    diff = torch.cat([(a[k] - b[k]).flatten() for k in keys]).norm()
    update = torch.cat([(a[k] - start[k]).flatten() for k in keys]).norm()
    assert update > 0 and diff < 0.01 * update, (float(diff), float(update))


def _rows(stage_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if not r.get("final")]


def _assert_rows_match(rows1, rows2, same: tuple, close: tuple) -> None:
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2]
    for a, b in zip(rows1, rows2):
        for key in same:  # the same samples: each response has its own random stream, wherever it is sampled
            assert b[key] == pytest.approx(a[key], rel=0, abs=1e-6), (key, a["step"])
        rel, tol = _tolerance(a["step"])
        for key in close:
            assert b[key] == pytest.approx(a[key], rel=rel, abs=tol), (key, a["step"])


def test_sharded_grpo_matches_one_process(runs):
    tmp, _, peft = runs
    rows1, rows2 = _rows(tmp / "one" / "grpo"), _rows(tmp / "two" / "grpo")
    assert len(rows1) == 3
    _assert_rows_match(
        rows1, rows2, ("response_length", "reward"), ("policy_loss", "kl", "entropy", "ratio", "clip_low_frac")
    )
    assert rows1[-1]["kl"] > 1e-4  # the policy moved off the reference: the comparison covers updates
    _assert_same_update(tmp, "grpo", peft)


def test_sharded_ppo_matches_one_process(runs):
    """PPO's value head is in the root unit, gathered with the embeddings and the LM head."""
    tmp, _, peft = runs
    rows1, rows2 = _rows(tmp / "one" / "ppo"), _rows(tmp / "two" / "ppo")
    _assert_rows_match(
        rows1, rows2, ("response_length", "score"), ("kl", "policy_loss", "value_loss", "entropy", "clipfrac")
    )
    assert rows1[-1]["value_loss"] > 0
    _assert_same_update(tmp, "ppo", peft)
    from safetensors.torch import load_file

    v1, v2 = (load_file(str(tmp / d / "ppo" / "value_head.safetensors")) for d in ("one", "two"))
    assert set(v1) == set(v2) == {"weight", "bias"}
    for k in v1:  # the value head, gathered from its shards
        assert v2[k].shape == v1[k].shape and float((v2[k] - v1[k]).abs().max()) < 1e-2 * float(v1[k].abs().max())


def test_sharded_generate_writes_the_one_process_dataset(runs):
    tmp, _, _ = runs
    for name in ("data/train.jsonl", "samples.jsonl"):
        assert (tmp / "two" / "pairs" / name).read_text() == (tmp / "one" / "pairs" / name).read_text(), name


def test_sharded_eval_matches_one_process(runs):
    tmp, _, peft = runs
    if peft != "lora":
        pytest.skip("the LoRA recipe evaluates")
    ev1, ev2 = (json.loads((tmp / d / "eval" / "eval.json").read_text()) for d in ("one", "two"))
    for key in ("true_reward", "true_reward_reference", "win_rate"):  # greedy answers: the same texts
        assert ev1[key] is not None and ev2[key] == pytest.approx(ev1[key], rel=0, abs=1e-9), key
    assert ev2["kl"] == pytest.approx(ev1["kl"], rel=1e-2, abs=1e-6)
    record = json.loads((tmp / "two" / "eval" / "stage_output.json").read_text())["parallel"]
    assert record == {"shard": "fsdp2", "world_size": 2}


def test_stage_output_records_the_sharding(runs):
    tmp, log, peft = runs
    for stage in ("grpo", "ppo", "pairs"):
        one = json.loads((tmp / "one" / stage / "stage_output.json").read_text())["parallel"]
        two = json.loads((tmp / "two" / stage / "stage_output.json").read_text())["parallel"]
        assert one["shard"] == "none" and one["world_size"] == 1
        assert two["shard"] == "fsdp2" and two["world_size"] == 2
        # Process 0 holds half of every tensor's rows (a tensor of odd rows: one more): about half of the elements.
        assert 0.5 * one["params_per_rank"] <= two["params_per_rank"] < 0.51 * one["params_per_rank"], stage
    assert "parallel.shard fsdp2 with one process: nothing to shard" in log
    kind = json.loads((tmp / "two" / "grpo" / "stage_output.json").read_text())["kind"]
    assert kind == ("adapter" if peft == "lora" else "full")


def test_sharded_model_is_an_ordinary_folder(runs):
    """The stage's model is gathered into whole tensors: transformers (and PEFT) load it as they load any model,
    and it matches the one-process model to the 1% the update rule allows."""
    import torch
    from transformers import AutoModelForCausalLM

    tmp, _, peft = runs
    folder = tmp / "two" / "grpo" / "model"
    if peft == "lora":
        from peft import AutoPeftModelForCausalLM

        assert not (folder / "ref").exists()  # the reference's frozen copy is not part of the output
        model = AutoPeftModelForCausalLM.from_pretrained(folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == model.config.vocab_size


def _truncate(run: Path, stages: list[str], keep_step: int) -> None:
    """A run cut off after `keep_step`'s checkpoint: the stages' outputs and later checkpoints gone."""
    for stage in stages:
        d = run / stage
        shutil.rmtree(d / "model", ignore_errors=True)
        (d / "stage_output.json").unlink(missing_ok=True)
        for ckpt in (d / "checkpoints").glob("step-*"):
            if int(ckpt.name.split("-")[1]) > keep_step:
                shutil.rmtree(ckpt)


def test_sharded_resume_equals_uninterrupted(runs):
    """grpo cut off after its step-2 checkpoint (a distributed checkpoint: each process wrote its shards), resumed by
    two sharded processes: the same rows and final adapter as the uninterrupted run."""
    tmp, _, peft = runs
    if peft != "lora":
        pytest.skip("one resume run covers the sharded checkpoint path; the full fine-tuning runs share it")
    resumed = tmp / "resumed"
    shutil.copytree(tmp / "two", resumed)
    assert (resumed / "grpo" / "checkpoints" / "step-2" / "dcp").is_dir()
    _truncate(resumed, ["grpo", "pairs"], keep_step=2)
    recipe = _recipe(resumed, 4, peft)
    (tmp / "resumed.yaml").write_text(yaml.safe_dump(recipe))
    done = launch_two_processes(tmp / "resumed.yaml", "--resume")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resumed from" in done.stdout + done.stderr
    rows, rows2 = _rows(tmp / "two" / "grpo"), _rows(resumed / "grpo")
    assert [r["step"] for r in rows2] == [1, 2, 3]
    for a, b in zip(rows, rows2):
        for key in ("reward", "policy_loss", "kl", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-8), (key, a["step"])
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "grpo" / "model" / "adapter_model.safetensors")) for d in (tmp / "two", resumed))
    for k in a:
        assert float((a[k] - b[k]).abs().max()) <= 1e-6 * max(1.0, float(a[k].abs().max())), k


# ------------------------------------------------------------------------------- checkpoints across process counts


def _checkpoint_worker(mode: str, folder: str, out: str) -> None:
    """Run under 1 or 2 processes: `save` takes one AdamW step on a fixed loss and writes checkpoint step-1 in
    `folder`; `load` reads it into a fresh model. Both write the whole trainable weights and AdamW state to `out`."""
    import torch
    from accelerate import Accelerator, PartialState
    from peft import LoraConfig, get_peft_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.builtin import builtin_model_path
    from alignlab.parallel import Sharding
    from alignlab.rl.loop import RLTrainer
    from alignlab.schema import LoopTrainSpec, ParallelSpec

    class Probe(RLTrainer):
        name, headline = "probe", "loss"

    PartialState(cpu=True)  # as `alignlab run` starts on a machine without GPUs: gloo over CPU processes
    acc = Accelerator()
    path = builtin_model_path("tiny-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    train = LoopTrainSpec(max_steps=1, save_total_limit=None, learning_rate=1e-2)
    spec = type("Spec", (), {"train": train})()
    sharding = Sharding(ParallelSpec(shard="fsdp2"), acc, "probe")
    trainer = Probe(
        accelerator=acc, policy=model, tokenizer=AutoTokenizer.from_pretrained(path), prompts=[], reference=None,
        spec=spec, seed=0, stage_dir=Path(folder), sharding=sharding,
    )  # fmt: skip
    trainer._prepare(model, lr=1e-2, weight_decay=0.01)
    if mode == "save":
        ids = torch.arange(3, 19).reshape(2, 8)
        loss = trainer.model(input_ids=ids, labels=ids).loss
        trainer._update(loss, max_grad_norm=1.0)
        trainer.step = 1
        trainer.save_checkpoint()
    else:
        trainer.load_checkpoint(Path(folder) / "checkpoints" / "step-1")
        assert trainer.step == 1
    full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights, optim = get_state_dict(trainer.model, trainer.optimizer, options=full)
    if acc.is_main_process:
        torch.save({"weights": weights, "optim": optim["state"]}, out)
    acc.wait_for_everyone()


def test_checkpoint_before_any_update_holds_no_optimizer_state(tmp_path, tiny_model_path):
    """A checkpoint written before AdamW's first step (GRPO with every group flat until then) holds the weights only:
    reading AdamW's state would make one up (a step with zero moments, shifting every later bias correction), in the
    run that saves as in the one that resumes. Only trainable tensors go in (not the embeddings a frozen LM head is
    tied to)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.parallel import Sharding
    from alignlab.rl.loop import RLTrainer
    from alignlab.schema import LoopTrainSpec, ParallelSpec

    class Probe(RLTrainer):
        name, headline = "probe", "loss"

    def trainer(folder):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        acc = Accelerator(cpu=True)
        train = LoopTrainSpec(max_steps=1, save_total_limit=None, learning_rate=1e-2)
        spec = type("Spec", (), {"train": train})()
        t = Probe(
            accelerator=acc, policy=model, tokenizer=AutoTokenizer.from_pretrained(tiny_model_path), prompts=[],
            reference=None, spec=spec, seed=0, stage_dir=folder, sharding=Sharding(ParallelSpec(shard="fsdp2"), acc, "p"),
        )  # fmt: skip
        t._prepare(model, lr=1e-2)
        return t

    saver = trainer(tmp_path)
    saver.save_checkpoint()
    assert not saver.optimizer.state  # saving made no step up
    keys = dcp.FileSystemReader(str(tmp_path / "checkpoints" / "step-0" / "dcp")).read_metadata().state_dict_metadata
    assert keys and all(k.startswith("model.") and ".lora_" in k for k in keys), sorted(keys)[:5]
    loader = trainer(tmp_path)
    loader.load_checkpoint(tmp_path / "checkpoints" / "step-0")
    assert not loader.optimizer.state and loader.step == 0


def _launch_worker(processes: int, mode: str, folder: Path, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "--num_processes", str(processes)]
    cmd += ["--multi_gpu"] if processes > 1 else ["--cpu"]
    cmd += [str(Path(__file__)), mode, str(folder), str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize(("writers", "readers"), [(2, 1), (1, 2)])
def test_distributed_checkpoint_loads_on_another_process_count(tmp_path, writers, readers):
    import torch

    _launch_worker(writers, "save", tmp_path / "run", tmp_path / "saved.pt")
    assert (tmp_path / "run" / "checkpoints" / "step-1" / "dcp").is_dir()
    _launch_worker(readers, "load", tmp_path / "run", tmp_path / "loaded.pt")
    saved, loaded = (torch.load(tmp_path / f, weights_only=False) for f in ("saved.pt", "loaded.pt"))
    assert set(saved["weights"]) == set(loaded["weights"]) and any(".lora_B." in k for k in saved["weights"])
    for k, v in saved["weights"].items():
        assert torch.equal(v, loaded["weights"][k]), k
    assert set(saved["optim"]) == set(loaded["optim"])
    for k, state in saved["optim"].items():
        assert float(state["step"]) == float(loaded["optim"][k]["step"]) == 1.0
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name], loaded["optim"][k][name]), (k, name)
    # the step happened (LoRA's B starts at 0, so its gradients are not): AdamW's state is not the zeros it starts at
    assert sum(float(s["exp_avg_sq"].abs().sum()) for s in saved["optim"].values()) > 0


if __name__ == "__main__":
    _checkpoint_worker(*sys.argv[1:4])
