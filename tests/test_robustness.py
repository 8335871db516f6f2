"""`alignlab bench robustness`: the grid it builds, and a tiny run where label noise visibly hurts DPO."""

import json

import pytest
import yaml

from alignlab.benchmarks.robustness import (
    LOSS_PARAMS,
    PRESETS,
    audit_settings,
    build_recipe,
    cell_name,
    over_seeds,
    seed_recipes,
    table,
    with_audited_eps,
)
from alignlab.cli import main
from alignlab.recipe import RecipeError
from tests.helpers import alignlab_beside, assert_reused, copy_run


def test_grid_is_one_recipe_from_one_sft_checkpoint():
    recipe = build_recipe("small", losses=("dpo", "rdpo", "kldpo"), flip_rates=(0.0, 0.4), output_dir="x")
    names = [s.name for s in recipe.stages]
    assert names[0] == "sft" and len(names) == 1 + 2 * 3 * 2
    dpo = [s for s in recipe.stages if s.type == "dpo"]
    assert {(s.loss.name, s.dataset.flip_rate) for s in dpo} == {
        (loss, f) for loss in ("dpo", "rdpo", "kldpo") for f in (0.0, 0.4)
    }
    assert all(s.input == "sft" and s.precompute_ref_logps for s in dpo)
    rdpo = next(s for s in dpo if s.loss.name == "rdpo")
    assert rdpo.loss.model_dump()["eps"] == LOSS_PARAMS["rdpo"]["eps"]
    evals = [s for s in recipe.stages if s.type == "eval"]
    assert [s.input for s in evals] == [s.name for s in dpo]
    # Every cell is measured against the same SFT model, on held-out prompts and clean held-out pairs.
    assert {
        (s.reference, s.dataset.split, s.preference_dataset.split, s.preference_dataset.flip_rate) for s in evals
    } == {("sft", "eval", "preference_eval", 0.0)}
    # The full preset (for a GPU) names a hub model; it still builds offline.
    assert build_recipe("full").model.name_or_path.startswith("Qwen/")


def test_bad_bench_arguments_name_the_choices():
    with pytest.raises(RecipeError, match="known presets: small, smollm2, full"):
        build_recipe("huge")
    with pytest.raises(RecipeError, match="the bench knows: dpo, cdpo"):
        build_recipe("small", losses=("dpo", "ppo"))


def test_new_losses_in_the_grid():
    """ln_dpo, simpo and orpo are bench losses, with their own beta (per-token averages); the reference-free ones
    precompute no reference log-probs (there is no reference)."""
    recipe = build_recipe("small", losses=("ln_dpo", "simpo", "orpo"), flip_rates=(0.2,), output_dir="x")
    cells = {s.loss.name: s for s in recipe.stages if s.type == "dpo"}
    assert {n: (c.loss.beta, c.precompute_ref_logps) for n, c in cells.items()} == {
        "ln_dpo": (5.0, True),
        "simpo": (2.0, False),
        "orpo": (0.1, False),
    }
    assert cells["simpo"].loss.params == {"gamma": 1.0}


def test_kto_cell_reads_the_pairs_as_feedback_with_twice_the_batch():
    """kto is a bench loss: a kto stage on the cell's (flipped) pairs, the preset's beta, and two feedback rows per
    pair, so twice the dpo cells' batch (the same steps, each on the same pairs' answers); no eps."""
    recipe = build_recipe("smollm2", losses=("dpo", "kto"), flip_rates=(0.4,), output_dir="x")
    dpo, kto = (s for s in recipe.stages if s.name in ("dpo-flip40", "kto-flip40"))
    assert (kto.type, kto.input, kto.beta, kto.dataset) == ("kto", "base", dpo.loss.beta, dpo.dataset)
    assert kto.train.per_device_batch_size == 2 * dpo.train.per_device_batch_size
    assert kto.train.learning_rate == dpo.train.learning_rate and kto.train.epochs == dpo.train.epochs
    assert recipe.stage("eval-kto-flip40").input == "kto-flip40"


def test_table_layout():
    rows = [
        {"loss": "dpo", "flip_rate": 0.0, "true_reward": 0.5},
        {"loss": "dpo", "flip_rate": 0.4, "true_reward": 0.25},
        {"loss": "rdpo", "flip_rate": 0.0, "true_reward": 0.75},
    ]
    assert table(rows, "true_reward").splitlines() == [
        "| loss | flip 0 | flip 0.4 |",
        "|---|---:|---:|",
        "| dpo | 0.500 | 0.250 |",
        "| rdpo | 0.750 |  |",
    ]


