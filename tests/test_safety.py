"""Safety: no code runs that the recipe did not ask for, and nothing alignlab writes or reads is a pickle.

- trust_remote_code is off unless the recipe turns it on, and then it is announced (validate and model loading);
- models, adapters and merged weights are written as safetensors (a saved stage holds no pickled weights);
- every torch.load in the package passes weights_only=True, and YAML is read with safe loaders only;
- a reward function (`module:function`) is imported only when a recipe names it, and only by validation or
  the stage that calls it, never by parsing the recipe.
"""

import ast
import logging
import sys
from pathlib import Path

import pytest
import yaml

from alignlab.cli import main
from alignlab.recipe import load_recipe, parse_recipe
from alignlab.validate import validate_recipe
from tests.helpers import TINY, lora, make_recipe, run

PACKAGE = Path(__file__).resolve().parents[1] / "alignlab"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def _recipe(tmp_path, **model):
    sft = {"name": "sft", "type": "sft", "dataset": {"path": "builtin:arith", "split": "sft", "size": 16}}
    return make_recipe([sft], tmp_path / "run", name="safe", seed=None, model={"name_or_path": TINY, **model})


# ------------------------------------------------------------------------------------------ trust_remote_code


def test_trust_remote_code_is_off_unless_the_recipe_says_so(tiny_model_path, monkeypatch, tmp_path):
    import transformers

    from alignlab import models

    seen = []

    def spy(name_or_path, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise RuntimeError("stop")  # only the arguments matter here

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    recipe = parse_recipe(_recipe(tmp_path))
    assert recipe.model.trust_remote_code is False
    for load in (models.load_causal_lm, models.load_tokenizer):
        with pytest.raises(RuntimeError, match="stop"):
            load(recipe, tiny_model_path)
    assert seen == [False, False]


def test_trust_remote_code_on_is_announced(tiny_model_path, tmp_path, caplog, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, trust_remote_code=True)))
    _, notes = validate_recipe(path)
    assert any(n.startswith("warning: model.trust_remote_code is on") and "builtin:tiny-llama" in n for n in notes)
    assert main(["validate", str(path)]) == 0
    assert "warning: model.trust_remote_code is on: Python code shipped with" in capsys.readouterr().out

    from alignlab.models import load_causal_lm

    with caplog.at_level(logging.WARNING, logger="alignlab.models"):
        load_causal_lm(load_recipe(path), tiny_model_path)
    assert f"trust_remote_code is on: code shipped with {tiny_model_path} will run on this machine" in caplog.text


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            yield node, owner, node.func.attr


def unsafe_calls(source: str) -> list[str]:
    """Calls that can run code from a file: torch.load without weights_only=True, pickle loads, unsafe YAML
    loaders, YAML composing without SafeLoader, and trust_remote_code=True hard-coded."""
    found = []
    for node, owner, attr in _calls(ast.parse(source)):
        kw = {k.arg: k.value for k in node.keywords}
        is_true = lambda v: isinstance(v, ast.Constant) and v.value is True  # noqa: E731
        if owner == "torch" and attr == "load" and not is_true(kw.get("weights_only")):
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if owner in ("pickle", "dill", "cloudpickle") and attr in ("load", "loads"):
            found.append(f"line {node.lineno}: {owner}.{attr}")
        if owner == "yaml" and attr in (
            "load",
            "load_all",
            "full_load",
            "full_load_all",
            "unsafe_load",
            "unsafe_load_all",
        ):
            found.append(f"line {node.lineno}: yaml.{attr} (use yaml.safe_load)")
        if owner == "yaml" and attr in ("compose", "compose_all", "parse"):
            loader = kw.get("Loader")
            if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                found.append(f"line {node.lineno}: yaml.{attr} without Loader=yaml.SafeLoader")
        if is_true(kw.get("trust_remote_code")):
            found.append(f"line {node.lineno}: trust_remote_code=True hard-coded")
    return found


def test_the_checker_catches_unsafe_calls():
    bad = (
        "torch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\nyaml.load(t, Loader=yaml.Loader)\n"
        "yaml.unsafe_load(t)\nyaml.compose(t)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n"
    )
    assert len(unsafe_calls(bad)) == 7
    good = "torch.load(p, weights_only=True)\nyaml.safe_load(t)\nyaml.compose(t, Loader=yaml.SafeLoader)\n"
    assert unsafe_calls(good) == []


def test_package_loads_nothing_unsafely():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    problems = [f"{p.relative_to(PACKAGE.parent)}: {msg}" for p in files for msg in unsafe_calls(p.read_text())]
    assert problems == []


# ----------------------------------------------------------------------------------------- weights on disk


@pytest.mark.slow
def test_a_saved_stage_holds_safetensors_weights_only(tmp_path, tiny_model_path):
    raw = _recipe(tmp_path)
    raw["peft"] = lora(r=4, alpha=8, dropout=None)
    raw["stages"][0].update(merge=True, train={"max_steps": 2, "save_steps": 1, "per_device_batch_size": 4})
    run(raw)
    stage = tmp_path / "run" / "sft"
    files = [p.relative_to(stage) for p in stage.rglob("*") if p.is_file()]
    assert (stage / "model" / "adapter_model.safetensors").is_file()
    assert (stage / "merged" / "model.safetensors").is_file()
    assert any(p.name == "adapter_model.safetensors" and p.parts[0] == "checkpoints" for p in files)
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    # The model, adapter and merged folders hold no pickle at all. Checkpoints hold the Trainer's own optimizer,
    # scheduler, RNG and argument state (pickles transformers writes and reads for --resume), never weights.
    trainer_state = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}
    assert all(p.parts[0] == "checkpoints" and p.name in trainer_state for p in pickled), pickled


# ------------------------------------------------------------------------------------------ reward functions

REWARD_MODULE = "alignlab_test_reward_mod"


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / f"{REWARD_MODULE}.py").write_text(
        "def score(prompts, completions):\n    return [0.0] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, REWARD_MODULE, raising=False)
    yield
    sys.modules.pop(REWARD_MODULE, None)


def test_reward_function_is_imported_only_when_named(tmp_path, reward_module, tiny_model_path):
    raw = _recipe(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    validate_recipe(path)
    assert REWARD_MODULE not in sys.modules

    ppo = {"name": "ppo", "type": "ppo", "dataset": {"path": "builtin:arith", "split": "sft", "size": 16}}
    raw["stages"].append({**ppo, "reward_fn": f"{REWARD_MODULE}:score"})
    path.write_text(yaml.safe_dump(raw))
    assert load_recipe(path).stages[1].reward_fn == f"{REWARD_MODULE}:score"
    assert REWARD_MODULE not in sys.modules  # parsing a recipe never imports what it names
    validate_recipe(path)
    assert REWARD_MODULE in sys.modules  # validation checks the function exists: the import the recipe asked for
