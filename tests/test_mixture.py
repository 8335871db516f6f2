"""Dataset mixtures (`dataset: {mix: [...], size: N}`): the counts by hand, the rows each source gives (its own
column mapping), the same mixture every time from the same seed, errors that name the source, the fingerprint
covering every source, and a stage's record listing the rows it took from each."""

from __future__ import annotations

import json

import pytest

from alignlab.data import DataError, build_datasets, check_dataset, data_taken
from alignlab.data.mixture import mixture_counts, pick_rows
from alignlab.recipe import RecipeError, parse_recipe
from tests.helpers import make_recipe, write_jsonl
from tests.helpers import run as run_recipe


def test_counts_split_the_size_by_largest_remainders():
    # size 50, shares 0.7 / 0.3: 35 / 15 exactly
    assert mixture_counts([100, 10], [0.7, 0.3], 50) == [35, 15]
    # size 10 over three equal weights: 3.33 each -> 3, 3, 3 and the one left to the first (ties: the earlier source)
    assert mixture_counts([5, 5, 5], [1, 1, 1], 10) == [4, 3, 3]
    # weights need not sum to 1: 2 : 1 of 9 -> 6, 3
    assert mixture_counts([100, 100], [2.0, 1.0], 9) == [6, 3]


def test_without_a_size_the_largest_mixture_that_repeats_no_row():
    # N = min(100 / 0.7, 10 / 0.3) = min(142.9, 33.3) -> 33; 0.7 * 33 = 23.1, 0.3 * 33 = 9.9 -> 23, 10
    assert mixture_counts([100, 10], [0.7, 0.3], None) == [23, 10]
    # the scarce source is used whole and never twice
    assert mixture_counts([40, 12], [0.5, 0.5], None) == [12, 12]


def test_rows_repeat_only_after_every_row_came():
    rows = pick_rows(3, 7, seed=0)
    assert len(rows) == 7 and sorted(rows[:3]) == sorted(rows[3:6]) == [0, 1, 2]
    assert pick_rows(3, 7, seed=0) == rows and pick_rows(10, 10, seed=1) != pick_rows(10, 10, seed=2)
    assert len(set(pick_rows(10, 10, seed=3))) == 10


@pytest.fixture
def qa_file(tmp_path):
    """Ten prompt/completion rows under other column names: question, answer."""
    return write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(10)])


def _text(value) -> str:
    """A prompt or completion as text (a mixture of chat and plain-string sources reads all as chat messages)."""
    return value if isinstance(value, str) else value[-1]["content"]


def _recipe(dataset: dict, tmp_path, **stage) -> object:
    return parse_recipe(make_recipe([{"name": "sft", "type": "sft", "dataset": dataset, **stage}], tmp_path / "run"))


def _mix(qa_file, size=40) -> dict:
    return {
        "mix": [
            {"path": qa_file, "columns": {"prompt": "question", "completion": "answer"}, "weight": 0.25},
            {"path": "builtin:arith", "split": "sft", "size": 100, "weight": 0.75},
        ],
        **({"size": size} if size else {}),
    }


def test_a_mixture_takes_each_source_in_proportion_with_its_own_columns(qa_file, tmp_path):
    """size 40 at 0.25 / 0.75: 10 rows of qa.jsonl (every one, read through its own column mapping) and 30 generated
    arith rows; the same rows in the same order again; another data seed, another order of the same counts."""
    recipe = _recipe(_mix(qa_file), tmp_path)
    spec = recipe.stages[0]
    with data_taken(spec) as taken:
        train, held_out = build_datasets(spec.dataset, recipe, "sft", chat=False)
    prompts = [_text(p) for p in train["prompt"]]
    assert len(train) == 40 and sorted(p for p in prompts if p.startswith("q")) == sorted(f"q{i}?" for i in range(10))
    assert sum(p.startswith("What is") for p in prompts) == 30
    qa_rows = [(_text(r["prompt"]), _text(r["completion"])) for r in train.to_list()]
    assert all(c == "a" + p[1:-1] for p, c in qa_rows if p.startswith("q"))  # question -> prompt, answer -> completion
    assert isinstance(train[0]["prompt"], list)  # the arith rows are chat messages: qa.jsonl's strings read as chat too
    assert [p.startswith("q") for p in prompts] != sorted(p.startswith("q") for p in prompts)  # the sources interleave
    assert [(t["key"], t["rows"], t["available"]) for t in taken] == [
        ("dataset.mix[0]", 10, 10),
        ("dataset.mix[1]", 30, 100),
    ]
    assert taken[1]["eval_rows"] == len(held_out) == 200  # the arith task's held-out split; qa.jsonl has none
    again, _ = build_datasets(spec.dataset, recipe, "sft", chat=False)
    assert again.to_list() == train.to_list()
    other = _recipe({**_mix(qa_file), "seed": 7}, tmp_path)
    reseeded, _ = build_datasets(other.stages[0].dataset, other, "sft", chat=False)
    reseeded_prompts = [_text(p) for p in reseeded["prompt"]]
    assert reseeded_prompts != prompts and sum(p.startswith("q") for p in reseeded_prompts) == 10