def test_seeds_run_the_whole_bench_once_per_seed(tmp_path):
    recipe = build_recipe("small", losses=("dpo",), flip_rates=(0.0,), output_dir=str(tmp_path / "b"), seed=3)
    assert seed_recipes(recipe, 1) == [recipe]  # the default: the bench as it was, in --out itself
    runs = seed_recipes(recipe, 3)
    assert [r.seed for r in runs] == [3, 4, 5]
    assert [r.run_dir for r in runs] == [tmp_path / "b" / f"seed-{s}" for s in (3, 4, 5)]
    assert all([s.name for s in r.stages] == [s.name for s in recipe.stages] for r in runs)
    with pytest.raises(RecipeError, match="--seeds must be at least 1"):
        seed_recipes(recipe, 0)


def test_cells_over_seeds_report_mean_and_spread():
    """true_reward 0.2, 0.3, 0.4 over three seeds: mean 0.3, sample std 0.1, every value kept in seed order."""
    per_seed = [
        [{"loss": "dpo", "flip_rate": 0.2, "true_reward": v, "kl": 1.0, "true_reward_sft": 0.1}]
        for v in (0.2, 0.3, 0.4)
    ]
    (row,) = over_seeds(per_seed)
    assert row["true_reward"] == pytest.approx(0.3) and row["true_reward_std"] == pytest.approx(0.1)
    assert row["true_reward_values"] == [0.2, 0.3, 0.4] and (row["true_reward_min"], row["true_reward_max"]) == (
        0.2,
        0.4,
    )
    assert row["kl_std"] == 0.0 and row["preference_accuracy"] is None and row["seeds"] == 3
    assert table([row], "true_reward").splitlines()[-1] == "| dpo | 0.300 ± 0.100 |"


@pytest.mark.slow
def test_flipping_every_label_turns_held_out_accuracy_below_chance(tmp_path, capsys, sft_lora_run):
    """DPO on clean labels ranks held-out pairs right; on fully flipped labels it learns the opposite. So does KTO on
    the same pairs read as feedback rows (chosen desirable): the flips reach it through the pairs. The cells start
    from the preset's SFT stage, the session's shared SFT-LoRA run (tests/helpers.py), copied into the bench's
    folder: reused as finished. One bench per flip rate, both losses each, side by side (every stage starts from the
    recipe's seed: a cell's result does not depend on the cells run before it)."""

    def bench(flip_rate: str, out):
        cells = [cell_name(loss, float(flip_rate)) for loss in ("dpo", "kto")]
        small = [x for c in cells for x in (f"stages.{c}.dataset.size=480", f"stages.eval-{c}.num_prompts=16")]
        copy_run(sft_lora_run, out)
        return ["bench", "robustness", "--losses", "dpo,kto", "--flip-rates", flip_rate, "--out", str(out), *small]

    clean, flipped = tmp_path / "b0", tmp_path / "b1"
    with alignlab_beside(bench("1", flipped), log=tmp_path / "b1.log"):
        assert main(bench("0", clean)) == 0
    rows = {}
    for out in (clean, flipped):
        assert_reused(sft_lora_run, out)
        rows.update({(r["loss"], r["flip_rate"]): r for r in json.loads((out / "robustness.json").read_text())["rows"]})
        assert (out / "robustness.png").stat().st_size > 0
    # Measured: DPO 0.86 on clean labels, 0.125 with every label flipped; KTO 0.85 and 0.125 (from a 60-step SFT:
    # 0.875, 0.145; 0.88, 0.16).
    assert rows["dpo", 0.0]["preference_accuracy"] > 0.7
    assert rows["dpo", 1.0]["preference_accuracy"] < 0.3
    assert rows["kto", 0.0]["preference_accuracy"] > 0.7
    assert rows["kto", 1.0]["preference_accuracy"] < 0.3
    assert set(rows["dpo", 0.0]) >= {"true_reward", "true_reward_sft", "win_rate", "kl", "preference_margin"}
    for out in (capsys.readouterr().out, (tmp_path / "b1.log").read_text()):
        assert "| dpo |" in out and "| kto |" in out


def test_smollm2_preset_pairs_from_the_base_model_and_clean_held_out_pairs():
    """The real-model preset: the base model's own answers ranked by the checker (generate stages), DPO cells from
    the base model (no SFT stage), measured on held-out pairs of the eval split whose labels never flip."""
    recipe = build_recipe("smollm2", output_dir="x")
    gen = [s for s in recipe.stages if s.type == "generate"]
    assert [(s.name, s.dataset.split, s.output, s.input) for s in gen] == [
        ("pairs", "train", "preference", "base"),
        ("pairs-eval", "eval", "preference", "base"),
    ]
    assert "sft" not in [s.name for s in recipe.stages]
    cells = [s for s in recipe.stages if s.type == "dpo"]
    evals = [s for s in recipe.stages if s.type == "eval"]
    assert {(s.input, s.dataset.path) for s in cells} == {("base", "stage:pairs")}
    assert {(s.reference, s.preference_dataset.path, s.preference_dataset.flip_rate) for s in evals} == {
        ("base", "stage:pairs-eval", 0.0)
    }
    # The preset's own grid (README: the power calculation), unless --losses / --flip-rates say otherwise.
    grid = {(s.loss.name, s.dataset.flip_rate) for s in cells}
    assert grid == {(loss, f) for loss in PRESETS["smollm2"]["losses"] for f in PRESETS["smollm2"]["flip_rates"]}
    assert recipe.model.name_or_path == "builtin:smollm2-135m-instruct"


