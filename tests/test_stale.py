"""No stale results: a rerun reuses a finished stage only while the recipe still describes what it was trained with.

One run folder, SFT (LoRA, on a local JSON-lines file) -> DPO (precomputed reference log-probs), one step each, is
rerun with changed settings: a changed learning rate or data file stops the rerun, naming the key and both values,
before anything trains; a changed logging_steps does not; `--force` retrains, and the stages trained from an older
model are stale in turn. The run folder's recipe.yaml describes what was trained throughout. `--resume` continues
only checkpoints made with the recipe's settings; a changed setting starts the stage over. The cached
reference log-probs follow what is fed: a changed max_length computes new ones, `--force` never reads old ones.
"""

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from alignlab.cli import main
from alignlab.contract import StageOutput
from tests.helpers import lora, make_recipe

pytestmark = pytest.mark.slow
TRAIN = {"max_steps": 1, "per_device_batch_size": 4, "max_length": 32, "logging_steps": 1, "learning_rate": 0.001}


def _recipe(tmp, stages):
    return make_recipe(stages, tmp / "run", name="stale", peft=lora(r=4, alpha=8, dropout=None))


SFT = {"name": "sft", "type": "sft", "dataset": {"path": "sft.jsonl"}, "train": dict(TRAIN)}
DPO = {
    "name": "dpo",
    "type": "dpo",
    "dataset": {"path": "builtin:arith", "split": "preference", "size": 8, "eval_size": 4},
    "precompute_ref_logps": True,
    "train": dict(TRAIN),  # a copy: one dict twice would be dumped as a YAML alias, and an override change both
}


def _write(tmp, stages, name="r.yaml"):
    (tmp / name).write_text(yaml.safe_dump(_recipe(tmp, stages), sort_keys=False))
    return str(tmp / name)


def _record(run, stage) -> StageOutput:
    return StageOutput.load(run / stage)


def _written(run, stage) -> int:
    return (run / stage / "stage_output.json").stat().st_mtime_ns


