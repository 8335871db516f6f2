"""`alignlab audit preferences` (experimental): the flip-rate fit on margins with a known eps, the per-pair posterior
by hand, the command's errors, and one small audit on the tiny model that sees injected flips (slow tier: it trains
eight scorers)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from alignlab.audit.mixture import fit_flip_rate, flip_posterior
from alignlab.cli import main
from tests.helpers import alignlab_beside, make_recipe


def _mirrored(n: int, eps: float, seed: int, parts=((1.0, 2.0, 1.0),)) -> tuple[np.ndarray, np.ndarray]:
    """[n] margins from (1 - eps) f(m) + eps f(-m), f = sum w N(mu, sd^2) over `parts` (w, mu, sd); and the flips."""
    rng = np.random.default_rng(seed)
    w = np.array([p[0] for p in parts])
    g = rng.choice(len(parts), size=n, p=w / w.sum())
    m = rng.normal(np.array([p[1] for p in parts])[g], np.array([p[2] for p in parts])[g])
    flipped = rng.random(n) < eps
    return np.where(flipped, -m, m), flipped


def test_fit_recovers_a_known_flip_rate():
    """2000 margins, f = N(2, 1), eps = 0.25: within 0.03, inside its interval, on any scale (the fit divides by
    the RMS, which flips leave alone)."""
    m, flipped = _mirrored(2000, 0.25, seed=0)
    fit = fit_flip_rate(m, components=1)
    assert abs(fit.eps - 0.25) < 0.03
    assert fit.interval[0] < fit.eps < fit.interval[1]
    assert fit.interval[0] < 0.25 < fit.interval[1]
    assert math.isclose(fit_flip_rate(7.5 * m, components=1).eps, fit.eps, abs_tol=1e-6)
    # The posterior ranks flipped pairs first: most of the 100 most suspect pairs are true flips.
    top = np.argsort(-fit.posterior)[:100]
    assert flipped[top].mean() > 0.9


def test_scorer_mistakes_are_not_counted_as_flips():
    """No flips, but a scorer that separates 60% of the pairs well (N(2.5, 0.8)) and the rest barely (N(0.2, 0.6)):
    about 17% of the margins are below 0 (0.6 P(N(2.5, 0.8) < 0) + 0.4 P(N(0.2, 0.6) < 0) = 0.6 * 0.001 + 0.4 * 0.37).
    The raw disagreement says 17%; the mirrored mixture (BIC picks 2 components) says ~0, its interval holds 0."""
    m, _ = _mirrored(2000, 0.0, seed=1, parts=((0.6, 2.5, 0.8), (0.4, 0.2, 0.6)))
    assert 0.13 < np.mean(m < 0) < 0.2
    fit = fit_flip_rate(m)
    assert fit.components == 2
    assert fit.eps < 0.02
    assert fit.interval[0] == 0.0 < fit.interval[1] < 0.05


def test_fit_with_a_hard_component_and_flips():
    """eps = 0.25 on the same two-part scorer: the flips show as a mirror bump of the well-separated part."""
    m, _ = _mirrored(2000, 0.25, seed=2, parts=((0.6, 2.5, 0.8), (0.4, 0.2, 0.6)))
    fit = fit_flip_rate(m, components=2)
    assert abs(fit.eps - 0.25) < 0.03
    assert fit.interval[0] < 0.25 < fit.interval[1]


def test_posterior_by_hand():
    """f = N(1, 1), eps = 0.2. At m = 0, f(0) = f(-0): the posterior is the prior, 0.2. At m = 1, f(-1) / f(1) =
    exp(-(2^2 - 0^2) / 2) = e^-2, so P = 0.2 e^-2 / (0.8 + 0.2 e^-2) = 0.027067 / 0.827067 = 0.032727. At m = -1 the
    ratio is e^2: P = 0.2 e^2 / (0.8 + 0.2 e^2) = 1.477811 / 2.277811 = 0.648786."""
    post = flip_posterior([0.0, 1.0, -1.0], 0.2, [1.0], [1.0], [1.0])
    assert post.tolist() == pytest.approx([0.2, 0.032727, 0.648786], abs=1e-6)


def _recipe(write_recipe, tiny_model_path, size: int = 40, flip_rate: float = 0.0, name: str = "recipe.yaml") -> str:
    sft = {"name": "sft", "type": "sft", "dataset": {"path": "builtin:arith", "split": "sft", "size": 20}}
    dpo = {
        "name": "dpo",
        "type": "dpo",
        "dataset": {"path": "builtin:arith", "split": "preference", "size": size, "flip_rate": flip_rate},
        "train": {"per_device_batch_size": 16, "learning_rate": 3e-4, "max_length": 64},  # scorers: 3e-3
    }
    return str(write_recipe(make_recipe([sft, dpo], name="audit", model=tiny_model_path), name=name))


def test_unknown_stage_is_named(write_recipe, tiny_model_path, capsys):
    recipe = _recipe(write_recipe, tiny_model_path)
    assert main(["audit", "preferences", recipe, "--stage", "dop"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --stage dop: no stage named 'dop' in {recipe}; its stages are sft, dpo (preference stages, which can "
        f"be audited: dpo)"
    )


def test_non_preference_stage_lists_the_preference_ones(write_recipe, tiny_model_path, capsys):
    recipe = _recipe(write_recipe, tiny_model_path)
    assert main(["audit", "preferences", recipe, "--stage", "sft"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --stage sft: stage 'sft' is a sft stage, which reads no preference pairs (prompt/chosen/rejected); "
        "audit one of the preference stages: dpo"
    )


def test_kto_stage_is_not_audited_even_on_pairs(write_recipe, capsys):
    """A kto stage reads pairs only as unpaired feedback rows: the audit's pair scorers have nothing to score."""
    recipe = write_recipe(
        {
            "name": "kto-audit",
            "model": {"name_or_path": "builtin:tiny-llama"},
            "stages": [
                {"name": "dpo", "type": "dpo", "dataset": {"path": "builtin:arith", "split": "preference"}},
                {"name": "kto", "type": "kto", "dataset": {"path": "builtin:arith", "split": "preference"}},
            ],
        }
    )
    assert main(["audit", "preferences", str(recipe), "--stage", "kto"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --stage kto: stage 'kto' is a kto stage, which trains on unpaired feedback rows, not on preference "
        "pairs; audit one of the preference stages: dpo"
    )


def test_too_few_pairs_names_the_count_and_the_fix(write_recipe, tiny_model_path, capsys, monkeypatch):
    """12 pairs, 5 folds: at least 4 per fold are needed (20). Checked before any model loads."""
    import alignlab.models

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(alignlab.models, "load_stage_model", no_model)
    recipe = _recipe(write_recipe, tiny_model_path)
    assert main(["audit", "preferences", recipe, "--stage", "dpo", "--set", "dataset.size=12"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: stage 'dpo' dataset builtin:arith: 12 preference pairs are too few for 5 folds (at least 4 pairs per "
        "fold: 20). Give the stage more pairs (e.g. dataset.size or dataset.max_samples), or lower --folds to 3"
    ]


@pytest.mark.slow
def test_audit_writes_its_files_and_sees_injected_flips(write_recipe, tiny_model_path, tmp_path, capsys):
    """120 pairs, 2 folds, 4 epochs of a reward model per fold (lr 3e-3: 10x the stage's): with 40% of the labels
    flipped the estimated flip rate is higher than with none, the intervals apart (measured: 0.374, 0.263 to 0.493;
    without flips 0.000, 0 to 0.024), and the flipped rows are more suspect than the others."""
    from alignlab.data import build_datasets
    from alignlab.recipe import load_recipe

    def audit(rate):
        recipe = _recipe(write_recipe, tiny_model_path, size=120, flip_rate=rate, name=f"recipe-{rate}.yaml")
        argv = ["audit", "preferences", recipe, "--stage", "dpo", "--folds", "2", "--epochs", "4"]
        return [*argv, "--out", str(tmp_path / f"audit-{rate}"), "--drop-suspect", "10", "--threads", "1"]

    log = tmp_path / "audit-0.0.log"
    with alignlab_beside(audit(0.0), log=log):  # the two audits side by side, one thread each
        assert main(audit(0.4)) == 0
    assert "estimated flip rate" in log.read_text() and "estimated flip rate" in capsys.readouterr().out
    estimates = {}
    for rate in (0.0, 0.4):
        out = tmp_path / f"audit-{rate}"
        res = json.loads((out / "audit.json").read_text())
        assert {"flip_rate", "interval", "method", "folds", "n_pairs", "pairs", "suggested_eps"} <= set(res)
        assert res["n_pairs"] == 120 and res["folds"] == 2 and len(res["pairs"]) == 120
        assert {"row", "suspicion", "margin", "fold"} <= set(res["pairs"][0])
        assert res["interval"][0] <= res["flip_rate"] <= res["interval"][1]
        assert "suggested eps for cdpo / rdpo" in (out / "audit.md").read_text()
        assert len((out / "cleaned.jsonl").read_text().splitlines()) == 110
        estimates[rate] = res
    found = {r: (e["flip_rate"], e["interval"]) for r, e in estimates.items()}
    assert estimates[0.0]["flip_rate"] < 0.05 and estimates[0.0]["interval"][0] == 0.0, found
    assert estimates[0.4]["flip_rate"] > 0.25, found
    assert estimates[0.4]["interval"][0] > estimates[0.0]["interval"][1], found
    # Which rows were flipped: compare with the data built without flips.
    r = load_recipe(_recipe(write_recipe, tiny_model_path, size=120, flip_rate=0.4))
    spec = r.stage("dpo").dataset
    clean, _ = build_datasets(spec.model_copy(update={"flip_rate": 0.0}), r, "dpo", True, with_eval=False)
    noisy, _ = build_datasets(spec, r, "dpo", True, with_eval=False)
    flipped = np.array([a != b for a, b in zip(clean["chosen"], noisy["chosen"])])
    suspicion = np.array([p["suspicion"] for p in estimates[0.4]["pairs"]])
    assert suspicion[flipped].mean() > suspicion[~flipped].mean()


def _pairs_file(tmp_path, margins=None) -> str:
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}", **({"margin": m} if margins else {})}
        for i, m in enumerate(margins or [0.0] * 20)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_near_tie_flips_pick_the_smallest_margins(tmp_path):
    """20 pairs, margins 0 (even rows) and 5 (odd rows), flip_rate 0.5: weights exp(-0 / 0.1) = 1 and exp(-50); the
    10 flips are exactly the 10 near-ties (a margin-5 row would need log(u) / e^-50 > the largest of ten log(u) / 1)."""
    from alignlab.data import build_datasets
    from alignlab.schema import DatasetSpec

    path = _pairs_file(tmp_path, [0.0 if i % 2 == 0 else 5.0 for i in range(20)])
    spec = DatasetSpec(path=path, flip_rate=0.5, flip_mode="near_tie")
    ds, _ = build_datasets(spec, None, "dpo", chat=False, with_eval=False)
    flipped = [i for i, row in enumerate(ds) if row["chosen"].startswith("bad")]
    assert flipped == list(range(0, 20, 2))


def test_near_tie_on_arith_flips_close_pairs_more_often():
    """builtin:arith, 400 pairs, 20% near-tie flips: exactly 80 flipped, and their true reward margins are smaller on
    average than the unflipped pairs' (uniform flips would give equal means)."""
    from alignlab.builtin.tasks import arith_reward
    from alignlab.data import build_datasets
    from alignlab.schema import DatasetSpec

    spec = DatasetSpec(path="builtin:arith", split="preference", size=400, flip_rate=0.2, flip_mode="near_tie")
    noisy, _ = build_datasets(spec, None, "dpo", chat=False, with_eval=False)
    clean, _ = build_datasets(spec.model_copy(update={"flip_rate": 0.0}), None, "dpo", chat=False, with_eval=False)
    flipped = np.array([a != b for a, b in zip(clean["chosen"], noisy["chosen"])])
    d = np.array(arith_reward(clean["prompt"], clean["chosen"])) - np.array(
        arith_reward(clean["prompt"], clean["rejected"])
    )
    assert flipped.sum() == 80
    assert d[flipped].mean() < d[~flipped].mean() - 0.2


def test_near_tie_needs_a_true_margin(tmp_path):
    from alignlab.data import DataError, build_datasets
    from alignlab.schema import DatasetSpec

    path = _pairs_file(tmp_path)
    spec = DatasetSpec(path=path, flip_rate=0.2, flip_mode="near_tie")
    with pytest.raises(DataError) as e:
        build_datasets(spec, None, "dpo", chat=False, with_eval=False)
    assert str(e.value) == (
        f"{path}: flip_mode near_tie flips pairs more often the closer their true rewards, so it needs each pair's "
        f"true reward margin: a `margin` column (columns: {{margin: YOUR_COLUMN}}), or a builtin task with a reward "
        f"(builtin:arith, builtin:constraints). Use flip_mode: uniform for this dataset."
    )


def test_folds_are_balanced_and_seeded_and_eps_suggestion_stays_below_one_half():
    from alignlab.audit.command import fold_ids, suggested_eps

    ids = fold_ids(23, 5, seed=0)
    assert sorted(np.bincount(ids).tolist()) == [4, 4, 5, 5, 5]
    assert ids.tolist() == fold_ids(23, 5, seed=0).tolist() != fold_ids(23, 5, seed=1).tolist()
    assert [suggested_eps(e) for e in (-0.001, 0.0, 0.123, 0.456, 0.5)] == [0.0, 0.0, 0.12, 0.45, 0.45]
