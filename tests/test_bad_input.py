"""Bad-input catalogue: each broken recipe, override or dataset below makes `alignlab run` stop with exit code 2
and a message that names where the problem is (file and line, key, stage, row, column) and how to fix it. The
checks run before any model loads (loading one fails these tests) and leave no run directory behind.

Each case edits a small valid recipe (SFT -> DPO on tiny local files, built-in tiny model): `edits` maps a
dotted path (list items by index) to its new value, `files` writes data files, `text` replaces the whole YAML.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from alignlab.cli import main

DELETE = object()
SFT_ROWS = [{"prompt": f"What is {i} + {i}?", "completion": f"{2 * i}"} for i in range(4)]
PAIR_ROWS = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(4)]
PPO = {"name": "ppo", "type": "ppo", "input": "sft", "dataset": {"path": "TMP/prompts.jsonl"}}
GRPO = {"name": "grpo", "type": "grpo", "input": "sft", "dataset": {"path": "TMP/prompts.jsonl"}}
FN = "alignlab.builtin.tasks:arith_reward"


def recipe() -> dict:
    return {
        "name": "bad",
        "seed": 0,
        "output_dir": "TMP/run",
        "model": {"name_or_path": "builtin:tiny-llama"},
        "stages": [
            {"name": "sft", "type": "sft", "dataset": {"path": "TMP/sft.jsonl"}, "train": {"max_length": 64}},
            {"name": "dpo", "type": "dpo", "dataset": {"path": "TMP/pairs.jsonl"}, "train": {"max_length": 64}},
        ],
    }


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def no_bitsandbytes(monkeypatch, tmp_path, tiny):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )


def tokenizer_without_template(monkeypatch, tmp_path, tiny):
    """A model folder with config and tokenizer but no chat template, and no weights at all."""
    src = Path(tiny)
    (tmp_path / "plain").mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(src / name, tmp_path / "plain" / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "plain" / "tokenizer_config.json").write_text(json.dumps(config))


def case(id, expect, edits=None, files=None, text=None, overrides=(), setup=None):
    return pytest.param(edits or {}, files or {}, text, list(overrides), setup, expect, id=id)


MESSAGES = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}]
CASES = [
    # ---- the recipe file and its schema
    case(
        "malformed-yaml",
        ["recipe.yaml", "malformed YAML", "line 3", "Check indentation"],
        text="name: x\nstages: [\n  - a: [\n",
    ),
    case(
        "not-a-mapping",
        ["recipe.yaml", "a recipe is a YAML mapping with keys name, model, stages"],
        text="- sft\n- dpo\n",
    ),
    case("unknown-top-level-key", ["recipe.yaml:", "unknown key 'sead'", "Did you mean 'seed'?"], {"sead": 1}),
    case("misspelt-stage-key", ["unknown key 'stages[0].traim'", "Did you mean 'train'?"], {"stages.0.traim": {}}),
    case(
        "misspelt-nested-key",
        ["recipe.yaml:", "unknown key 'stages[1].train.learning_rat'", "Did you mean 'learning_rate'?"],
        {"stages.1.train.learning_rat": 0.1},
    ),
    case("wrong-type", ["stages[0].train.epochs", "valid number", "'three'"], {"stages.0.train.epochs": "three"}),
    case(
        "negative-learning-rate",
        ["stages[0].train.learning_rate", "greater than 0", "-0.001"],
        {"stages.0.train.learning_rate": -1e-3},
    ),
    case("missing-required-key", ["missing required key 'model'"], {"model": DELETE}),
    case("stages-not-a-list", ["'stages' must be a non-empty list"], {"stages": {"sft": {"type": "sft"}}}),
    case(
        "unknown-stage-type",
        ["stages[0].type", "unknown stage type 'sftt'", "Did you mean 'sft'?"],
        {"stages.0.type": "sftt"},
    ),
    case(
        "duplicate-stage-names",
        ["stage names must be unique; repeated: sft", "Give each a 'name'"],
        {"stages.1.name": "sft"},
    ),
    case(
        "bf16-and-fp16",
        ["stages[0].train", "bf16 and fp16 are both true; choose one"],
        {"stages.0.train.bf16": True, "stages.0.train.fp16": True},
    ),
    case(
        "unknown-lr-scheduler",
        ["stages[0] (sft).train.lr_scheduler: unknown scheduler 'cosinee'", "Did you mean 'cosine'?"],
        {"stages.0.train.lr_scheduler": "cosinee"},
    ),
    case(
        "unknown-trl-argument",
        ["stages[0] (sft).train.extra.warmup_stepz: not a field of TRL's SFTConfig", "Did you mean 'warmup_steps'?"],
        {"stages.0.train.extra": {"warmup_stepz": 3}},
    ),
    # ---- command-line overrides
    case(
        "override-without-value",
        ["override 'stages.sft.train.max_steps' must look like key.sub=value"],
        overrides=["stages.sft.train.max_steps"],
    ),
    case(
        "override-unknown-stage",
        ["no stage named 'sfd'; stages are: sft, dpo"],
        overrides=["stages.sfd.train.max_steps=1"],
    ),
    case("override-into-a-value", ["'model.name_or_path' is not a mapping"], overrides=["model.name_or_path.x=1"]),
    # ---- the model
    case(
        "unknown-builtin-model",
        [
            "recipe.yaml: invalid recipe",
            "model.name_or_path: model 'builtin:tiny-gpt': unknown builtin model",
            "tiny-llama",
        ],
        {"model.name_or_path": "builtin:tiny-gpt"},
    ),
    case(
        "model-folder-without-config",
        ["empty_model has no config.json", "point model.name_or_path at a saved model"],
        {"model.name_or_path": "TMP/empty_model"},
    ),
    case(
        "chat-template-file-missing",
        ["model.chat_template: file not found: TMP/nope.jinja"],
        {"model.chat_template": "TMP/nope.jinja"},
    ),
    # ---- preference losses
    case(
        "unknown-loss",
        ["stages[1].loss", "unknown preference loss 'dpoo'", "Did you mean 'dpo'?"],
        {"stages.1.loss": {"name": "dpoo"}},
    ),
    case(
        "eps-out-of-range",
        ["stages[1].loss", "rdpo: eps must be in [0, 0.5), got eps=0.7"],
        {"stages.1.loss": {"name": "rdpo", "eps": 0.7}},
    ),
    case(
        "tau-not-positive",
        ["stages[1].loss", "kldpo: tau must be > 0, got tau=0"],
        {"stages.1.loss": {"name": "kldpo", "tau": 0}},
    ),
    case("beta-not-positive", ["stages[1].loss.beta", "greater than 0"], {"stages.1.loss": {"name": "dpo", "beta": 0}}),
    case(
        "parameter-of-another-loss",
        ["stages[1].loss", "dpo: unknown parameter 'tau'; dpo accepts: none besides beta"],
        {"stages.1.loss": {"name": "dpo", "tau": 1.0}},
    ),
    # ---- PEFT and quantization
    case(
        "quantization-without-qlora",
        ["peft: Value error, quantization is set but method is 'lora'", "Set method: qlora"],
        {"peft": {"method": "lora", "quantization": {"bits": 4}}},
    ),
    case(
        "quantization-with-full-fine-tuning",
        ["quantization is set but method is 'none'", "trains only through adapters"],
        {"peft": {"method": "none", "quantization": {"bits": 8}}},
    ),
    case(
        "qlora-without-bitsandbytes",
        ["qlora needs bitsandbytes", "pip install bitsandbytes"],
        {"peft": {"method": "qlora"}},
        setup=no_bitsandbytes,
    ),
    case(
        "lora-target-not-in-model",
        ["peft.target_modules: query_key_value not found in the model", "q_proj", "or 'all-linear'"],
        {"peft": {"method": "lora", "target_modules": ["q_proj", "query_key_value"]}},
    ),
    case("lora-rank-zero", ["peft.r", "greater than 0"], {"peft": {"method": "lora", "r": 0}}),
    # ---- the stage chain
    case(
        "input-stage-absent",
        [
            "recipe.yaml: invalid recipe",
            "stages[1] (dpo).input = 'sfd', which is not a stage of this recipe",
            "earlier stages: sft",
        ],
        {"stages.1.input": "sfd"},
    ),
    case(
        "input-refers-forward",
        ["stages[0] (sft).input = 'dpo', which comes later in the recipe"],
        {"stages.0.input": "dpo"},
    ),
    case(
        "reward-model-not-a-reward-stage",
        ["stages[2] (ppo).reward_model = 'dpo' is a dpo stage, not a reward stage"],
        {"stages.2": {**PPO, "reward_model": "dpo"}},
    ),
    case(
        "eval-with-nothing-to-evaluate",
        [
            "stages[0] (eval): evaluates the base model (no training stage comes before it) against itself",
            "Put the eval stage after a training stage",
            "input: base",
        ],
        {"stages": [{"name": "eval", "type": "eval", "dataset": {"path": "TMP/prompts.jsonl"}, "reward_fn": FN}]},
    ),
    # ---- PPO rewards
    case(
        "ppo-reward-model-and-reward-fn",
        ["stages[2]", "needs exactly one of reward_model", "or reward_fn"],
        {"stages.2": {**PPO, "reward_model": "dpo", "reward_fn": FN}},
    ),
    case("ppo-without-reward", ["stages[2]", "needs exactly one of reward_model"], {"stages.2": PPO}),
    case(
        "ppo-top-p",
        ["stages[2].rollout.top_p", "top_p = 0.9 is not supported by PPO", "Remove rollout.top_p (or set 1.0)"],
        {"stages.2": {**PPO, "reward_fn": FN, "rollout": {"top_p": 0.9}}},
    ),
    case(
        "reward-fn-not-importable",
        ["stages[2] (ppo).reward_fn: cannot import module 'no_such_module'", "PYTHONPATH"],
        {"stages.2": {**PPO, "reward_fn": "no_such_module:score"}},
    ),
    case(
        "reward-fn-without-colon",
        ["reward_fn: 'alignlab.builtin.tasks.arith_reward' must look like package.module:function"],
        {"stages.2": {**PPO, "reward_fn": "alignlab.builtin.tasks.arith_reward"}},
    ),
    case(
        "reward-fn-no-such-function",
        ["reward_fn: module 'alignlab.builtin.tasks' has no function 'nope'"],
        {"stages.2": {**PPO, "reward_fn": "alignlab.builtin.tasks:nope"}},
    ),
    # ---- GRPO rewards and collapse stop
    case(
        "grpo-reward-list-component-not-importable",
        ["stages[2] (grpo).reward_fn[1].fn: cannot import module 'no_such_module'", "PYTHONPATH"],
        {"stages.2": {**GRPO, "reward_fn": [{"fn": FN}, {"fn": "no_such_module:score", "weight": 0.2}]}},
    ),
    case("grpo-without-reward", ["stages[2]", "a grpo stage needs a reward: reward_fn"], {"stages.2": GRPO}),
    case(
        "grpo-stop-if-without-checkpoints",
        [
            "stages[2]",
            "stop_if ends the stage with its last good checkpoint, and no checkpoints are written: set save_steps",
        ],
        {"stages.2": {**GRPO, "reward_fn": FN, "stop_if": {"repetition": 0.3}}},
    ),
    # ---- data files, columns and rows
    case(
        "missing-data-file",
        ["stages[0] (sft).dataset: dataset file not found: TMP/nope.jsonl", "Fix dataset.path"],
        {"stages.0.dataset.path": "TMP/nope.jsonl"},
    ),
    case(
        "unknown-builtin-task",
        ["stages[0] (sft).dataset: dataset 'builtin:arithh': unknown builtin task 'arithh'", "known tasks: arith"],
        {"stages.0.dataset": {"path": "builtin:arithh", "split": "sft"}},
    ),
    case(
        "builtin-task-unknown-split",
        ["unknown split 'train' for task 'arith'; known splits: sft, preference", "Fix dataset.path / dataset.split"],
        {"stages.1.dataset": {"path": "builtin:arith", "size": 8}},
    ),
    case(
        "unsupported-file-type",
        ["data.txt: unsupported type '.txt'", ".jsonl"],
        {"stages.0.dataset.path": "TMP/data.txt"},
        {"data.txt": "x"},
    ),
    case(
        "empty-dataset",
        ["stages[0] (sft).dataset: TMP/empty.jsonl: the file is empty", "file with rows"],
        {"stages.0.dataset.path": "TMP/empty.jsonl"},
        {"empty.jsonl": ""},
    ),
    case(
        "csv-header-only",
        ["h.csv: the file has a header (prompt,completion) but no rows"],
        {"stages.0.dataset.path": "TMP/h.csv"},
        {"h.csv": "prompt,completion\n"},
    ),
    case(
        "invalid-jsonl-line",
        ["TMP/sft.jsonl: line 3 is not valid JSON", "Each line of a .jsonl file is one JSON object"],
        files={"sft.jsonl": jsonl(SFT_ROWS[:2]) + "{'prompt': 'single quotes'}\n"},
    ),
    case(
        "missing-columns",
        [
            "stages[1] (dpo).dataset: TMP/pairs.jsonl: a dpo stage needs columns chosen+rejected",
            "the data has prompt, completion",
            "dataset.columns",
        ],
        files={"pairs.jsonl": jsonl(SFT_ROWS)},
    ),
    case(
        "misnamed-mapped-column",
        [
            "TMP/pairs.jsonl: column(s) question named in dataset.columns are not in the data",
            "its columns are: prompt, chosen, rejected",
        ],
        {"stages.1.dataset.columns": {"prompt": "question"}},
    ),
    case(
        "unknown-column-role",
        ["stages[1].dataset.columns", "unknown column role 'promt'", "Did you mean 'prompt'?"],
        {"stages.1.dataset.columns": {"promt": "q"}},
    ),
    case(
        "empty-cell",
        ["TMP/pairs.jsonl: row 2: column 'chosen' is missing or empty", "Fill it or drop the row"],
        files={"pairs.jsonl": jsonl(PAIR_ROWS[:2] + [{**PAIR_ROWS[2], "chosen": ""}])},
    ),
    case(
        "chosen-equals-rejected",
        ["TMP/pairs.jsonl: row 1: 'chosen' and 'rejected' are identical", "Remove the row or fix the data"],
        files={"pairs.jsonl": jsonl([PAIR_ROWS[0], {**PAIR_ROWS[1], "rejected": PAIR_ROWS[1]["chosen"]}])},
    ),
    case(
        "malformed-chat-message",
        ["TMP/sft.jsonl: row 0: column 'messages' message 1 is malformed", "'role'", "'content'"],
        files={"sft.jsonl": jsonl([{"messages": [MESSAGES[0], {"role": "assistant", "text": "2"}]}])},
    ),
    case(
        "format-wrong-for-stage",
        ["format 'preference' cannot feed a sft stage"],
        {"stages.0.dataset.format": "preference"},
    ),
    case(
        "flip-rate-on-sft-data",
        ["TMP/sft.jsonl: flip_rate applies to preference data"],
        {"stages.0.dataset.flip_rate": 0.2},
    ),
    case(
        "prompt-longer-than-max-length",
        [
            "stages[0] (sft).dataset: TMP/sft.jsonl: 1 prompt(s) have at least train.max_length = 32 tokens",
            "row 1:",
            "Raise train.max_length above",
        ],
        {"stages.0.train.max_length": 32},
        {"sft.jsonl": jsonl([SFT_ROWS[0], {"prompt": "Please add " + "one and " * 40 + "two.", "completion": "3"}])},
    ),
    case(
        "chat-template-missing",
        [
            "TMP/sft.jsonl: column 'messages' holds chat messages, but the tokenizer",
            "has no chat template",
            "model.chat_template",
        ],
        {"model.name_or_path": "TMP/plain"},
        {"sft.jsonl": jsonl([{"messages": MESSAGES}])},
        setup=tokenizer_without_template,
    ),
]


@pytest.fixture
def no_model_loads(monkeypatch, tiny_model_path):
    """Loading any model's weights is a failure: these errors must come first."""
    from transformers import PreTrainedModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"a model was loaded ({args[:1]}) before the bad input was reported")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    return tiny_model_path


