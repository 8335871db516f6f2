"""Fuzzing every input `alignlab validate` reads, with Hypothesis: broken recipes, messy data files and reward
functions that misbehave. The property is the promise of the command line: on any input, `alignlab validate` (the
checks `alignlab run` makes before it loads a model) accepts, or stops with alignlab's own error (exit 2, one
`error:` message naming the file, key or row) and writes nothing. An exception of any other kind escaping is a
failure, and Hypothesis reports the smallest input it found that raises it.

Three generators:
- recipes: every shipped recipe (recipes/**/*.yaml, read when the test runs) with one to three mutations: a key
  deleted, renamed to a near miss or moved to the wrong level, a value of another type or out of range, a stage
  reference to an unknown or later stage, a stage dropped or duplicated, a command-line override on a path that
  does not exist, the YAML text cut short;
- data files: every format (jsonl, json, csv, parquet; prompt/completion, chat messages, plain text, preference
  pairs, unpaired feedback, prompts) with wrong JSON types per column, empty and missing cells, unknown and missing
  roles, chats without an assistant turn or with only a system turn, NUL bytes, huge rows, mixed column sets,
  prompts longer than train.max_length, and files in UTF-16, UTF-8 with a byte-order mark, with a Latin-1 byte
  inside a line, with CRLF line ends, or cut short;
- reward and revise functions that raise, return the wrong length, None, NaN, inf, text, numpy scalars and arrays,
  tensors of the wrong shape or on the meta device, or objects that cannot be read as numbers at all.

Budgets: the default tier runs a fixed sample (the `alignlab-ci` profile: derandomized, so the same cases on every
machine, no example database, no deadline), about 20 s on 2 cores. `ALIGNLAB_FUZZ=N` runs N random cases per
generator instead (`alignlab-long`), for a fuzzing session:
    ALIGNLAB_FUZZ=2000 python -m pytest -q tests/test_fuzz.py
Every failure a session finds becomes a fixed case in tests/test_bad_input.py.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import re
import sys
import tempfile
import types
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from alignlab.cli import main
from tests.helpers import Unreadable, make_recipe, write_jsonl, write_yaml

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(
    p for p in (REPO / "recipes").rglob("*.yaml") if p.parent.name not in ("accelerate", "slurm")
)  # the launcher configs beside them are not recipes

_FUZZ = os.environ.get("ALIGNLAB_FUZZ", "")
settings.register_profile(
    "alignlab-ci",
    derandomize=True,  # the same cases on every run and machine
    database=None,  # no failing examples remembered between runs: each run is the same
    deadline=None,  # one validation may take a second on a busy machine: never a flaky timing failure
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
settings.register_profile("alignlab-long", settings.get_profile("alignlab-ci"), derandomize=False)


def fuzz(ci_examples: int) -> settings:
    """The settings of one generator: its fixed sample in the default tier, ALIGNLAB_FUZZ random cases on demand."""
    if _FUZZ:
        return settings(settings.get_profile("alignlab-long"), max_examples=int(_FUZZ))
    return settings(settings.get_profile("alignlab-ci"), max_examples=ci_examples)


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Every generated data file gets its own Arrow cache from `datasets`: keep those out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-datasets")))


def validate(capsys, recipe: Path, overrides=(), names=()) -> tuple[int, str]:
    """`alignlab validate RECIPE OVERRIDES` as the command line runs it. Asserts the property: exit 0, or exit 2 with
    alignlab's one-message error naming the recipe file, an override or one of `names` (the data files); and
    nothing written into the recipe's folder. Any other exception propagates to Hypothesis."""
    before = sorted(recipe.parent.rglob("*"))
    capsys.readouterr()
    code = main(["validate", str(recipe), *overrides])
    err = capsys.readouterr().err
    assert code in (0, 2), err
    if code == 2:  # (what libraries log before it may hold anything: a closed capture stream's logging error)
        start = re.search(r"(?m)^error: ", err)
        assert start, err
        message = err[start.start() :]
        assert "Traceback" not in message, message
        assert any(str(n) in message for n in (recipe, "override", *names)), f"names no file or key:\n{message}"
    assert sorted(recipe.parent.rglob("*")) == before, "validate wrote into the recipe's folder"
    event(f"exit {code}" + (f": {_kind(message)}" if code == 2 else ""))  # --hypothesis-show-statistics counts them
    return code, err