def _trained_lr(run, stage, recipe_file="recipe.yaml") -> float:
    raw = yaml.safe_load((run / recipe_file).read_text())
    return next(s for s in raw["stages"] if s["name"] == stage)["train"]["learning_rate"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from alignlab.builtin import write_task

    tmp = tmp_path_factory.mktemp("stale")
    write_task("arith", "sft", tmp / "sft.jsonl", 16)
    recipe = _write(tmp, [SFT, DPO])
    assert main(["run", recipe]) == 0
    return tmp, recipe


def test_keys_that_change_no_result_reuse_the_finished_stages(finished):
    tmp, recipe = finished
    run = tmp / "run"
    before, text = {s: _written(run, s) for s in ("sft", "dpo")}, (run / "recipe.yaml").read_text()
    quiet = ["stages.sft.train.logging_steps=5", "stages.dpo.train.save_steps=3", "stages.dpo.train.report_to=[]"]
    assert main(["run", recipe, *quiet]) == 0
    assert {s: _written(run, s) for s in before} == before  # nothing trained again
    assert (run / "recipe.yaml").read_text() == text  # nothing ran: the record of what was trained stays


def test_changed_learning_rate_stops_the_rerun(finished, capsys):
    tmp, recipe = finished
    run = tmp / "run"
    before, text = {s: _written(run, s) for s in ("sft", "dpo")}, (run / "recipe.yaml").read_text()
    assert main(["run", recipe, "stages.dpo.train.learning_rate=0.002"]) == 2
    err = capsys.readouterr().err
    assert f"stage 'dpo' ({run / 'dpo'}):\n    train.learning_rate: 0.001 -> 0.002\n" in err
    assert "stage 'sft'" not in err  # unchanged, and not named
    assert "add --force (retrains every stage of the recipe), or --stage dpo --force" in err
    assert f"restore the settings above ({run}/<stage>/recipe.yaml holds the recipe" in err
    assert {s: _written(run, s) for s in before} == before
    assert (run / "recipe.yaml").read_text() == text and _trained_lr(run, "dpo") == 0.001
    assert _record(run, "dpo").origin["parts"]["train.learning_rate"] == 0.001


def test_changed_data_file_stops_the_rerun(finished, capsys):
    tmp, recipe = finished
    data, run = tmp / "sft.jsonl", tmp / "run"
    original = data.read_text()
    old = _record(run, "sft").origin["parts"]["dataset.content"]
    data.write_text("".join(original.splitlines(keepends=True)[:-1]))  # one row fewer
    try:
        assert main(["run", recipe]) == 2
    finally:
        data.write_text(original)
    err = capsys.readouterr().err
    assert (
        f"stage 'sft' ({run / 'sft'}):\n    dataset.content (the data dataset.path holds): {old[:19]} -> sha256:" in err
    )
    assert "stage 'dpo'" not in err.split("To go on")[0]  # dpo itself is as trained (its input is sft's record)


def test_a_single_stage_run_checks_the_stages_it_starts_from(finished, capsys):
    tmp, recipe = finished
    run = tmp / "run"
    before = _written(run, "dpo")
    assert main(["run", recipe, "--stage", "dpo", "stages.sft.train.learning_rate=0.01"]) == 2
    err = capsys.readouterr().err
    assert f"stage 'sft' ({run / 'sft'}):\n    train.learning_rate: 0.001 -> 0.01\n" in err
    assert "--stage sft --force" in err
    assert _written(run, "dpo") == before


def test_force_retrains_and_the_stages_trained_from_the_old_model_are_stale(finished, capsys):
    """Runs last: it retrains the module's run."""
    tmp, recipe = finished
    run = tmp / "run"
    old_sft = _record(run, "sft").origin["attempt"]
    # Retrain sft alone with a new learning rate; dpo (whose recipe now also says another lr) does not run.
    assert main(["run", recipe, "--stage", "sft", "--force", "stages.sft.train.learning_rate=0.002",
                 "stages.dpo.train.learning_rate=0.005"]) == 0  # fmt: skip
    new_sft = _record(run, "sft").origin["attempt"]
    assert new_sft != old_sft and _record(run, "sft").origin["parts"]["train.learning_rate"] == 0.002
    # The folder's recipe.yaml: sft as retrained now, dpo as it was trained (0.001), not as the command said.
    assert (_trained_lr(run, "sft"), _trained_lr(run, "dpo")) == (0.002, 0.001)
    assert _trained_lr(run, "sft", "sft/recipe.yaml") == 0.002
    # dpo was trained from the old sft: stale, whatever its own settings.
    assert main(["run", recipe, "stages.sft.train.learning_rate=0.002"]) == 2
    err = capsys.readouterr().err
    assert (
        f"stage 'dpo' ({run / 'dpo'}):\n    input: stage 'sft' (trained {old_sft}) -> stage 'sft' (trained {new_sft})"
        in err
    )
    # --force: every stage again, dpo from the new sft.
    before = _written(run, "dpo")
    assert main(["run", recipe, "--force", "stages.sft.train.learning_rate=0.002"]) == 0
    dpo = _record(run, "dpo")
    assert _written(run, "dpo") != before
    assert dpo.origin["parts"]["input"]["attempt"] == _record(run, "sft").origin["attempt"] != new_sft
    assert (_trained_lr(run, "sft"), _trained_lr(run, "dpo")) == (0.002, 0.001)
    assert main(["run", recipe, "stages.sft.train.learning_rate=0.002"]) == 0  # and now it all fits


# ----------------------------------------------------------------------------------------------- --resume

SFT3 = {**SFT, "train": {**TRAIN, "max_steps": 3, "save_steps": 1}}


class Killed(Exception):
    """Stands in for a SIGKILL: ends the run without any handler noting a diagnosis."""


def _resumed_from(run) -> list[str]:
    return [line.split("resuming from ")[1] for line in (run / "logs" / "run.0.log").read_text().splitlines()
            if "resuming from" in line]  # fmt: skip


def test_resume_continues_only_checkpoints_made_with_the_same_settings(tmp_path, monkeypatch, capsys):
    from alignlab.builtin import write_task
    from alignlab.stages.sft import GuardedSFTTrainer

    write_task("arith", "sft", tmp_path / "sft.jsonl", 16)
    recipe, run = _write(tmp_path, [SFT3]), tmp_path / "run"
    real_step = GuardedSFTTrainer.training_step

    def killed_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise Killed()
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(GuardedSFTTrainer, "training_step", killed_at_step_3)
    with pytest.raises(Killed):
        main(["run", recipe])
    monkeypatch.undo()
    attempt = json.loads((run / "sft" / "started.json").read_text())["attempt"]
    ckpts = run / "sft" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    assert main(["run", recipe, "--resume", "stages.sft.train.learning_rate=0.002"]) == 2
    err = capsys.readouterr().err
    assert (
        f"stage 'sft': its checkpoints in {ckpts} were made with other settings than the recipe now has:\n"
        f"    train.learning_rate: 0.001 -> 0.002\nEither restore those settings" in err
    )
    assert (ckpts / "checkpoint-2").exists() and not (run / "sft" / "stage_output.json").exists()

    assert main(["run", recipe, "--resume"]) == 0
    assert _resumed_from(run) == [f"{ckpts / 'checkpoint-2'} (step 2)"]
    sft = _record(run, "sft")
    assert sft.origin["attempt"] == attempt and "resumed_with_changes" not in sft.origin


def test_after_a_nan_stop_a_changed_setting_starts_the_stage_over(tmp_path, monkeypatch, capsys):
    """A checkpoint restores the learning-rate schedule it was made with, so a lower learning rate cannot continue
    it: --resume stops; without --resume the stage starts over with the new rate (the old checkpoints deleted, so a
    later --resume cannot pick them up). Linear decay over 3 steps: step 1 at the full rate 0.0005."""
    from alignlab.builtin import write_task
    from alignlab.stages.sft import GuardedSFTTrainer

    write_task("arith", "sft", tmp_path / "sft.jsonl", 16)
    recipe, run = _write(tmp_path, [SFT3]), tmp_path / "run"
    real_loss = GuardedSFTTrainer.compute_loss

    def nan_at_step_3(self, *args, **kwargs):
        loss = real_loss(self, *args, **kwargs)
        return loss * math.nan if self.state.global_step == 2 else loss

    monkeypatch.setattr(GuardedSFTTrainer, "compute_loss", nan_at_step_3)
    assert main(["run", recipe]) == 1
    monkeypatch.undo()
    assert "change the setting and run again without --resume to start the stage over" in capsys.readouterr().err
    assert main(["run", recipe, "--resume", "stages.sft.train.learning_rate=0.0005"]) == 2
    assert "train.learning_rate: 0.001 -> 0.0005" in capsys.readouterr().err

    def checkpoint_deleted(self, *args, **kwargs):  # the first step of the new attempt: no old checkpoint left
        if self.state.global_step == 0:
            assert not list((run / "sft" / "checkpoints").glob("checkpoint-*"))
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(GuardedSFTTrainer, "compute_loss", checkpoint_deleted)
    assert main(["run", recipe, "stages.sft.train.learning_rate=0.0005"]) == 0
    rows = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["learning_rate"]) for r in rows if "loss" in r][0] == (1, 0.0005)
    assert _resumed_from(run) == []
    assert _record(run, "sft").origin["parts"]["train.learning_rate"] == 0.0005


