"""The kto stage (TRL's KTOTrainer) on unpaired binary feedback, and the `unpaired` data format it reads.

Hand value: at the first evaluation the policy equals its reference, so every implied reward
beta * log(pi / pi_ref) is 0, the KL estimate is 0, and every example's loss is 1 - sigma(0) = 1/2: eval_loss = 0.5
and eval_rewards/margins = 0 exactly. After a LoRA SFT stage that holds only if the reference is the SFT model (the
SFT adapter, frozen), not the raw base.
"""

import json

import pytest

from alignlab.cli import main
from alignlab.data import DataError, build_datasets, check_dataset
from alignlab.recipe import parse_recipe
from tests.helpers import assert_reused, copy_run, make_recipe, sft_lora_recipe
from tests.helpers import write_jsonl as _write_jsonl


def _recipe(path: str, **dataset) -> dict:
    return make_recipe(
        [{"name": "kto", "type": "kto", "dataset": {"path": path, **dataset}}], name="kto-data", seed=None
    )


def _labels(tmp_path, rows, **dataset):
    recipe = parse_recipe(_recipe(_write_jsonl(tmp_path / "fb.jsonl", rows), **dataset))
    train, _ = build_datasets(recipe.stages[0].dataset, recipe, "kto", chat=False, with_eval=False)
    return train["label"], train.column_names


def test_thumbs_export_maps_to_labels(tmp_path):
    """A thumbs-up/down export: its own column names mapped with dataset.columns, its spellings read as booleans."""
    votes = ["👍", "👎", "up", "DOWN", " thumbs_up ", "👍🏽", True, 0]
    rows = [{"question": f"q{i}", "answer": f"a{i}", "thumbs_up": v} for i, v in enumerate(votes)]
    labels, columns = _labels(
        tmp_path, rows, columns={"prompt": "question", "completion": "answer", "label": "thumbs_up"}
    )
    assert labels == [True, False, True, False, True, True, True, False]
    assert columns == ["prompt", "completion", "label"]


def test_plus_minus_one_ratings(tmp_path):
    rows = [{"prompt": "p", "completion": f"c{i}", "label": v} for i, v in enumerate([1, -1, -1, 1])]
    assert _labels(tmp_path, rows)[0] == [True, False, False, True]


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"prompt": "p", "completion": "a", "label": "up"}, {"prompt": "p", "completion": "b", "label": "meh"}],
            "line 2: column 'label' is 'meh', which is not a desirable/undesirable label",
        ),
        (
            [{"prompt": "p", "completion": f"c{i}", "label": v} for i, v in enumerate([1, 0, -1])],
            "column 'label' holds 1, 0 and -1: a three-way rating, where 0 likely means neutral",
        ),
        (
            [{"prompt": "p", "completion": "a", "label": True}, {"prompt": "p", "completion": "", "label": False}],
            "line 2: column 'completion' is missing or empty",
        ),
        (
            [{"prompt": "p", "completion": "a", "label": 2}],
            "line 1: column 'label' is 2, which is not a desirable/undesirable label. Use true/false",
        ),
    ],
    ids=["unknown-word", "three-way", "empty-completion", "number-2"],
)
def test_bad_feedback_rows_name_the_row(tmp_path, rows, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        _labels(tmp_path, rows)


def test_missing_label_column_says_how_to_map_it(tmp_path):
    rows = [{"prompt": "p", "completion": "a", "thumbs": "up"}]
    needs = r"a kto stage needs columns prompt\+completion\+label or chosen\+rejected; the data has prompt, completion"
    with pytest.raises(DataError, match=needs):
        _labels(tmp_path, rows)
    # and the mapped name is the one named in the error about its values
    rows = [{"prompt": "p", "completion": "a", "thumbs": "sideways"}]
    with pytest.raises(DataError, match=r"line 1: column 'thumbs' is 'sideways'"):
        _labels(tmp_path, rows, columns={"label": "thumbs"})


def test_preference_pairs_are_read_as_feedback_after_their_flips(tmp_path):
    """A kto stage on preference pairs: each pair gives its chosen answer labelled desirable and its rejected one
    undesirable, shuffled (a pair's rows are not adjacent by construction); a flipped pair swaps which is which."""
    pairs = [{"prompt": f"q{i}", "chosen": f"good{i}", "rejected": f"bad{i}", "margin": 1.0} for i in range(8)]
    path = _write_jsonl(tmp_path / "pairs.jsonl", pairs)
    recipe = parse_recipe(_recipe(path))
    train, _ = build_datasets(recipe.stages[0].dataset, recipe, "kto", chat=False, with_eval=False)
    assert train.column_names == ["prompt", "completion", "label"] and len(train) == 16
    assert sorted((r["completion"], r["label"], r["prompt"]) for r in train) == sorted(
        [(f"good{i}", True, f"q{i}") for i in range(8)] + [(f"bad{i}", False, f"q{i}") for i in range(8)]
    )
    assert train["label"] != [True] * 8 + [False] * 8  # shuffled, not TRL's chosen-block-then-rejected-block
    # flip_rate swaps chosen/rejected of half the pairs before they become feedback rows
    recipe = parse_recipe(_recipe(path, flip_rate=0.5))
    train, _ = build_datasets(recipe.stages[0].dataset, recipe, "kto", chat=False, with_eval=False)
    desirable = {r["completion"] for r in train if r["label"]}
    assert len(desirable) == 8 and sum(c.startswith("bad") for c in desirable) == 4
    # pairs without a prompt cannot be feedback on answers to one
    no_prompt = _write_jsonl(tmp_path / "np.jsonl", [{"chosen": "a", "rejected": "b"}])
    no_prompt = parse_recipe(_recipe(no_prompt))
    message = r"np.jsonl: a kto stage reads preference pairs .* needs a 'prompt' column"
    with pytest.raises(DataError, match=message):
        build_datasets(no_prompt.stages[0].dataset, no_prompt, "kto", chat=False, with_eval=False)
    with pytest.raises(DataError, match=message):  # and `validate` says so, before any model loads
        check_dataset(no_prompt.stages[0].dataset, no_prompt, "kto")


def test_each_dataset_is_read_as_feedback_on_its_own(tmp_path):
    """Unpaired training rows with held-out pairs (eval_path): the pairs become feedback rows too. Held-out pairs
    without a prompt are refused by `validate` (check_dataset), naming the eval file."""
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(4)]
    train_path = _write_jsonl(tmp_path / "fb.jsonl", rows)
    pairs = [{"prompt": f"e{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(3)]
    recipe = parse_recipe(_recipe(train_path, eval_path=_write_jsonl(tmp_path / "held.jsonl", pairs)))
    train, held = build_datasets(recipe.stages[0].dataset, recipe, "kto", chat=False)
    assert train["label"] == [True, False, True, False]
    assert sorted(zip(held["completion"], held["label"])) == sorted(
        [(f"good{i}", True) for i in range(3)] + [(f"bad{i}", False) for i in range(3)]
    )
    bad = _write_jsonl(tmp_path / "held_np.jsonl", [{"chosen": "a", "rejected": "b"}])
    recipe = parse_recipe(_recipe(train_path, eval_path=bad))
    with pytest.raises(DataError, match=r"held_np.jsonl \(eval\): a kto stage reads preference pairs"):
        check_dataset(recipe.stages[0].dataset, recipe, "kto")


def test_chat_pairs_with_the_prompt_inside_their_conversations(tmp_path):
    """HH-style pairs: chosen and rejected are whole conversations; the turns they share are the prompt
    (TRL's extract_prompt), and each answer is a feedback row on it."""

    def chat(answer):
        return [{"role": "user", "content": "Sky colour?"}, {"role": "assistant", "content": answer}]

    path = _write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chat("Blue."), "rejected": chat("Green.")}])
    recipe = parse_recipe(_recipe(path))
    check_dataset(recipe.stages[0].dataset, recipe, "kto")  # accepted before any model loads
    train, _ = build_datasets(recipe.stages[0].dataset, recipe, "kto", chat=True, with_eval=False)
    assert sorted((r["completion"][0]["content"], r["label"]) for r in train) == [("Blue.", True), ("Green.", False)]
    assert train[0]["prompt"] == [{"role": "user", "content": "Sky colour?"}]