def _kind(message: str) -> str:
    """The kind of an error message, for the statistics: its first problem without paths, numbers and values."""
    first = message.split("\n  - ")[1] if "\n  - " in message else message.removeprefix("error: ")
    first = re.sub(r"/tmp/\S+|'[^']*'|\d+", "_", first)
    return first[:90]


# ================================================================================================== recipes

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)
EXTREME_NUMBERS = [0, -1, -0.5, 1e-12, 1e12, 2**63, -(2**63), math.nan, math.inf, -math.inf, True]
EXTREME_TEXT = ["", " ", "\t", "x" * 3000, "../../etc", "a/b", "builtin:", "stage:", "é", "\x00", "~", "null", "NaN"]
# Values for keys naming files and folders: NUL, half a surrogate pair, names longer than file systems allow.
BAD_PATHS = ["a\x00b", "\ud800", "x" * 300, "/tmp/" + "é" * 200, "", ".", "/", "~nobody/x", "stage:", "builtin:x"]
PATH_KEYS = ("output_dir", "name", "name_or_path", "tokenizer", "chat_template", "gguf_file", "path", "eval_path")
STAGE_REF_KEYS = ("input", "reference", "reward_model", "policy", "dataset")


def tree_paths(node, prefix=()) -> list[tuple]:
    """Every place in a YAML tree: a tuple of mapping keys and list indexes."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        out.append((*prefix, key))
        out += tree_paths(child, (*prefix, key))
    return out


def parent_of(raw, path):
    node = raw
    for key in path[:-1]:
        node = node[key]
    return node


def near_miss(key: str, how: int) -> str:
    """A key as a hurried user writes it: a letter dropped, doubled or swapped, a plural, a dash, capitals."""
    if not key:
        return "x"
    i = how % len(key)
    variants = [
        key[:i] + key[i + 1 :],
        key[:i] + key[i] + key[i:],
        key[:i] + key[i + 1 : i + 2] + key[i : i + 1] + key[i + 2 :],
        key + "s",
        key.replace("_", "-"),
        key.upper(),
    ]
    return variants[how % len(variants)] or "x"


@st.composite
def recipe_mutation(draw, raw: dict) -> tuple[dict, list[str], str | None]:
    """One mutation of the recipe tree `raw` (changed in place): returns (raw, overrides, what), where `what` is None
    for a mutation of the tree and a description otherwise."""
    paths = [p for p in tree_paths(raw) if p[0] != "output_dir"]  # the run folder stays in the test's tmp folder
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    op = draw(
        st.sampled_from(
            [
                "delete",
                "retype",
                "extreme",
                "rename",
                "renest",
                "stage_ref",
                "drop_stage",
                "dup_stage",
                "override",
                "bad_path",
            ]
        )
    )
    if op in ("stage_ref", "drop_stage", "dup_stage") and not stages:
        op = "retype"
    if op == "bad_path":
        named = [p for p in tree_paths(raw) if p[-1] in PATH_KEYS and isinstance(_at(raw, p), str)]
        where = draw(st.sampled_from(named)) if named else ("output_dir",)
        bad = draw(st.sampled_from(BAD_PATHS))
        parent_of(raw, where)[where[-1]] = "OUT/" + bad if where == ("output_dir",) else bad
        return raw, [], f"bad path {where}"
    path = draw(st.sampled_from(paths)) if paths else ("name",)
    parent, key = (parent_of(raw, path), path[-1]) if paths else (raw, "name")
    if op == "delete":
        del parent[key]
    elif op == "retype":
        parent[key] = draw(ANY_VALUE.filter(lambda v: type(v) is not type(parent[key])))
    elif op == "extreme":
        value = parent[key]
        if isinstance(value, bool | int | float):
            parent[key] = draw(st.sampled_from(EXTREME_NUMBERS))
        elif isinstance(value, str):
            parent[key] = draw(st.sampled_from(EXTREME_TEXT))
        else:
            parent[key] = type(value)()
    elif op == "rename" and isinstance(parent, dict):
        parent[near_miss(str(key), draw(st.integers(0, 99)))] = parent.pop(key)
    elif op == "renest" and isinstance(parent, dict):
        value = parent.pop(key)
        mappings = [p for p in [(), *tree_paths(raw)] if isinstance(_at(raw, p), dict)]
        target = draw(st.sampled_from(mappings))
        _at(raw, target)[key] = value if draw(st.booleans()) else {key: value}
    elif op == "stage_ref":
        i = draw(st.integers(0, len(stages) - 1))
        names = [s.get("name") for s in stages if isinstance(s, dict)]
        ref = draw(st.sampled_from([*(n for n in names if isinstance(n, str)), "nope", "base", "previous", "", "sftt"]))
        which = draw(st.sampled_from(STAGE_REF_KEYS))
        if isinstance(stages[i], dict):
            if which == "dataset":
                stages[i]["dataset"] = {"path": f"stage:{ref}"}
            else:
                stages[i][which] = ref
    elif op == "drop_stage":
        del stages[draw(st.integers(0, len(stages) - 1))]
    elif op == "dup_stage":
        i = draw(st.integers(0, len(stages) - 1))
        stages.insert(draw(st.integers(0, len(stages))), copy.deepcopy(stages[i]))
    elif op == "override":
        return raw, [draw(override(raw))], "override"
    return raw, [], None


def _at(raw, path):
    node = raw
    for key in path:
        node = node[key]
    return node


@st.composite
def override(draw, raw: dict) -> str:
    """A command-line override on a path of the recipe, a path one step past it, or one that does not exist;
    stages named by name or index; sometimes a removal (~key)."""
    paths = tree_paths(raw) or [("name",)]
    path = [str(k) for k in draw(st.sampled_from(paths))]
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    if path[0] == "stages" and len(path) > 1 and draw(st.booleans()):  # by name
        i = int(path[1])
        name = stages[i].get("name") if i < len(stages) and isinstance(stages[i], dict) else None
        path[1] = str(name) if name is not None else "-1"
    tail = draw(st.sampled_from(["", "", "x", "learning_rat", "0", "-9"]))
    key = ".".join([*path, tail] if tail else path)
    if draw(st.integers(0, 5)) == 0:
        return "~" + key
    value = draw(st.sampled_from(["1", "-1", "0", "null", "[1", "{a: 1}", "'x'", "1e400", "true", "", "nan", "é"]))
    return f"{key}={value}"


@st.composite
def mutated_recipe(draw) -> tuple[Path, str, list[str], list[str]]:
    """(the shipped recipe, its mutated YAML text, overrides, the mutations made)."""
    source = draw(st.sampled_from(RECIPES))
    raw = yaml.safe_load(source.read_text())
    raw["output_dir"] = "OUT"
    overrides, made = [], []
    for _ in range(draw(st.integers(1, 3))):
        before = copy.deepcopy(raw)
        raw, more, what = draw(recipe_mutation(raw))
        overrides += more
        made.append(what or _diff(before, raw))
    text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    if draw(st.integers(0, 9)) == 0:  # the file cut short, as by an interrupted copy
        text = text[: int(len(text) * draw(st.floats(0.2, 1)))]
        made.append("text cut short")
    return source, text, overrides, made


def _diff(before, after) -> str:
    return f"{len(json.dumps(before, default=str))} -> {len(json.dumps(after, default=str))} chars"


def test_every_shipped_recipe_is_fuzzed():
    """The generator reads the recipes folder at test time: every shipped recipe is a seed of the fuzzing."""
    assert len(RECIPES) >= 10 and (REPO / "recipes" / "quickstart.yaml") in RECIPES
    assert not [p for p in RECIPES if "accelerate" in p.parts]


@fuzz(ci_examples=45)
@given(case=mutated_recipe())
def test_mutated_recipes_validate_or_fail_clearly(case, capsys):
    source, text, overrides, _ = case
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipes" / source.name
        recipe.parent.mkdir()
        text = text.replace("output_dir: OUT", f"output_dir: {tmp}/run").replace(
            "output_dir: 'OUT", f"output_dir: '{tmp}/run"
        )
        recipe.write_bytes(text.encode("utf-8", "surrogatepass"))
        validate(capsys, recipe, overrides)
        assert not (Path(tmp) / "run").exists()


# ============================================================================================== data files

# One valid row per format, and the stage that reads it (minimal stages: the defaults of every other key).
BASE_ROWS = {
    "prompt_completion": lambda i: {"prompt": f"What is {i} + 1? Café", "completion": f"{i + 1}"},
    "messages": lambda i: {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"What is {i} + 1? Café"},
            {"role": "assistant", "content": f"{i + 1}"},
        ]
    },
    "text": lambda i: {"text": f"{i} plus one is {i + 1}. Café"},
    "preference": lambda i: {"prompt": f"What is {i} + 1? Café", "chosen": f"{i + 1}", "rejected": f"{i + 2}"},
    "unpaired": lambda i: {"prompt": f"What is {i} + 1? Café", "completion": f"{i + 1}", "label": i % 2 == 0},
    "prompt": lambda i: {"prompt": f"What is {i} + 1? Café", "answer": f"{i + 1}"},
}
STAGE_OF = {
    "prompt_completion": "sft",
    "messages": "sft",
    "text": "sft",
    "preference": "dpo",
    "unpaired": "kto",
    "prompt": "grpo",
}
REWARD = "tests.helpers:length_reward"
BAD_CELLS = [None, "", 7, 2.5, True, [], {}, ["a"], {"role": "user"}, "\x00", "nul\x00inside", "\ud83d"]
BAD_CELLS += ["x" * 20000, "a\u2028b\x1cc"]  # a huge cell; line separators that are not newlines
BAD_MESSAGES = [
    [],
    [{"role": "user", "content": "hi"}],  # no assistant turn
    [{"role": "system", "content": "only a system turn"}],
    [{"role": "assistant", "content": "an answer without a question"}],
    [{"content": "no role"}, {"role": "assistant", "content": "2"}],
    [{"role": "assitant", "content": "2"}],
    [{"role": "user", "content": 1}, {"role": "assistant", "content": "2"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "hi"}, {"role": "assistant"}],
    [{"role": "user", "content": "hi"}, "not a message"],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "2"}]}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "2", "extra": 1}],
]
LABELS = [True, False, 1, 0, -1, "up", "down", "👍", "👎🏽", "maybe", None, 2, 0.5, "", "TRUE"]


@st.composite
def messy_rows(draw, fmt: str, clean: bool = False) -> list[dict]:
    rows = [BASE_ROWS[fmt](i) for i in range(draw(st.integers(0, 6)))]
    for row in rows:
        if draw(st.integers(0, 12 if clean else 2)) > 0:
            continue  # most rows stay valid: the bad one may be anywhere
        col = draw(st.sampled_from(sorted(row)))
        change = draw(st.sampled_from(["cell", "drop", "extra", "messages", "label", "long_prompt"]))
        if change == "cell":
            row[col] = draw(st.sampled_from(BAD_CELLS))
        elif change == "drop":
            del row[col]
        elif change == "extra":
            row[draw(st.sampled_from(["extra", "Prompt", "messages", "margin", "label"]))] = draw(
                st.sampled_from([1, "x", None, [1], 0.5])
            )
        elif change == "messages":
            row["messages" if fmt == "messages" else col] = copy.deepcopy(draw(st.sampled_from(BAD_MESSAGES)))
        elif change == "label":
            row["label"] = draw(st.sampled_from(LABELS))
        elif change == "long_prompt" and "prompt" in row:
            row["prompt"] = "Please add one and one. " * 60  # more tokens than train.max_length
    if fmt == "preference" and rows and draw(st.integers(0, 5)) == 0:
        rows[0]["rejected"] = rows[0].get("chosen")
    return rows


def write_data(path: Path, rows: list[dict], encoding: str, damage: str, cut: float) -> None:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowException, TypeError, ValueError):  # mixed types in a column: as a writer of text would
            table = pa.Table.from_pylist([{k: json.dumps(v) for k, v in r.items()} for r in rows])
        pq.write_table(table, path)
        data = path.read_bytes()
    else:
        ascii_only = encoding == "utf-8-ascii"  # non-ASCII as \\u escapes (a lone surrogate stays one)
        if path.suffix == ".jsonl":
            text = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows)
        elif path.suffix == ".json":
            text = json.dumps(rows, ensure_ascii=ascii_only, indent=1)
        else:
            buf = io.StringIO()
            columns = list(dict.fromkeys(k for r in rows for k in r))
            writer = csv.DictWriter(buf, fieldnames=columns)
            if columns:
                writer.writeheader()
            for r in rows:
                writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()})
            text = buf.getvalue()
        if damage == "crlf":
            text = text.replace("\n", "\r\n")
        elif damage == "blank_lines":
            text = text.replace("\n", "\n\n", 2)
        if encoding == "utf-8-sig":
            data = text.encode("utf-8-sig", "surrogatepass")
        elif encoding == "utf-16":
            data = text.encode("utf-16", "surrogatepass")
        elif encoding == "latin-1-inside":  # valid JSON/CSV lines, but an é written as the one byte 0xE9
            data = text.encode("utf-8", "surrogatepass").replace("é".encode(), b"\xe9", 1)
        else:  # a lone surrogate written raw, as some exporters do, is no UTF-8
            data = text.encode("utf-8", "surrogatepass")
    if damage == "cut":
        data = data[: int(len(data) * cut)]
    path.write_bytes(data)


@st.composite
def data_case(draw, formats=tuple(sorted(BASE_ROWS)), clean: bool = False) -> dict:
    """A data file and the dataset keys that read it. `clean`: mostly files validation accepts (for the run test)."""
    fmt = draw(st.sampled_from(formats))
    encodings = ["utf-8", "utf-8", "utf-8", "utf-8-ascii", "utf-8-sig", "utf-16", "latin-1-inside"]
    damages = ["none", "none", "none", "cut", "crlf", "blank_lines"]
    spec = st.dictionaries(
        st.sampled_from(["eval_fraction", "max_samples", "flip_rate", "columns", "eval_path"]),
        st.sampled_from([0, 1, 0.5, 0.99, {"prompt": "question"}, {"completion": "prompt"}, "SELF"]),
        max_size=2,
    )
    return {
        "fmt": fmt,
        "rows": draw(messy_rows(fmt, clean)),
        "suffix": draw(st.sampled_from([".jsonl", ".jsonl", ".json", ".csv", ".parquet"])),
        "encoding": draw(st.sampled_from(encodings[:5] if clean else encodings)),
        "damage": draw(st.sampled_from([d for d in damages if d != "cut"] if clean else damages)),
        "cut": draw(st.floats(0, 1)),
        "max_length": draw(st.sampled_from([None, None, 64, 8])),
        "declared": draw(st.sampled_from(["auto", "auto", "auto", fmt, "messages", "preference"])),
        "spec": {} if clean else draw(spec),
    }


def data_recipe(tmp: Path, case: dict) -> Path:
    """A one-stage recipe reading the case's data file (a grpo stage for prompts), on the built-in tiny model."""
    data = tmp / f"data{case['suffix']}"
    write_data(data, case["rows"], case["encoding"], case["damage"], case["cut"])
    stage = {"name": "stage", "type": STAGE_OF[case["fmt"]], "dataset": {"path": str(data)}}
    if case["declared"] != "auto":
        stage["dataset"]["format"] = case["declared"]
    for key, value in case["spec"].items():  # schema errors for the wrong types are part of the fuzzing
        stage["dataset"][key] = str(data) if value == "SELF" else value
    if stage["type"] == "grpo":
        stage["reward_fn"] = REWARD
    elif case["max_length"] is not None:
        stage["train"] = {"max_length": case["max_length"]}
    return Path(write_yaml(tmp / "recipe.yaml", make_recipe([stage], tmp / "run", name="fuzz")))


