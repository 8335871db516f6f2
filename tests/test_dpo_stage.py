"""The dpo stage routes TRL's DPOTrainer through alignlab's loss registry.

At the first logged step the policy equals the reference (h = 0 for every pair), so each loss has a value known
by hand: dpo/kldpo/drdpo/cdpo/rdpo = ln 2 (kldpo: every l_i = ln 2 = lbar, so every weight is exp(0) = 1),
hinge = max(0, 1 - 0) = 1, ipo = (0 - 1/(2 * 0.1))^2 = 25, wdpo = ln 2 + rho * mean R with R > 0.
A reference-free loss (simpo) runs with no reference at all, and learns. nll_alpha adds RPO's NLL term.
"""

import json
import math

import pytest

from alignlab.cli import main
from tests.helpers import TINY, lora, make_recipe

pytestmark = pytest.mark.slow
LORA_R4 = lora(r=4, alpha=8, dropout=0.0)


def _run(write_recipe, tmp_path, loss: dict, attn=None):
    model = {"name_or_path": TINY, **({"attn_implementation": attn} if attn else {})}
    dpo = {
        "name": "dpo",
        "type": "dpo",
        "dataset": {"path": "builtin:arith", "split": "preference", "size": 32, "eval_size": 16},
        "loss": loss,
        "train": {
            "max_steps": 2,
            "per_device_batch_size": 8,
            "learning_rate": 1e-3,
            "max_length": 48,
            "logging_steps": 1,
        },
    }
    recipe = make_recipe([dpo], name="dpo-stage", model=model, peft=LORA_R4)
    assert main(["run", str(write_recipe(recipe))]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "final" not in r]


@pytest.mark.parametrize(
    "loss,expected",
    [
        ({"name": "kldpo", "tau": 0.5}, math.log(2)),
        ({"name": "hinge"}, 1.0),
        ({"name": "ipo"}, 25.0),
        ({"name": "drdpo", "beta_prime": 0.5}, math.log(2)),
    ],
    ids=["kldpo", "hinge", "ipo", "drdpo"],
)
def test_first_step_loss_matches_hand_value(write_recipe, tmp_path, loss, expected):
    rows = _run(write_recipe, tmp_path, {"beta": 0.1, **loss})
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-4)
    if loss["name"] == "kldpo":
        assert rows[0]["kldpo/weight_max"] == pytest.approx(1.0) and rows[0]["kldpo/weight_min"] == pytest.approx(1.0)


def test_wdpo_adds_the_gradient_penalty(write_recipe, tmp_path):
    rows = _run(write_recipe, tmp_path, {"name": "wdpo", "beta": 0.1, "rho": 1.0}, attn="eager")
    penalty = rows[0]["wdpo/penalty"]
    assert penalty > 0
    assert rows[0]["loss"] == pytest.approx(math.log(2) + 1.0 * penalty, rel=1e-4)


def test_simpo_stage_uses_no_reference_and_learns(write_recipe, tmp_path, monkeypatch):
    """SimPO (catalog: needs_reference=False): the stage builds no reference (no frozen "ref" adapter copy, no
    second model) and never runs a reference forward; on held-out pairs (prompts disjoint from training) the SimPO
    loss falls and the length-normalised margin grows. Measured (6 steps, lr 3e-3): eval_loss 0.443 -> 0.386,
    eval_rewards/margins 2.67 -> 3.64."""
    import trl

    import alignlab.stages.dpo as dpo_stage

    def no_reference_forward(*args, **kwargs):
        raise AssertionError("a reference-free loss ran a reference forward")

    seen = {}
    real_train_and_save = dpo_stage.train_and_save

    def spy(trainer, ctx, **kwargs):
        seen["ref_model"] = trainer.ref_model
        seen["adapters"] = set(trainer.model.peft_config)
        return real_train_and_save(trainer, ctx, **kwargs)

    monkeypatch.setattr(trl.DPOTrainer, "compute_ref_log_probs", no_reference_forward)
    monkeypatch.setattr(dpo_stage, "train_and_save", spy)
    dpo = {
        "name": "dpo",
        "type": "dpo",
        "dataset": {"path": "builtin:arith", "split": "preference", "size": 48, "eval_size": 16,
                    "eval_split": "preference_eval"},
        "loss": {"name": "simpo"},  # beta 2, gamma 1 (catalog defaults)
        "train": {"max_steps": 6, "per_device_batch_size": 8, "eval_batch_size": 16, "learning_rate": 3e-3,
                  "max_length": 48, "logging_steps": 1, "extra": {"eval_on_start": True}},
    }  # fmt: skip
    recipe = make_recipe([dpo], name="simpo-stage", peft=LORA_R4)
    assert main(["run", str(write_recipe(recipe))]) == 0
    assert seen == {"ref_model": None, "adapters": {"default"}}
    rows = [json.loads(x) for x in (tmp_path / "run" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == 6
    assert last["eval_loss"] < first["eval_loss"] - 0.05
    assert last["eval_rewards/margins"] > first["eval_rewards/margins"] + 0.5


def _nll_run(write_recipe, tmp_path, nll_alpha: float) -> list[dict]:
    stage = {
        "name": "dpo",
        "type": "dpo",
        "dataset": {"path": "builtin:arith", "split": "preference", "size": 48, "eval_size": 16,
                    "eval_split": "preference_eval"},
        "loss": {"name": "dpo", "beta": 0.1},
        "nll_alpha": nll_alpha,
        "train": {"max_steps": 6, "per_device_batch_size": 8, "eval_batch_size": 16, "learning_rate": 3e-3,
                  "max_length": 48, "logging_steps": 1, "extra": {"eval_on_start": True}},
    }  # fmt: skip
    recipe = make_recipe([stage], tmp_path / f"run-{nll_alpha}", name="dpo-nll", peft=LORA_R4)
    assert main(["run", str(write_recipe(recipe, name=f"nll-{nll_alpha}.yaml"))]) == 0
    path = tmp_path / f"run-{nll_alpha}" / "dpo" / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_nll_alpha_adds_the_chosen_nll_and_keeps_chosen_answers_likely(write_recipe, tmp_path):
    """RPO (nll_alpha): the loss is the DPO loss plus alpha times the chosen answers' per-token NLL (at the first
    step, policy = reference: ln 2 + alpha * nll); trained so, the held-out chosen answers stay likelier (their
    implicit reward beta * (log pi - log ref) higher) than under plain DPO from the same start, and their NLL falls.
    Measured (6 steps, lr 3e-3): eval_rewards/chosen 0.51 (plain) and 0.81 (alpha 1), eval_nll 7.65 -> 5.62."""
    plain, rpo = _nll_run(write_recipe, tmp_path, 0.0), _nll_run(write_recipe, tmp_path, 1.0)
    train = [r for r in rpo if "loss" in r and "final" not in r]
    assert train[0]["nll"] > 0 and "nll" not in [k for r in plain for k in r]
    assert train[0]["loss"] == pytest.approx(math.log(2) + 1.0 * train[0]["nll"], rel=1e-4)
    evals = {name: [r for r in rows if "eval_loss" in r] for name, rows in (("plain", plain), ("rpo", rpo))}
    assert evals["rpo"][-1]["eval_rewards/chosen"] > evals["plain"][-1]["eval_rewards/chosen"]
    assert evals["rpo"][-1]["eval_nll"] < evals["rpo"][0]["eval_nll"]
