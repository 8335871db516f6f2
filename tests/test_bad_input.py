"""Bad-input catalogue: each broken recipe, override or dataset below makes `alignlab run` stop with exit code 2
and a message that names where the problem is (file and line, key, stage, row, column) and how to fix it. The
checks run before any model loads (loading one fails these tests) and leave no run directory behind.

Each case edits a small valid recipe (SFT -> DPO on tiny local files, built-in tiny model): `edits` maps a
dotted path (list items by index) to its new value, `files` writes data files, `text` replaces the whole YAML.
"""

import importlib.util
import json
import re
import shutil
import sys
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
GENERATE = {
    "name": "best",
    "type": "generate",
    "dataset": {"path": "TMP/prompts.jsonl"},
    "reward_fn": FN,
    "output": "sft",
}


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
    """A model folder with config and tokenizer but no chat template; its weights a link to the tiny model's (which
    must not be loaded)."""
    src = Path(tiny)
    (tmp_path / "plain").mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(src / name, tmp_path / "plain" / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "plain" / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "plain" / "model.safetensors").symlink_to(src / "model.safetensors")


def model_folder(drop=(), config=None):
    """A setup that copies the tiny model into TMP/model without the files in `drop` (its weights a link, never
    loaded), with config.json replaced by `config` when given."""

    def setup(monkeypatch, tmp_path, tiny):
        (tmp_path / "model").mkdir()
        for f in Path(tiny).iterdir():
            if f.name not in drop:
                (tmp_path / "model" / f.name).symlink_to(f)
        if config is not None:
            (tmp_path / "model" / "config.json").unlink()
            (tmp_path / "model" / "config.json").write_text(config)

    return setup


REWARDS = """\
import math


def wrong_length(prompts, completions):
    return [1.0]


def nothing(prompts, completions):
    return None


def nan(prompts, completions):
    return [0.0] + [math.nan] * (len(completions) - 1)


def raises(prompts, completions):
    return [len(p) / len(c) for p, c in zip(prompts, completions)]  # a length ratio: fails on an empty completion


def one_argument(completions):
    return [0.0 for c in completions]


def revise_to_numbers(prompts, completions):
    return [len(c) for c in completions]
"""