@fuzz(ci_examples=60)
@given(case=data_case())
def test_messy_data_files_validate_or_fail_clearly(case, capsys, tiny_model_path):
    with tempfile.TemporaryDirectory() as tmp:
        recipe = data_recipe(Path(tmp), case)
        validate(capsys, recipe, names=[f"data{case['suffix']}"])
        assert not (Path(tmp) / "run").exists()


# ================================================================================= reward and revise functions


def returned_values(n: int):
    """What a reward function may return for n completions, good and bad."""
    import numpy as np
    import torch

    one = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(10**400), 10**400),
        st.sampled_from(["0.5", "high", "", None, b"1", [1.0], {"a": 1}, Unreadable()]),
        st.builds(np.float32, st.floats(-1e3, 1e3)),
        st.builds(np.int64, st.integers(-5, 5)),
        st.builds(lambda x: torch.tensor(x), st.floats(-1, 1)),
        st.just(torch.tensor(0.5, device="meta")),
        st.just(torch.tensor([0.5, 0.5])),
    )
    return st.one_of(
        st.lists(one, min_size=n, max_size=n),
        st.lists(one, max_size=n + 2),
        st.lists(one, min_size=n, max_size=n).map(tuple),
        st.builds(lambda k: np.linspace(0, 1, k), st.integers(0, n + 1)),
        st.builds(lambda k: np.zeros((k, 2)), st.integers(0, n + 1)),
        st.builds(lambda k: torch.rand(k), st.just(n)),
        st.just(torch.zeros(n, device="meta")),
        st.just(torch.tensor(1.0)),
        st.just(np.float64(1.0)),
        st.sampled_from([None, 0.5, "0.5", {"score": 1}, b"", set(), Unreadable()]),
        st.builds(lambda k: (float(i) for i in range(k)), st.just(n)),
    )


