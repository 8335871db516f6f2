"""Data layer: file formats, column mapping, chat wrapping, row errors that name file/row/column, label flips."""

import json

import pytest

from alignlab.data import DataError, build_datasets, check_dataset, flip_labels
from alignlab.recipe import DatasetSpec


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PAIRS = [{"question": f"q{i}", "good": f"a{i}", "bad": f"b{i}"} for i in range(10)]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_file_formats_and_column_mapping(tmp_path, suffix):
    import pandas as pd

    path = tmp_path / f"pairs{suffix}"
    df = pd.DataFrame(PAIRS)
    {
        ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
        ".csv": lambda: df.to_csv(path, index=False),
        ".parquet": lambda: df.to_parquet(path),
    }[suffix]()
    spec = DatasetSpec(path=str(path), columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    train, eval_ds = build_datasets(spec, None, "dpo", chat=False)
    assert train.column_names == ["chosen", "rejected", "prompt"] and len(train) == 10 and eval_ds is None
    assert train[3] == {"prompt": "q3", "chosen": "a3", "rejected": "b3"}


def test_chat_wrapping_of_plain_strings(tmp_path):
    path = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "hi", "completion": "hello"}])
    train, _ = build_datasets(DatasetSpec(path=str(path)), None, "sft", chat=True)
    assert train[0] == {
        "prompt": [{"role": "user", "content": "hi"}],
        "completion": [{"role": "assistant", "content": "hello"}],
    }


def test_format_detection_prefers_messages_for_sft(tmp_path):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": msgs, "other": 1}])
    train, _ = build_datasets(DatasetSpec(path=str(path)), None, "sft", chat=True)
    assert train.column_names == ["messages"] and train[0]["messages"] == msgs


def test_eval_fraction_split_is_seeded(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(50)])
    spec = DatasetSpec(path=str(path), eval_fraction=0.2, seed=1)
    a_train, a_eval = build_datasets(spec, None, "sft", chat=False)
    b_train, b_eval = build_datasets(spec, None, "sft", chat=False)
    assert len(a_eval) == 10 and len(a_train) == 40 and a_eval["prompt"] == b_eval["prompt"]
    assert not set(a_eval["prompt"]) & set(a_train["prompt"])


def test_missing_mapped_column_names_file_and_columns(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    spec = DatasetSpec(path=str(path), columns={"prompt": "questoin"})
    with pytest.raises(DataError, match=r"pairs.jsonl: column\(s\) questoin .* its columns are: question, good, bad"):
        build_datasets(spec, None, "dpo", chat=False)


def test_wrong_columns_for_stage_say_how_to_map(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(DataError, match=r"a dpo stage needs columns chosen\+rejected; .* dataset.columns"):
        build_datasets(DatasetSpec(path=str(path)), None, "dpo", chat=False)


def test_empty_cell_names_row_and_column(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "", "rejected": "b"}]
    with pytest.raises(DataError, match=r"row 1: column 'chosen' is missing or empty"):
        build_datasets(DatasetSpec(path=str(_jsonl(tmp_path / "x.jsonl", rows))), None, "dpo", chat=False)


def test_chosen_equal_rejected_is_an_error(tmp_path):
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}]
    with pytest.raises(DataError, match=r"x.jsonl: row 0: 'chosen' and 'rejected' are identical"):
        build_datasets(DatasetSpec(path=str(_jsonl(tmp_path / "x.jsonl", rows))), None, "dpo", chat=False)


def test_malformed_chat_message(tmp_path):
    rows = [{"messages": [{"role": "user", "text": "no content key"}]}]
    with pytest.raises(DataError, match=r"row 0: column 'messages' message 0 is malformed"):
        build_datasets(DatasetSpec(path=str(_jsonl(tmp_path / "x.jsonl", rows))), None, "sft", chat=True)


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="empty"):
        build_datasets(DatasetSpec(path=str(path)), None, "sft", chat=False)


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match=r"dataset file not found: .*nope.jsonl"):
        check_dataset(DatasetSpec(path=str(tmp_path / "nope.jsonl")), None, "sft")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported type '.txt'"):
        check_dataset(DatasetSpec(path=str(tmp_path / "data.txt")), None, "sft")


def test_hub_ids_are_not_checked_offline():
    assert "not checked offline" in check_dataset(DatasetSpec(path="org/some-dataset"), None, "sft")


def test_flip_labels_swaps_exactly_the_seeded_rows(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": str(i), "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(20)])
    flipped_ds, flipped = flip_labels(ds, 0.25, seed=3)
    assert len(flipped) == 5 and flipped == flip_labels(ds, 0.25, seed=3)[1]
    for i, row in enumerate(flipped_ds):
        swapped = i in flipped
        assert row["chosen"] == (f"r{i}" if swapped else f"c{i}")
        assert row["rejected"] == (f"c{i}" if swapped else f"r{i}")


def test_builtin_heldout_prompts_are_disjoint_from_training():
    spec = DatasetSpec(path="builtin:arith", split="preference", size=300, eval_size=50)
    train, eval_ds = build_datasets(spec, None, "dpo", chat=True)
    key = lambda row: row["prompt"][0]["content"]  # noqa: E731
    assert len(eval_ds) == 50 and not {key(r) for r in train} & {key(r) for r in eval_ds}