def reward_module(monkeypatch, tmp_path, tiny):
    """Reward functions that fail in the ways users' do, importable as bad_rewards (and a module with a syntax
    error as bad_syntax)."""
    (tmp_path / "bad_rewards.py").write_text(REWARDS)
    (tmp_path / "bad_syntax.py").write_text("def score(prompts, completions):\n    return [0.0 for c in completions\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("bad_rewards", "bad_syntax"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def unwritable(monkeypatch, tmp_path, tiny):
    """Tests run as root, who may write anywhere: make os.access say no, as it does for a user's read-only folder."""
    import alignlab.input_checks

    monkeypatch.setattr(alignlab.input_checks.os, "access", lambda path, mode: False)


def with_duplicate(key_line: str, again: str) -> str:
    """The recipe's YAML with `again` written right after the first line equal to `key_line`."""
    text = yaml.safe_dump(recipe(), sort_keys=False)
    assert key_line + "\n" in text
    return text.replace(key_line + "\n", key_line + "\n" + again + "\n", 1)


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
            "stop_if ends the stage with its last good checkpoint, and no checkpoints are written: set train.save_steps",
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
        ["TMP/pairs.jsonl: line 3: column 'chosen' is missing or empty", "Fill it or drop the row"],
        files={"pairs.jsonl": jsonl(PAIR_ROWS[:2] + [{**PAIR_ROWS[2], "chosen": ""}])},
    ),
    case(
        "chosen-equals-rejected",
        ["TMP/pairs.jsonl: line 2: 'chosen' and 'rejected' are identical", "Remove the row or fix the data"],
        files={"pairs.jsonl": jsonl([PAIR_ROWS[0], {**PAIR_ROWS[1], "rejected": PAIR_ROWS[1]["chosen"]}])},
    ),
    case(
        "malformed-chat-message",
        ["TMP/sft.jsonl: line 1: column 'messages' message 1 is malformed", "'role'", "'content'"],
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
            "(line 2; line 2: ",
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
    # ======== inputs that used to end in a traceback or be silently accepted (found by trying them as a user would)
    # ---- the recipe file
    case(
        "key-written-twice",
        ["recipe.yaml:3: key 'seed' is written twice in one mapping (lines 2 and 3)", "keep only the last value"],
        text=with_duplicate("seed: 0", "seed: 1"),
    ),
    case(
        "nested-key-written-twice",
        ["key 'stages[0].train.max_length' is written twice in one mapping", "delete the one you do not mean"],
        text=with_duplicate("    max_length: 64", "    max_length: 8"),
    ),
    case("empty-recipe-file", ["recipe.yaml: the file is empty; a recipe is a YAML mapping"], text=""),
    case(
        "recipe-not-utf8",
        ["recipe.yaml:2: not UTF-8 text (byte 0xe9)", "Save it as UTF-8"],
        text="name: caf\xe9\nseed: 0\n".encode("latin-1").replace(b"name: caf", b"seed: 1\nname: caf"),
    ),
    case(
        "stage-name-with-slash",
        ["stages[0].name", "stage name 'a/b' cannot name the stage's folder in the run directory"],
        {"stages.0.name": "a/b", "stages.1.input": "a/b"},
    ),
    case("stage-name-dotdot", ["stage name '..' cannot name the stage's folder"], {"stages.1.name": ".."}),
    case(
        "max-steps-zero",
        ["stages[0].train.max_steps", "max_steps must be a positive number of optimizer steps, or -1"],
        {"stages.0.train.max_steps": 0},
    ),
    case("negative-seed", ["recipe.yaml:2: seed: Input should be greater than or equal to 0"], {"seed": -1}),
    case("seed-beyond-numpy", ["less than or equal to 4294967295"], {"stages.1.dataset.seed": 2**32}),
    # ---- command-line overrides
    case(
        "override-stage-index-out-of-range",
        [
            "override 'stages.5.train.max_steps=2': there is no stage 5; the recipe has 2 stage(s): 0 (sft), 1 (dpo)",
            "Address a stage by its index or its name",
        ],
        overrides=["stages.5.train.max_steps=2"],
    ),
    case(
        "override-unknown-key-named-as-override",
        [
            "command-line override 'stages.sft.train.max_stepz=1': unknown key 'stages[0].train.max_stepz'",
            "Did you mean 'max_steps'?",
            "!recipe.yaml:",
        ],
        overrides=["stages.sft.train.max_stepz=1"],
    ),
    case(
        "override-value-not-yaml",
        ["override 'seed=[1': the value is not valid YAML", "Quote it to pass a string"],
        overrides=["seed=[1"],
    ),
    case("override-empty-key", ["override '=3': empty key name"], overrides=["=3"]),
    case(
        "override-removes-missing-key",
        ["override '~stages.dpo.loss.tau': there is no key 'stages.dpo.loss' to remove"],
        overrides=["~stages.dpo.loss.tau"],
    ),
    case(
        "override-list-by-name",
        ["'peft.target_modules' is a list: address its items by index (0 to 0)"],
        {"peft": {"method": "lora", "target_modules": ["q_proj"]}},
        overrides=["peft.target_modules.first=v_proj"],
    ),
    case(
        "override-switches-loss-with-wrong-parameter",
        [
            "(with command-line override stages.dpo.loss.name=rdpo, stages.dpo.loss.tau=0.3)",
            "rdpo: unknown parameter 'tau'; rdpo accepts: eps",
        ],
        {"stages.1.loss": {"name": "kldpo", "tau": 1.0}},
        overrides=["stages.dpo.loss.name=rdpo", "stages.dpo.loss.tau=0.3"],
    ),
    case(
        "run-unknown-stage",
        ["--stage nope: no stage named 'nope'; stages are: sft, dpo"],
        overrides=["--stage", "nope"],
    ),
    # ---- the output folder
    case(
        "output-dir-is-a-file",
        ["output_dir: TMP/afile is a file, not a folder"],
        {"output_dir": "TMP/afile"},
        {"afile": "x"},
    ),
    case(
        "output-dir-under-a-file",
        ["output_dir: cannot make TMP/afile/run, because TMP/afile is a file"],
        {"output_dir": "TMP/afile/run"},
        {"afile": "x"},
    ),
    case("output-dir-not-writable", ["output_dir: TMP is not writable"], setup=unwritable),
    # ---- the model
    case(
        "model-folder-without-weights",
        ["model folder TMP/model has a config.json but no weights (*.safetensors", "Copy the weight files in"],
        {"model.name_or_path": "TMP/model"},
        setup=model_folder(drop=("model.safetensors",)),
    ),
    case(
        "model-folder-without-tokenizer",
        ["model folder TMP/model has no tokenizer files (tokenizer.json", "model.tokenizer"],
        {"model.name_or_path": "TMP/model"},
        setup=model_folder(drop=("tokenizer.json", "tokenizer_config.json")),
    ),
    case(
        "model-config-not-json",
        ["TMP/model/config.json is not valid JSON (line 2, column 1", "Restore the model's config.json"],
        {"model.name_or_path": "TMP/model"},
        setup=model_folder(config='{"model_type": "llama",\n'),
    ),
    case(
        "model-path-neither-folder-nor-hub-id",
        ["'models/tiny/llama' is no local folder", "and no valid hub id (owner/name)"],
        {"model.name_or_path": "models/tiny/llama"},
    ),
    case(
        "hub-model-offline",
        [
            "model.name_or_path: 'alignlab-test/no-such-model' is no local folder",
            "not in the hub cache",
            "offline mode is on",
            "hf download alignlab-test/no-such-model",
        ],
        {"model.name_or_path": "alignlab-test/no-such-model"},
    ),
    case(
        "chat-template-not-jinja",
        ["model.chat_template: TMP/bad.jinja:2: Jinja syntax error: unexpected '}'"],
        {"model.chat_template": "TMP/bad.jinja"},
        {"bad.jinja": "{% for m in messages %}\n{{ m.content }\n{% endfor %}"},
    ),
    # ---- data files: encodings, CSV, cells, chat messages
    case(
        "latin1-csv",
        ["TMP/d.csv: line 3 is not UTF-8 (byte 0xe9)", "likely Latin-1", "iconv -f latin1 -t utf-8"],
        {"stages.0.dataset.path": "TMP/d.csv"},
        {"d.csv": "prompt,completion\nWhat is 1 + 1?,2\nCaf\xe9?,yes\n".encode("latin-1")},
    ),
    case(
        "utf16-json",
        ["TMP/d.json: the file is UTF-16 text", "Save it as UTF-8"],
        {"stages.0.dataset.path": "TMP/d.json"},
        {"d.json": json.dumps(SFT_ROWS).encode("utf-16")},
    ),
    case(
        "csv-line-with-extra-field",
        ["TMP/d.csv: line 3 has 3 fields but the header has 2 (prompt,completion)", "double quotes"],
        {"stages.0.dataset.path": "TMP/d.csv"},
        {"d.csv": "prompt,completion\nWhat is 1 + 1?,2\nWhat is 1, 2 + 2?,4\n"},
    ),
    case(
        "csv-short-row-named-by-line",
        ["TMP/d.csv: line 4: column 'completion' is missing or empty"],
        {"stages.0.dataset.path": "TMP/d.csv"},
        {"d.csv": 'prompt,completion\n"What is\n1 + 1?",2\nWhat is 2 + 2?\n'},
    ),
    case(
        "numeric-prompt",
        ["TMP/sft.jsonl: line 2: column 'prompt' holds 7 (a int), not text", '("7")'],
        files={"sft.jsonl": jsonl([SFT_ROWS[0], {"prompt": 7, "completion": "7"}])},
    ),
    case(
        "chat-unknown-role",
        ["TMP/sft.jsonl: line 1: column 'messages' message 1 has role 'assitant'", "Did you mean 'assistant'?"],
        files={"sft.jsonl": jsonl([{"messages": [MESSAGES[0], {"role": "assitant", "content": "2"}]}])},
    ),
    case(
        "chat-content-not-text",
        ["line 1: column 'messages' message 1 (assistant) has content 2 of type int; content is text"],
        files={"sft.jsonl": jsonl([{"messages": [MESSAGES[0], {"role": "assistant", "content": 2}]}])},
    ),
    case(
        "folder-mixing-file-types",
        ["dataset folder TMP/data mixes file types (.csv, .jsonl)", "Keep one type per folder"],
        {"stages.0.dataset.path": "TMP/data"},
        {"data/a.jsonl": jsonl(SFT_ROWS), "data/b.csv": "prompt,completion\nq,a\n"},
    ),
    # ---- found by fuzzing (tests/test_fuzz.py)
    case(
        "stage-type-a-mapping",
        ["stages[0].type: unknown stage type '{'name': 'sft'}'", "known types: "],
        {"stages.0.type": {"name": "sft"}},
    ),
    case(
        "distill-with-an-empty-model-path",
        ["model.name_or_path: model path . has no config.json", "!Traceback"],
        {
            "model.name_or_path": "",
            "stages.2": {
                "name": "distill",
                "type": "distill",
                "teacher": "builtin:tiny-llama",
                "dataset": {"path": "TMP/sft.jsonl"},
            },
        },
    ),
    case(
        "output-dir-with-nul",
        [
            "recipe.yaml: invalid recipe",
            "  - output_dir: '",
            "holds a NUL character (a \\0 or \\x00 escape): remove it",
        ],
        {"output_dir": "TMP/a\x00b"},
    ),
    case(
        "name-with-lone-surrogate",
        ["stages[1].name: '\\ud83d' holds a lone surrogate", "cannot be written as UTF-8"],
        {"stages.1.name": "\ud83d"},
    ),
    case(
        "data-path-name-too-long",
        ["stages[0].dataset.path: the name 'xxxxxxxx", "is 306 bytes long, and file systems allow 255 bytes"],
        {"stages.0.dataset.path": "TMP/" + "x" * 300 + ".jsonl"},
    ),
    case(
        "data-lone-surrogate",
        ["TMP/sft.jsonl: line 2 holds a lone surrogate", "cut between the two halves of an emoji"],
        files={"sft.jsonl": jsonl(SFT_ROWS[:1]) + '{"prompt": "\\ud83d", "completion": "x"}\n'},
    ),
    case(
        "chat-in-a-text-column",
        [
            "TMP/sft.jsonl: line 1: column 'text' holds [{'role': 'user', 'content': 'What is...,",
            "not text: a `text` column is plain text",
            "columns: {messages: text}",
        ],
        files={"sft.jsonl": jsonl([{"text": MESSAGES}])},
    ),
    case(
        "jsonl-column-of-two-kinds",
        [
            "TMP/sft.jsonl: line 3: column 'messages' holds a list, but line 1 holds text there",
            "a column holds one kind of value in every row",
        ],
        files={"sft.jsonl": jsonl([{"messages": "What is 1 + 1?"}]) + "\n" + jsonl([{"messages": MESSAGES}])},
    ),
    case(
        "latin1-byte-inside-jsonl-string",
        [
            "stages[0] (sft).dataset: TMP/sft.jsonl: line 2 is not UTF-8 (byte 0xe9)",
            "likely Latin-1",
            "iconv -f latin1",
        ],
        files={
            "sft.jsonl": (jsonl(SFT_ROWS[:1]) + '{"prompt": "Caf\u00e9?", "completion": "oui"}\n').encode("latin-1")
        },
    ),
    case(
        "chat-without-assistant-turn",
        [
            "TMP/sft.jsonl: line 1: column 'messages' holds no assistant turn (only user)",
            "nothing to train on",
            "Add the assistant's reply to the conversation, or drop the row",
        ],
        files={"sft.jsonl": jsonl([{"messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(3)])},
    ),
    case(
        "chat-with-only-a-system-turn",
        ["TMP/sft.jsonl: line 2: column 'messages' holds no assistant turn (only system)"],
        files={
            "sft.jsonl": jsonl([{"messages": MESSAGES}, {"messages": [{"role": "system", "content": "Be brief."}]}])
        },
    ),
    case(
        "chat-messages-as-text",
        ["TMP/sft.jsonl: line 1: column 'messages' holds 'What is 1 + 1?', not a list of chat messages", "`text`"],
        files={"sft.jsonl": jsonl([{"messages": "What is 1 + 1?"}])},
    ),
    case(
        "hub-dataset-offline",
        ["stages[0] (sft).dataset.path: 'alignlab-test/no-such-data' is no local file or folder", "OfflineMode"],
        {"stages.0.dataset.path": "alignlab-test/no-such-data"},
    ),
    # ---- reward functions: tried on the stage's first prompts at validation
    case(
        "reward-fn-wrong-length",
        ["stages[2] (ppo).reward_fn: tried on the first prompts", "bad_rewards:wrong_length returned 1 scores for 4"],
        {"stages.2": {**PPO, "reward_fn": "bad_rewards:wrong_length"}},
        setup=reward_module,
    ),
    case(
        "reward-fn-returns-none",
        ["bad_rewards:nothing returned None (NoneType); it must return a list of floats, one per completion"],
        {"stages.2": {**PPO, "reward_fn": "bad_rewards:nothing"}},
        setup=reward_module,
    ),
    case(
        "reward-fn-returns-nan",
        ["bad_rewards:nan returned nan for completion 1 ('42' after prompt 'What is 0 + 0?')", "finite numbers"],
        {"stages.2": {**PPO, "reward_fn": "bad_rewards:nan"}},
        setup=reward_module,
    ),
    case(
        "reward-fn-raises",
        ["bad_rewards:raises raised ZeroDivisionError: division by zero (at TMP/bad_rewards.py:17)", "any completion"],
        {"stages.2": {**PPO, "reward_fn": "bad_rewards:raises"}},
        setup=reward_module,
    ),
    case(
        "reward-fn-wrong-signature",
        ["bad_rewards:one_argument cannot be called as fn(prompts: list[str], completions: list[str])"],
        {"stages.2": {**PPO, "reward_fn": "bad_rewards:one_argument"}},
        setup=reward_module,
    ),
    case(
        "revise-fn-raises",
        [
            "stages[2] (best).revise_fn: tried on the first prompts of the dataset",
            "revise_fn bad_rewards:raises raised ZeroDivisionError: division by zero (at TMP/bad_rewards.py:17)",
            "A revise function must revise any completion",
        ],
        {"stages.2": {**GENERATE, "revise_fn": "bad_rewards:raises"}},
        setup=reward_module,
    ),
    case(
        "revise-fn-returns-numbers",
        [
            "stages[2] (best).revise_fn: tried on the first prompts",
            "revise_fn bad_rewards:revise_to_numbers returned 0 (int) for completion 0 ('')",
            "return a string (the revised completion) or None (keep it) per completion",
        ],
        {"stages.2": {**GENERATE, "revise_fn": "bad_rewards:revise_to_numbers"}},
        setup=reward_module,
    ),
    case(
        "reward-fn-syntax-error",
        ["reward_fn: module 'bad_syntax' has a syntax error at TMP/bad_syntax.py:2: '[' was never closed"],
        {"stages.2": {**PPO, "reward_fn": "bad_syntax:score"}},
        setup=reward_module,
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
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (tmp_path / "empty_model").mkdir()
    if setup:
        setup(monkeypatch, tmp_path, no_model_loads)
    raw = recipe()
    for key, value in edits.items():
        _set(raw, key, value)
    path = tmp_path / "recipe.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(
            (yaml.safe_dump(raw, sort_keys=False) if text is None else text).replace("TMP/", f"{tmp_path}/")
        )

    assert main(["run", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    for fragment in expect:  # "!text": text must not be in the message
        fragment = fragment.replace("TMP/", f"{tmp_path}/").replace("TMP", str(tmp_path))
        if fragment.startswith("!"):
            assert fragment[1:] not in err, f"{fragment[1:]!r} in:\n{err}"
        else:
            assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert "Traceback" not in err
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


def test_recipe_path_is_a_folder(capsys, tmp_path):
    assert main(["validate", str(tmp_path)]) == 2
    assert f"{tmp_path} is a folder, not a recipe file: give the path of its .yaml file" in capsys.readouterr().err


def test_unknown_builtin_model_command(capsys):
    """`alignlab builtin foo` used to end in a ValueError traceback."""
    assert main(["builtin", "foo"]) == 2
    assert "error: unknown builtin model 'foo'; known: tiny-llama" in capsys.readouterr().err


def test_eval_with_a_missing_recipe(capsys, tmp_path):
    """`alignlab eval CKPT --recipe nope.yaml` used to end in a FileNotFoundError traceback."""
    assert main(["eval", "builtin:tiny-llama", "--recipe", str(tmp_path / "nope.yaml")]) == 2
    assert f"recipe file not found: {tmp_path}/nope.yaml" in capsys.readouterr().err


def test_hub_model_offline_is_one_message_from_the_real_command(tmp_path):
    """The real command in its own process (as a user runs it): a hub id that cannot be had offline used to end in
    a 19-frame traceback from transformers after the run directory was written. Now: exit 2, one message, nothing
    written."""
    import os
    import subprocess

    raw = recipe()
    raw["model"]["name_or_path"] = "alignlab-test/no-such-model"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw).replace("TMP/", f"{tmp_path}/"))
    for name, rows in (("sft.jsonl", SFT_ROWS), ("pairs.jsonl", PAIR_ROWS)):
        (tmp_path / name).write_text(jsonl(rows))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "alignlab", "run", str(path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "model.name_or_path: 'alignlab-test/no-such-model' is no local folder" in done.stderr
    assert "offline mode is on" in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "returned, expect",
    [
        ([1.0, None], "returned None for completion 1 ('7' after prompt 'What is 3 + 4?'); scores must be finite"),
        ([1.0, float("inf")], "returned inf for completion 1"),
        (["1.0", "high"], "returned 'high' for completion 1"),
        ("0.5", "returned '0.5' (str); it must return a list of floats, one per completion"),
        ([1.0], "returned 1 scores for 2 completions; it must return one per completion"),
    ],
)
def test_reward_fn_results_are_checked_at_every_call(returned, expect):
    """During PPO or evaluation (after validation tried the function once), a bad result is a StageFailed naming the
    function and the completion, which the CLI prints as an error (exit 1), not a traceback from float()."""
    from alignlab.contract import StageFailed
    from alignlab.rewards import reward_fn_scores

    def score(prompts, completions):
        return returned

    with pytest.raises(StageFailed, match="^" + re.escape("reward_fn mod:score " + expect)):
        reward_fn_scores(score, ["What is 1 + 1?", "What is 3 + 4?"], ["2", "7"], name="reward_fn mod:score")
    assert reward_fn_scores(lambda p, c: ["1.5", 2], ["a", "b"], ["x", "y"]) == [1.5, 2.0]  # numbers as text are fine


@pytest.mark.parametrize(
    "what, expect",
    [
        ("array [2, 2]", "returned array([0., 0.]) for completion 0 ('2' after prompt 'What is 1 + 1?'); scores must"),
        ("meta tensor [2]", "returned tensor(..., device='meta', size=()) for completion 0"),
        ("0-d tensor", "returned tensor(0.5000) (Tensor); it must return a list of floats, one per completion"),
        ("unreadable", "returned <Unreadable> (Unreadable); it must return a list of floats"),
        ("raises unreadable", "raised Unreadable: (its message cannot be read) (at "),
    ],
)
def test_reward_fn_results_that_are_no_list_of_numbers(what, expect):
    """Found by fuzzing: a reward function returning an array or a tensor of the wrong shape or device, or an object
    that cannot even be printed (or raising one), used to end in a RuntimeError traceback from torch or from the
    object itself; now the error names the function and what it returned."""
    import numpy as np
    import torch

    from alignlab.rewards import RewardFnError, reward_fn_scores
    from tests.helpers import Unreadable

    def score(prompts, completions):
        if what == "raises unreadable":
            raise Unreadable()
        return {
            "array [2, 2]": lambda: np.zeros((2, 2)),
            "meta tensor [2]": lambda: torch.zeros(2, device="meta"),
            "0-d tensor": lambda: torch.tensor(0.5),
            "unreadable": Unreadable,
        }[what]()

    with pytest.raises(RewardFnError, match="^" + re.escape("reward_fn mod:score " + expect)):
        reward_fn_scores(score, ["What is 1 + 1?", "What is 3 + 4?"], ["2", "7"], name="reward_fn mod:score")
    assert reward_fn_scores(lambda p, c: np.array([0.5, 1]), ["a", "b"], ["x", "y"]) == [0.5, 1.0]
    assert reward_fn_scores(lambda p, c: torch.tensor([0.5, 1.0]), ["a", "b"], ["x", "y"]) == [0.5, 1.0]


def test_revise_fn_results_are_checked_at_every_call():
    """A generate stage's revise_fn during the run: a wrong result, or an exception from its own code, is a
    RewardFnError (a StageFailed: exit 1, one message) naming the function and the completion, not a ValueError
    traceback. (Found by fuzzing: revise_fn was imported at validation, but never tried.)"""
    from alignlab.rewards import RewardFnError, revise_texts

    prompts, texts = ["What is 1 + 1?", "What is 3 + 4?"], ["2", "7"]
    assert revise_texts(lambda p, c: [None, "seven"], prompts, texts, "mod:fix") == ["2", "seven"]
    with pytest.raises(RewardFnError, match=re.escape("revise_fn mod:fix returned 1 values for 2 completions")):
        revise_texts(lambda p, c: ["x"], prompts, texts, "mod:fix")
    with pytest.raises(RewardFnError, match=re.escape("revise_fn mod:fix returned 7 (int) for completion 1 ('7')")):
        revise_texts(lambda p, c: [None, 7], prompts, texts, "mod:fix")
    with pytest.raises(RewardFnError, match=re.escape("revise_fn mod:fix raised KeyError: 'x' (at ")):
        revise_texts(lambda p, c: [{}["x"]], prompts, texts, "mod:fix")


def test_no_rows_left_after_tokenization_stops_before_training():
    """TRL drops a row whose completion starts beyond max_length; when it drops them all, the trainer used to fail in
    torch's sampler ("num_samples should be a positive integer value, but got num_samples=0") after the model
    loaded. `alignlab validate` finds such rows only with the tokenizer on disk; otherwise this check, made before
    the first step, says what happened and what to change."""
    from types import SimpleNamespace

    from alignlab.data import DataError
    from alignlab.stages.trl_glue import check_rows_left

    spec = SimpleNamespace(name="sft", dataset=SimpleNamespace(path="data/chats.jsonl"))
    args = SimpleNamespace(max_length=32, truncation_mode="keep_start")
    ctx = SimpleNamespace(spec=spec)
    check_rows_left(SimpleNamespace(train_dataset=[1], eval_dataset=None, args=args), ctx)  # rows left: fine
    with pytest.raises(DataError) as e:
        check_rows_left(SimpleNamespace(train_dataset=[], eval_dataset=None, args=args), ctx)
    assert str(e.value).startswith("stage 'sft' (data/chats.jsonl): no training rows are left once tokenized")
    assert "train.max_length = 32 tokens (truncation_mode keep_start)" in str(e.value)
    assert "Found after the model loaded, before training: raise train.max_length" in str(e.value)
    with pytest.raises(DataError, match="no eval rows are left"):
        check_rows_left(SimpleNamespace(train_dataset=[1], eval_dataset=[], args=args), ctx)


def test_utf8_check_reads_a_file_block_by_block(tmp_path):
    """The encoding check reads a data file in blocks: a character split between two blocks is no error, and a bad
    byte in a later block is named by its line in the whole file."""
    from alignlab.data import DataError
    from alignlab.data.formats import _check_utf8

    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "é", "completion": "日本"}\n' * 5, encoding="utf-8")
    for block in (1, 2, 3, 5, 7, 1 << 20):  # every split of the 2- and 3-byte characters
        _check_utf8(good, block)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(good.read_bytes() + '{"prompt": "Café"}\n'.encode("latin-1"))
    for block in (1, 3, 16, 1 << 20):
        with pytest.raises(DataError, match=re.escape("bad.jsonl: line 6 is not UTF-8 (byte 0xe9)")):
            _check_utf8(bad, block)
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(good.read_bytes()[:-4])  # the file ends inside the 3-byte 本
    with pytest.raises(DataError, match=re.escape("cut.jsonl: line 5 is not UTF-8 (byte 0xe6)")):
        _check_utf8(cut, 7)