# ------------------------------------------------------------------------------------ reference log-probs


def test_reference_logps_cache_follows_max_length_and_force_never_reads_it(tmp_path):
    """Chosen completions are 21 tokens with their prompt, rejected ones 21 to 37 (tiny-llama's tokenizer): at
    max_length 24 the collator cuts 5 of the 8 rejected completions, so their reference log-probs change. Before
    the fix the cache key read the tokenised table, which truncation does not touch: the old values came back."""

    def dpo(max_length, out):
        return _write(tmp_path, [{**DPO, "input": "base", "train": {**TRAIN, "max_length": max_length}}], out + ".yaml")

    def caches(run):
        return sorted((run / "dpo" / "ref_logps").glob("train-*.safetensors"))

    run = tmp_path / "run"
    assert main(["run", dpo(64, "a")]) == 0
    [first] = caches(run)
    full = load_file(str(first))
    # --force starts over: a cache file where the key points (tampered here) is not read.
    save_file({k: torch.zeros_like(v) for k, v in full.items()}, str(first))
    assert main(["run", dpo(64, "a"), "--force"]) == 0
    assert caches(run) == [first] and torch.equal(load_file(str(first))["ref_chosen_logps"], full["ref_chosen_logps"])

    # The stage did not finish (as after a crash), and max_length changed: its rerun computes new log-probs.
    (run / "dpo" / "stage_output.json").unlink()
    assert main(["run", dpo(24, "a")]) == 0
    [cut] = [p for p in caches(run) if p != first]
    truncated = load_file(str(cut))
    # Chosen (21 tokens) are not cut: equal up to float noise (batches are padded to other lengths).
    assert torch.allclose(truncated["ref_chosen_logps"], full["ref_chosen_logps"], atol=1e-4)
    moved = (truncated["ref_rejected_logps"] - full["ref_rejected_logps"]).abs()
    # Rejected lengths 36 31 36 21 21 21 29 37: 5 to 13 tokens fewer, each about -10 nats under the tiny model.
    assert [d > 10 for d in moved.tolist()] == [True, True, True, False, False, False, True, True]
    assert moved[3:6].max() < 1e-4
    # ... and they are what a run that never had a cache computes.
    (tmp_path / "fresh.yaml").write_text((tmp_path / "a.yaml").read_text().replace(str(run), str(tmp_path / "fresh")))
    assert main(["run", str(tmp_path / "fresh.yaml")]) == 0
    [fresh] = caches(tmp_path / "fresh")
    assert fresh.name == cut.name and torch.equal(
        load_file(str(fresh))["ref_rejected_logps"], truncated["ref_rejected_logps"]
    )


