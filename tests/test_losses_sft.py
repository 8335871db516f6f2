"""SFT losses (alignlab/losses/sft.py) against hand-computed values, and the `loss` key of an sft stage."""

import math

import pytest
import torch
import torch.nn.functional as F

from alignlab.losses.sft import sft_loss, unlikelihood_candidates
from tests.helpers import alignlab_beside

# Uniform logits over 4 tokens: every probability is 1/4, so each token costs log 4 and each candidate -log(3/4).
LOG4, UL1 = math.log(4), -math.log(0.75)


def _uniform(labels):
    return torch.zeros(labels.shape[0], labels.shape[1], 4, requires_grad=True)


def test_nll_is_cross_entropy_on_trained_tokens():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 6, 5), torch.tensor([[-100, -100, 1, 2, 1, 3], [-100, 4, 4, 4, -100, -100]])
    loss, stats = sft_loss(logits, labels)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item()) and stats["nll"].item() == pytest.approx(expected.item())
    assert stats["unlikelihood"].item() == 0.0


def test_unlikelihood_hand_values():
    # Targets (labels shifted by one) 1 2 1 3. Candidates: t0 none; t1 (2) {1}; t2 (1) {2}, not 1 itself;
    # t3 (3) {1, 2}, the second 1 not again. Four candidates in all, each -log(1 - 1/4).
    labels = torch.tensor([[-100, 1, 2, 1, 3]])
    loss, stats = sft_loss(_uniform(labels), labels, name="unlikelihood", alpha=1.0)
    assert loss.item() == pytest.approx(LOG4 + 4 * UL1 / 4)
    assert stats["nll"].item() == pytest.approx(LOG4) and stats["unlikelihood"].item() == pytest.approx(UL1)
    half, _ = sft_loss(_uniform(labels), labels, name="unlikelihood", alpha=0.5)
    assert half.item() == pytest.approx(LOG4 + 0.5 * UL1)


def test_a_token_counts_once_and_untrained_tokens_are_never_candidates():
    # Targets 1 1 [prompt] 2: at the last position token 1 is one candidate though written twice; the untrained
    # position (a prompt token, label -100) is neither a candidate nor trained.
    labels = torch.tensor([[-100, 1, 1, -100, 2]])
    targets, mask = labels[:, 1:].clamp(min=0), labels[:, 1:] != -100
    cand = unlikelihood_candidates(targets, mask)
    assert cand[0].nonzero().tolist() == [[3, 0]]
    loss, stats = sft_loss(_uniform(labels), labels, name="unlikelihood")
    assert stats["unlikelihood"].item() == pytest.approx(UL1 / 3)  # one candidate over 3 trained tokens
    assert loss.item() == pytest.approx(LOG4 + UL1 / 3)


def test_num_items_divides_the_sum():
    labels = torch.tensor([[-100, 1, 2, 1, 3]])
    loss, _ = sft_loss(_uniform(labels), labels, name="unlikelihood", num_items=8)
    assert loss.item() == pytest.approx((4 * LOG4 + 4 * UL1) / 8)


def test_unlikelihood_gradient_pushes_down_what_was_already_written():
    # At t1 (target 2) the only candidate is token 1: d/dz_1 of -log(1 - p_1) is p_1 = 1/4, and the NLL's is p_1 too
    # (softmax cross-entropy: p - onehot), so the unlikelihood doubles the push down on token 1 there.
    labels = torch.tensor([[-100, 1, 2]])
    logits = _uniform(labels)
    sft_loss(logits, labels, name="unlikelihood")[0].backward()
    ul_grad = logits.grad[0, 1, 1].item()
    logits = _uniform(labels)
    sft_loss(logits, labels)[0].backward()
    nll_grad = logits.grad[0, 1, 1].item()
    assert nll_grad == pytest.approx(0.25 / 2) and ul_grad == pytest.approx(0.5 / 2)  # 2 trained tokens


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown SFT loss 'ul'"):
        sft_loss(torch.zeros(1, 2, 3), torch.tensor([[0, 1]]), name="ul")


def _sft_stage(**extra):
    return {"name": "sft", "type": "sft", "dataset": {"path": "builtin:arith", "split": "sft"}, **extra}