def _set(raw: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last) : int(last) + 1] = [value]  # replace, or append one past the end
    elif value is DELETE:
        del node[last]
    else:
        node[last] = value


@pytest.mark.parametrize("edits, files, text, overrides, setup, expect", CASES)
def test_bad_input_fails_before_loading_with_a_clear_message(
    tmp_path, monkeypatch, capsys, no_model_loads, edits, files, text, overrides, setup, expect
):
    data = {"sft.jsonl": jsonl(SFT_ROWS), "pairs.jsonl": jsonl(PAIR_ROWS), "prompts.jsonl": jsonl(SFT_ROWS), **files}
    for name, content in data.items():
        (tmp_path / name).write_text(content)
    (tmp_path / "empty_model").mkdir()
    if setup:
        setup(monkeypatch, tmp_path, no_model_loads)
    raw = recipe()
    for key, value in edits.items():
        _set(raw, key, value)
    path = tmp_path / "recipe.yaml"
    path.write_text((text or yaml.safe_dump(raw, sort_keys=False)).replace("TMP/", f"{tmp_path}/"))

    assert main(["run", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    for fragment in expect:
        assert fragment.replace("TMP/", f"{tmp_path}/") in err, f"{fragment!r} not in:\n{err}"
    assert not (tmp_path / "run").exists()  # nothing written: no run dir, no recipe.yaml, no stage_output.json
    assert not list(tmp_path.rglob("stage_output.json"))


def test_missing_recipe_file(capsys, tmp_path):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert f"recipe file not found: {tmp_path}/nope.yaml" in capsys.readouterr().err


def test_validate_reports_every_problem_at_once(tmp_path, capsys, no_model_loads):
    """Data problems in two stages come back in one message, so one fix round is enough."""
    raw = recipe()
    raw["stages"][0]["dataset"]["path"] = str(tmp_path / "a.jsonl")
    raw["stages"][1]["dataset"]["path"] = str(tmp_path / "b.jsonl")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw).replace("TMP/", f"{tmp_path}/"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stages[0] (sft).dataset: dataset file not found" in err and "stages[1] (dpo).dataset: dataset file" in err