def test_a_builtin_reward_is_fingerprinted_by_its_checker_source():
    """`reward_fn: builtin:constraints` recorded "unreadable: No module named 'builtin'" (it was read as module
    `builtin`), so a change of the checker never made a PPO/GRPO/generate stage stale. Its digest is the source of
    the module the reward function lives in."""
    import hashlib
    import inspect

    import alignlab.builtin.constraints as checker
    from alignlab.fingerprint import reward_fn_digest

    expected = "sha256:" + hashlib.sha256(inspect.getsource(checker).encode()).hexdigest()
    assert reward_fn_digest("builtin:constraints") == expected
    assert reward_fn_digest("builtin:nope").startswith("unreadable: unknown built-in reward function 'builtin:nope'")


def test_what_changes_a_result_is_declared_by_the_stage_type(tmp_path, capsys):
    """A grpo stage with stop_if schedules its greedy probe by train.save_steps and ends on a checkpoint that
    train.save_total_limit may have deleted: both change its result there (its record's log_only), so changing
    either stops the rerun, while train.logging_steps still does not. Without stop_if they are logging keys again."""
    from alignlab.fingerprint import recipe_settings
    from alignlab.recipe import parse_recipe
    from tests.helpers import make_stage

    grpo = make_stage(
        "grpo", dataset={"path": "builtin:arith", "split": "sft", "size": 8}, reward_fn="tests.helpers:length_reward",
        max_steps=2, batch_size=2, num_samples=2, max_new_tokens=4, save_steps=1, watch_steps=None,
        stop_if={"repetition": 1.0},
    )  # fmt: skip
    recipe = _write(tmp_path, [grpo])
    assert main(["run", recipe]) == 0
    run = tmp_path / "run"
    for key, old, new in (("save_steps", 1, 2), ("save_total_limit", 2, 1)):
        assert main(["run", recipe, f"stages.grpo.train.{key}={new}"]) == 2
        assert f"stage 'grpo' ({run / 'grpo'}):\n    train.{key}: {old} -> {new}\n" in capsys.readouterr().err
    assert main(["run", recipe, "stages.grpo.train.logging_steps=2"]) == 0

    def settings(**train):
        stage = {**grpo, "train": {**grpo["train"], **train}}
        stage.pop("stop_if")
        return recipe_settings(parse_recipe(_recipe(tmp_path, [stage])))

    assert settings() == settings(save_steps=2, save_total_limit=1, logging_steps=2)