@st.composite
def misbehaving_fn(draw, n: int, revise: bool = False):
    """(a function of (prompts, completions), what it does)."""
    how = draw(st.sampled_from(["returns", "returns", "returns", "raises", "signature"]))
    if how == "raises":
        error = draw(
            st.sampled_from([ValueError("bad"), ZeroDivisionError("division by zero"), KeyError("k"), Unreadable()])
        )

        def fn(prompts, completions):
            raise error

    elif how == "signature":

        def fn(completions):
            return [0.0 for _ in completions]

    else:
        texts = st.one_of(st.text(max_size=5), st.none(), st.integers(), st.just(b"x"), st.just(Unreadable()))
        value = draw(
            st.one_of(st.lists(texts, min_size=n, max_size=n), returned_values(n)) if revise else returned_values(n)
        )

        def fn(prompts, completions):
            return value

    return fn, how


PROMPTS = ["What is 1 + 1?", [{"role": "user", "content": "What is 2 + 2?"}], "", "x" * 50]
COMPLETIONS = ["2", "", "four", "4 " * 30]


@fuzz(ci_examples=150)
@given(data=st.data())
def test_misbehaving_reward_fns_are_stopped_with_their_name(data):
    """Every call of a reward function during a run (PPO, GRPO, generate, eval) goes through reward_fn_scores: it
    gives one float per completion, or stops with RewardFnError (a StageFailed: exit 1, one message) that names the
    function. With allow_nonfinite (the RL loops, which stop on nan themselves) nan and inf pass."""
    from alignlab.rewards import RewardFnError, reward_fn_scores

    n = data.draw(st.integers(1, 4))
    fn, _ = data.draw(misbehaving_fn(n))
    allow = data.draw(st.booleans())
    try:
        scores = reward_fn_scores(fn, PROMPTS[:n], COMPLETIONS[:n], name="reward_fn fuzz:score", allow_nonfinite=allow)
    except RewardFnError as e:
        assert str(e).startswith("reward_fn fuzz:score ")
        return
    assert len(scores) == n and all(type(s) is float for s in scores)
    assert allow or all(math.isfinite(s) for s in scores)