def test_later_seeds_read_the_first_seeds_generated_pairs(tmp_path):
    recipe = build_recipe("smollm2", losses=("dpo",), flip_rates=(0.4,), output_dir=str(tmp_path / "b"))
    first, second = seed_recipes(recipe, 2)
    assert [s.type for s in first.stages] == ["generate", "generate", "dpo", "eval"]
    assert [s.type for s in second.stages] == ["dpo", "eval"]  # no second generation
    pairs = tmp_path / "b" / "seed-0" / "pairs" / "data" / "train.jsonl"
    assert second.stage("dpo-flip40").dataset.path == str(pairs)
    assert second.stage("eval-dpo-flip40").preference_dataset.path == str(pairs).replace("pairs/", "pairs-eval/")
    # ... and flip their own labels: the data seed is the recipe's.
    assert (second.seed, second.stage("dpo-flip40").dataset.flip_rate) == (1, 0.4)


def test_audited_eps_replaces_the_guess_per_flip_rate():
    recipe = build_recipe("small", losses=("dpo", "cdpo", "rdpo"), flip_rates=(0.0, 0.4), output_dir="x")
    audits = {0.0: {"suggested_eps": 0.03}, 0.4: {"suggested_eps": 0.37}}
    eps = {
        (s.loss.name, s.dataset.flip_rate): s.loss.model_dump().get("eps")
        for s in with_audited_eps(recipe, audits).stages
        if s.type == "dpo"
    }
    assert eps == {
        ("dpo", 0.0): None,
        ("dpo", 0.4): None,
        ("cdpo", 0.0): 0.03,
        ("rdpo", 0.0): 0.03,
        ("cdpo", 0.4): 0.37,
        ("rdpo", 0.4): 0.37,
    }
    assert audit_settings("small", folds=3) == {"folds": 3, "epochs": 2.0, "learning_rate": None}


@pytest.mark.slow
def test_eps_from_audit_end_to_end(tmp_path, sft_lora_run):
    """--eps-from-audit: the rdpo cell trains with the eps its flip rate's audit suggests, and the audit is reused
    when the bench is run again. (The preset's SFT stage: the session's shared run, copied, so reused as finished.)"""
    out = tmp_path / "b"
    copy_run(sft_lora_run, out)
    small = [
        "stages.rdpo-flip30.dataset.size=160",
        "stages.rdpo-flip30.train.max_steps=5",
        "stages.eval-rdpo-flip30.num_prompts=8",
        "stages.eval-rdpo-flip30.preference_dataset.size=32",
    ]
    args = ["bench", "robustness", "--losses", "rdpo", "--flip-rates", "0.3", "--out", str(out), *small]
    assert main([*args, "--eps-from-audit", "--audit-folds", "2", "--audit-epochs", "1"]) == 0
    assert_reused(sft_lora_run, out)
    audit = json.loads((out / "audit" / "flip30" / "audit.json").read_text())
    assert audit["n_pairs"] == 160 and audit["dataset"]["flip_rate"] == 0.3 and audit["folds"] == 2
    assert audit["scorer"]["start"] == "sft"  # the cells' input, run before the audit
    (row,) = json.loads((out / "robustness.json").read_text())["rows"]
    assert row["eps"] == audit["suggested_eps"] and row["audit_flip_rate"] == audit["flip_rate"]
    md = (out / "robustness.md").read_text()
    assert "from the `sft` checkpoint" in md and "## Flip rate estimated by the audit" in md
    stages = yaml.safe_load((out / "rdpo-flip30" / "recipe.yaml").read_text())["stages"]
    assert next(s for s in stages if s["name"] == "rdpo-flip30")["loss"]["eps"] == audit["suggested_eps"]
    stamp = (out / "audit" / "flip30" / "audit.json").stat().st_mtime_ns
    assert main([*args, "--eps-from-audit", "--audit-folds", "2", "--audit-epochs", "1"]) == 0
    assert (out / "audit" / "flip30" / "audit.json").stat().st_mtime_ns == stamp


def test_eps_from_audit_refuses_several_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["bench", "robustness", "--losses", "rdpo", "--eps-from-audit", "--out", "never"]) != 0
    assert "runs in one process" in capsys.readouterr().err