def test_a_scarce_source_is_upsampled_evenly(qa_file, tmp_path):
    """size 80: qa.jsonl's share is 20 of its 10 rows: each row exactly twice."""
    recipe = _recipe(_mix(qa_file, size=80), tmp_path)
    train, _ = build_datasets(recipe.stages[0].dataset, recipe, "sft", chat=False)
    qa = [_text(p) for p in train["prompt"] if _text(p).startswith("q")]
    assert len(qa) == 20 and all(qa.count(f"q{i}?") == 2 for i in range(10))


def test_mixture_errors_name_the_source(qa_file, tmp_path):
    missing = _mix(qa_file)
    missing["mix"][1] = {"path": str(tmp_path / "nope.jsonl"), "weight": 0.5}
    recipe = _recipe(missing, tmp_path)
    with pytest.raises(DataError, match=r"mix\[1\]: dataset file not found: .*nope\.jsonl"):
        check_dataset(recipe.stages[0].dataset, recipe, "sft")
    unmapped = _mix(qa_file)
    del unmapped["mix"][0]["columns"]
    recipe = _recipe(unmapped, tmp_path)
    with pytest.raises(DataError, match=r"qa\.jsonl"):
        check_dataset(recipe.stages[0].dataset, recipe, "sft")
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "plain text"}] * 3)
    other_format = _mix(qa_file)
    other_format["mix"][1] = {"path": texts, "weight": 0.5}
    recipe = _recipe(other_format, tmp_path)
    with pytest.raises(
        DataError, match=r"same columns.*mix\[0\] \(.*qa\.jsonl\): completion, prompt; mix\[1\] .*: text"
    ):
        check_dataset(recipe.stages[0].dataset, recipe, "sft")
    with pytest.raises(DataError, match="same columns"):
        build_datasets(recipe.stages[0].dataset, recipe, "sft", chat=False)


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({"path": "a.jsonl", "mix": [{"path": "b.jsonl"}]}, "give `path` .* or `mix` .*not both"),
        ({"split": "train"}, "give `path` .* or `mix`"),
        ({"mix": [{"path": "a.jsonl"}], "columns": {"prompt": "q"}}, "columns of a mixture go on each of its sources"),
        ({"mix": [{"path": "a.jsonl", "weight": 0}]}, "weight"),
        ({"mix": [{"mix": [{"path": "a.jsonl"}]}]}, r"unknown key 'stages\[0\]\.dataset\.mix\[0\]\.mix'"),
        ({"path": "a.jsonl", "weight": 0.5}, "weight is a `mix` source's share"),
    ],
)
def test_a_malformed_mixture_is_a_recipe_error(dataset, message, tmp_path):
    with pytest.raises(RecipeError, match=message) as err:
        _recipe(dataset, tmp_path)
    assert "dataset" in str(err.value)


def test_the_fingerprint_covers_every_source(qa_file, tmp_path):
    from alignlab.fingerprint import stage_parts

    recipe = _recipe(_mix(qa_file), tmp_path)
    before = stage_parts(recipe, recipe.stages[0], {"input": None})
    assert {"dataset.mix[0].content", "dataset.mix[1].content", "dataset.mix[1].eval_content"} <= set(before)
    with open(qa_file, "a") as f:
        f.write(json.dumps({"question": "q10?", "answer": "a10"}) + "\n")
    after = stage_parts(recipe, recipe.stages[0], {"input": None})
    assert before["dataset.mix[0].content"] != after["dataset.mix[0].content"]
    assert before["dataset.mix[1].content"] == after["dataset.mix[1].content"]


def test_an_sft_stage_trains_on_a_mixture_and_records_each_source(qa_file, tmp_path):
    from alignlab.contract import StageOutput
    from alignlab.validate import validate_recipe
    from tests.helpers import write_yaml

    train = {"max_steps": 1, "per_device_batch_size": 4, "max_length": 64}
    raw = make_recipe(
        [{"name": "sft", "type": "sft", "dataset": _mix(qa_file, size=12), "train": train}], tmp_path / "run"
    )
    validate_recipe(write_yaml(tmp_path / "recipe.yaml", raw))
    run_recipe(raw)
    data = StageOutput.load(tmp_path / "run" / "sft").data
    assert [(d["key"], d["path"], d["rows"], d["available"]) for d in data] == [
        ("dataset.mix[0]", qa_file, 3, 10),  # 0.25 * 12
        ("dataset.mix[1]", "builtin:arith", 9, 100),
    ]
