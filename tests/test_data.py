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
    with pytest.raises(DataError, match=r"x.jsonl: line 2: column 'chosen' is missing or empty"):
        build_datasets(DatasetSpec(path=str(_jsonl(tmp_path / "x.jsonl", rows))), None, "dpo", chat=False)


def test_chosen_equal_rejected_is_an_error(tmp_path):
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}]
    with pytest.raises(DataError, match=r"x.jsonl: line 1: 'chosen' and 'rejected' are identical"):
        build_datasets(DatasetSpec(path=str(_jsonl(tmp_path / "x.jsonl", rows))), None, "dpo", chat=False)


def test_malformed_chat_message(tmp_path):
    rows = [{"messages": [{"role": "user", "text": "no content key"}]}]
    with pytest.raises(DataError, match=r"x.jsonl: line 1: column 'messages' message 0 is malformed"):
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


def test_rows_are_named_by_their_line_in_the_file(tmp_path):
    """Data errors used to count rows from 0 while JSON errors counted lines from 1. Rows are now named by the
    line they start on, as an editor shows it: blank lines and the CSV header skipped, a quoted CSV field spanning
    lines, objects of a .json list on any line; a file of a folder by name and line; parquet keeps 'row N'."""
    from alignlab.data.formats import row_place

    (tmp_path / "a.jsonl").write_text('{"p": 1}\n\n{"p": 2}\n{"p": 3}\n')
    (tmp_path / "b.csv").write_text('prompt,completion\n"two\nlines",x\n\nq,y\n')
    (tmp_path / "c.json").write_text('[\n  {"p": 1},\n\n  {"p": [1,\n 2]}, {"p": 3}\n]')
    assert [row_place(str(tmp_path / "a.jsonl"), i) for i in range(3)] == ["line 1", "line 3", "line 4"]
    assert [row_place(str(tmp_path / "b.csv"), i) for i in range(2)] == ["line 2", "line 5"]
    assert [row_place(str(tmp_path / "c.json") + " (eval)", i) for i in range(3)] == ["line 2", "line 4", "line 5"]
    (tmp_path / "dir").mkdir()
    _jsonl(tmp_path / "dir" / "x.jsonl", [{"p": 1}])
    _jsonl(tmp_path / "dir" / "y.jsonl", [{"p": 2}, {"p": 3}])
    assert row_place(str(tmp_path / "dir"), 2) == "y.jsonl line 2"
    assert row_place("builtin:arith", 4) == row_place(str(tmp_path / "d.parquet"), 4) == "row 4"


def test_csv_columns_are_read_as_written(tmp_path):
    """pandas reads a CSV column of numbers as numbers: the completion `2.50` trained as `2.5`, `007` as `7`. Text
    columns stay text; a margin column stays a number."""
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected,margin\nHalf of 5?,2.50,2.5e0,1\nBond?,007,7,0.5\n")
    train, _ = build_datasets(DatasetSpec(path=str(path)), None, "reward", chat=False)
    assert train["chosen"] == ["2.50", "007"] and train["rejected"] == ["2.5e0", "7"]
    assert train["margin"] == [1.0, 0.5]