@fuzz(ci_examples=80)
@given(data=st.data())
def test_misbehaving_revise_fns_are_stopped_with_their_name(data):
    """A generate stage's revise_fn gives one string (or None: keep the sample) per completion, or the stage stops
    with RewardFnError naming it."""
    from alignlab.rewards import RewardFnError, revise_texts

    n = data.draw(st.integers(1, 4))
    fn, _ = data.draw(misbehaving_fn(n, revise=True))
    try:
        texts = revise_texts(fn, PROMPTS[:n], COMPLETIONS[:n], "fuzz:revise")
    except RewardFnError as e:
        assert str(e).startswith("revise_fn fuzz:revise ")
        return
    assert len(texts) == n and all(isinstance(t, str) for t in texts)


@fuzz(ci_examples=25)
@given(data=st.data())
def test_misbehaving_functions_in_a_recipe_fail_validation_clearly(data, capsys, tiny_model_path, monkeypatch):
    """The same functions named in a recipe (a grpo stage's reward_fn, or a generate stage's revise_fn): `alignlab
    validate` tries them on the stage's first prompts and names the stage's key."""
    revise = data.draw(st.booleans())
    fn, _ = data.draw(misbehaving_fn(4, revise=revise))
    module = types.ModuleType("fuzz_functions")
    module.fn = fn
    monkeypatch.setitem(sys.modules, "fuzz_functions", module)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = write_jsonl(Path(tmp) / "prompts.jsonl", [BASE_ROWS["prompt"](i) for i in range(3)])
        stage = {"name": "rl", "type": "grpo", "dataset": {"path": prompts}, "reward_fn": "fuzz_functions:fn"}
        if revise:
            stage = {
                "name": "best",
                "type": "generate",
                "dataset": {"path": prompts},
                "reward_fn": REWARD,
                "output": "sft",
                "revise_fn": "fuzz_functions:fn",
            }
        recipe = Path(write_yaml(Path(tmp) / "recipe.yaml", make_recipe([stage], Path(tmp) / "run", name="fuzz")))
        code, err = validate(capsys, recipe)
        if code == 2:
            assert f".{'revise_fn' if revise else 'reward_fn'}: " in err, err


