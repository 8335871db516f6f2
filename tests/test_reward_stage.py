"""Reward stage end to end on the built-in tiny model (LoRA, `merge: true`), on a separable preference task
written here: the chosen answer to "What is a+b?" is a number, the rejected one is a non-answer ("I don't
know."), with a per-pair margin column. Checks that the Bradley-Terry model learns it (held-out accuracy and
margin), and that the saved adapter and the merged model reproduce the scores reported during evaluation when
scored the way the PPO stage scores responses."""

import random

import pytest
import torch

from tests.helpers import lora, make_recipe, write_jsonl

pytestmark = pytest.mark.slow

NON_ANSWERS = ["I don't know.", "many", "Let me think about it.", "?", "Thank you!", "Of course."]


def _pairs(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(1, 9)
        rows.append(
            {
                "prompt": f"What is {a}+{b}?",
                "chosen": str(a + b),
                "rejected": rng.choice(NON_ANSWERS),
                "margin": rng.choice([0.0, 0.5, 1.0]),
            }
        )
    return rows


def test_reward_model_learns_and_reloads(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from alignlab.pipeline import run_pipeline
    from alignlab.recipe import parse_recipe
    from alignlab.rewards import load_reward_model, reward_model_scorer

    eval_rows = _pairs(96, seed=1)
    rm = {
        "name": "rm",
        "type": "reward",
        "merge": True,
        "dataset": {
            "path": write_jsonl(tmp_path / "train.jsonl", _pairs(480, seed=0)),
            "eval_path": write_jsonl(tmp_path / "eval.jsonl", eval_rows),
        },
        # eval batches of equal size: the reported eval metrics are then exact means over the 96 pairs
        "train": {"per_device_batch_size": 16, "eval_batch_size": 32, "learning_rate": 1.0e-3, "max_length": 64},
    }
    recipe = parse_recipe(make_recipe([rm], tmp_path / "run", name="reward-test", peft=lora(dropout=None)))
    out = run_pipeline(recipe)["rm"]
    m = out.metrics
    # An untrained score head separates the pairs by ~0.05 (and the loss includes the margins); trained, clearly.
    assert m["eval_accuracy"] >= 0.95, m
    assert m["eval_margin"] > 2.0 and m["eval_loss"] < 0.2, m
    assert out.kind == "adapter" and out.head == "sequence_classification" and out.merged_path

    # The saved adapter, scored as the PPO stage scores responses, reproduces the evaluation.
    model, tokenizer = load_reward_model(recipe, out)
    score = reward_model_scorer(model, tokenizer, batch_size=32)
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in eval_rows]
    chosen = score(prompts, [r["chosen"] for r in eval_rows])
    rejected = score(prompts, [r["rejected"] for r in eval_rows])
    assert (chosen > rejected).float().mean().item() == pytest.approx(m["eval_accuracy"], abs=1e-6)
    assert (chosen - rejected).mean().item() == pytest.approx(m["eval_margin"], rel=1e-4)

    # The merged weights load as a plain AutoModelForSequenceClassification and give the same scores.
    merged = AutoModelForSequenceClassification.from_pretrained(out.merged_path).eval()
    merged_chosen = reward_model_scorer(merged, tokenizer, batch_size=32)(prompts, [r["chosen"] for r in eval_rows])
    torch.testing.assert_close(merged_chosen, chosen, rtol=1e-4, atol=1e-4)