def test_kto_needs_two_rows_per_batch():
    raw = _recipe("builtin:arith", split="unpaired")
    raw["stages"][0]["train"] = {"per_device_batch_size": 1}
    with pytest.raises(Exception, match=r"train.per_device_batch_size must be at least 2 \(now 1\)"):
        parse_recipe(raw)


def test_builtin_unpaired_split_is_the_preference_pairs():
    from alignlab.builtin.tasks import generate_task

    rows = generate_task("arith", "unpaired", 40, seed=3)
    pairs = generate_task("arith", "preference", 20, seed=3)
    assert sum(r["label"] for r in rows) == 20
    assert sorted(json.dumps(r, sort_keys=True) for r in rows) == sorted(
        json.dumps({"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}, sort_keys=True)
        for p in pairs
        for side in ("chosen", "rejected")
    )


@pytest.mark.slow
def test_kto_after_lora_sft_starts_at_its_reference_and_learns(write_recipe, tmp_path, sft_lora_run):
    """SFT (LoRA: the session's SFT-LoRA run, copied, so its stage is reused as finished; its adapter is clearly
    away from the base) -> KTO continuing the adapter. First eval (step 0): eval_loss = 0.5 and margins = 0 exactly
    (reference = the SFT adapter, frozen). On held-out prompts the desirable completions' implied reward then rises
    above the undesirable ones', and the step-3 checkpoint is written the atomic way. Measured (6 steps):
    eval_loss 0.5 -> 0.372, eval_rewards/margins 0 -> 2.53 (0.433 and 0.567 from a 1-step SFT)."""
    copy_run(sft_lora_run, tmp_path / "run")
    kto = {
        "name": "kto",
        "type": "kto",
        "dataset": {"path": "builtin:arith", "split": "unpaired", "size": 48, "eval_size": 16},
        "beta": 0.1,
        "train": {
            "max_steps": 6,
            "per_device_batch_size": 8,
            "eval_batch_size": 16,
            "learning_rate": 3e-3,
            "max_length": 48,
            "logging_steps": 1,
            "save_steps": 3,
            "extra": {"eval_on_start": True},
        },
    }
    recipe = sft_lora_recipe(tmp_path / "run", kto, name="kto-stage")
    assert main(["run", str(write_recipe(recipe))]) == 0
    assert_reused(sft_lora_run, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "kto" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == 6
    assert first["eval_loss"] == pytest.approx(0.5, abs=1e-6)
    assert first["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert last["eval_rewards/margins"] > 0.2
    assert last["eval_loss"] < 0.48
    assert not (tmp_path / "run" / "kto" / "model" / "ref").exists()  # the frozen copy is not part of the output
    # GuardedTrainer's atomic checkpoint, through KTOTrainer's own _save_checkpoint (which adds a model card)
    assert (tmp_path / "run" / "kto" / "checkpoints" / "checkpoint-3" / "trainer_state.json").exists()