@pytest.mark.slow
@fuzz(ci_examples=8)
@given(data=st.data())
def test_data_that_validates_trains_one_step_or_fails_clearly(data, capsys, tiny_model_path):
    """What `alignlab validate` accepts, `alignlab run` takes through a first training step, or stops with alignlab's
    own error (exit 1 or 2), the run folder's lock released and no stage recorded as finished. (A chat without any
    assistant turn used to pass validation and end in a traceback from torch's sampler once the model had loaded.)"""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for _ in range(20):  # a case validation accepts
            case = data.draw(
                data_case(formats=("messages", "preference", "prompt_completion", "text", "unpaired"), clean=True)
            )
            recipe = data_recipe(tmp, case)
            if validate(capsys, recipe)[0] == 0:
                break
        else:
            return
        code = main(["run", str(recipe), "stages.stage.train.max_steps=1", "--threads", "1"])
        err = capsys.readouterr().err
        assert code in (0, 1, 2), err
        if code == 0:
            assert (tmp / "run" / "stage" / "stage_output.json").is_file()
        else:
            message = err[re.search(r"(?m)^error: ", err).start() :]
            assert "Traceback" not in message, message
            assert not list((tmp / "run").rglob("stage_output.json"))
        assert not (tmp / "run" / ".alignlab.lock").exists()
        event(f"run: exit {code}")