@pytest.mark.parametrize(
    "stage, message",
    [
        (_sft_stage(loss={"name": "nll", "alpha": 0.5}), "loss.alpha weighs the unlikelihood term"),
        (_sft_stage(loss={"name": "unlikelihood"}, packing=True), "keep completion_only_loss: true"),
        (_sft_stage(loss={"name": "unlikelihood"}, completion_only_loss=False), "and packing: false"),
        (_sft_stage(loss={"name": "unlikelihood", "alpha": 0}), "greater than 0"),
        (_sft_stage(loss={"name": "unlikelyhood"}), "'nll' or 'unlikelihood'"),
    ],
)
def test_bad_sft_loss_is_refused_before_any_model(write_recipe, stage, message):
    from alignlab.recipe import RecipeError, load_recipe

    path = write_recipe({"name": "t", "model": {"name_or_path": "builtin:tiny-llama"}, "stages": [stage]})
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def _repeat_mass(model, tok, rows) -> float:
    """Mean unlikelihood term of `model` on conversational `rows`: how much probability it gives, at each completion
    token, to the tokens the completion already wrote."""
    from alignlab.generation import prompt_token_ids

    total = 0.0
    for row in rows:
        prompt = prompt_token_ids(tok, row["prompt"])
        ids = prompt + tok(row["completion"][0]["content"], add_special_tokens=False)["input_ids"]
        labels = torch.tensor([[-100] * len(prompt) + ids[len(prompt) :]])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits
        total += sft_loss(logits, labels, name="unlikelihood")[1]["unlikelihood"].item()
    return total / len(rows)


@pytest.mark.slow
def test_unlikelihood_sft_learns_and_repeats_less(write_recipe, tmp_path):
    """The same SFT (tiny model, the constraint task's written answers, same seed) with loss nll and with
    unlikelihood: both learn (the NLL falls), the unlikelihood model puts less probability on tokens an answer
    already wrote, on held-out answers, and its eval_loss is the plain NLL (eval_nll, logged beside it)."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.builtin import builtin_model_path
    from alignlab.builtin.constraint_demos import rows as demo_rows
    from alignlab.cli import main

    runs, recipes = {}, {}
    for loss in ({"name": "nll"}, {"name": "unlikelihood", "alpha": 1.0}):
        stage = _sft_stage(
            dataset={"path": "builtin:constraints", "split": "sft", "size": 256, "eval_size": 16},
            train={
                "max_steps": 30,
                "per_device_batch_size": 8,
                "learning_rate": 3e-3,
                "max_length": 256,
                "logging_steps": 10,
                "eval_batch_size": 16,
            },
            loss=loss,
        )
        out = tmp_path / loss["name"]
        recipe = {
            "name": loss["name"],
            "seed": 0,
            "model": {"name_or_path": "builtin:tiny-llama"},
            "output_dir": str(out),
            "peft": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "stages": [stage],
        }
        recipes[loss["name"]] = str(write_recipe(recipe, name=f"{loss['name']}.yaml"))
        runs[loss["name"]] = out / "sft"
    with alignlab_beside(["run", recipes["nll"]], log=tmp_path / "nll.log"):  # the two runs side by side
        assert main(["run", recipes["unlikelihood"]]) == 0

    logs = [json.loads(line) for line in (runs["unlikelihood"] / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "unlikelihood" in r]
    assert len(steps) >= 2 and steps[-1]["nll"] < steps[0]["nll"] and steps[0]["unlikelihood"] > 0
    final = [r for r in logs if "eval_nll" in r][-1]
    assert final["eval_loss"] == pytest.approx(final["eval_nll"], rel=1e-4)

    base = str(builtin_model_path("tiny-llama"))
    tok = AutoTokenizer.from_pretrained(base)
    held_out = demo_rows("sft_eval", 16, 0)
    mass = {
        name: _repeat_mass(
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(d / "model")), tok, held_out
        )
        for name, d in runs.items()
    }
    assert mass["unlikelihood"] < 0.9 * mass["nll"], mass


def test_the_recipe_schema_offers_exactly_the_losses_there_are():
    from typing import get_args

    from alignlab.losses.sft import SFT_LOSSES
    from alignlab.stages.specs import SFTLossSpec

    assert get_args(SFTLossSpec.model_fields["name"].annotation) == SFT_LOSSES


@pytest.mark.parametrize("loss", [{"name": "nll"}, {"name": "unlikelihood"}, {"name": "unlikelihood", "alpha": 0.5}])
def test_sft_loss_survives_a_round_trip_through_the_resolved_recipe(write_recipe, loss):
    """Processes under `accelerate launch` and the run folder's recipe.yaml read the recipe as dumped after parsing
    (every default written out): it must parse again to the same loss."""
    from alignlab.recipe import load_recipe

    recipe = load_recipe(write_recipe({"name": "t", "model": {"name_or_path": "builtin:tiny-llama"},
                                       "stages": [_sft_stage(loss=loss)]}))  # fmt: skip
    dumped = recipe.model_dump(mode="json", serialize_as_any=True)  # as alignlab.freshness writes it
    again = load_recipe(write_recipe(dumped, name="again.yaml"))
    assert again.stages[0].loss == recipe.stages[0].loss
    assert again.stages[0].loss.weight == loss.get("alpha", 1.0)
