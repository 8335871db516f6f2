"""Recipe schema: typed keys, errors that name the key, its line and the closest valid key; overrides;
every shipped recipe parses and validates."""

from pathlib import Path

import pytest

from alignlab.recipe import RecipeError, apply_override, load_recipe
from alignlab.stages.specs import DPOSpec, SFTSpec
from alignlab.validate import validate_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)

MINIMAL = """\
name: t
model:
  name_or_path: builtin:tiny-llama
stages:
  - name: sft
    type: sft
    dataset:
      path: builtin:arith
      split: sft
"""


def _error(tmp_path, text, overrides=None) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, overrides)
    return str(exc.value)


def test_minimal_recipe_parses_with_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL)
    recipe = load_recipe(path)
    assert recipe.seed == 42 and recipe.peft.method == "none"
    assert isinstance(recipe.stages[0], SFTSpec)
    assert recipe.stages[0].input == "previous" and recipe.stages[0].train.learning_rate == 2e-4
    assert recipe.run_dir == Path("runs/t")


def test_misspelt_key_names_key_line_and_suggestion(tmp_path):
    msg = _error(tmp_path, MINIMAL.replace("    dataset:", "    traim:\n      epochs: 1\n    dataset:"))
    assert "unknown key 'stages[0].traim'" in msg
    assert "r.yaml:7" in msg  # the line of the misspelt key
    assert "Did you mean 'train'?" in msg


def test_misspelt_nested_key_suggests_closest(tmp_path):
    msg = _error(tmp_path, MINIMAL + "    train:\n      learning_rat: 0.1\n")
    assert "unknown key 'stages[0].train.learning_rat'" in msg and "Did you mean 'learning_rate'?" in msg
    assert "r.yaml:11" in msg


def test_unknown_top_level_key(tmp_path):
    msg = _error(tmp_path, MINIMAL + "sead: 3\n")
    assert "unknown key 'sead'" in msg and "Did you mean 'seed'?" in msg


def test_wrong_type_names_key_and_value(tmp_path):
    msg = _error(tmp_path, MINIMAL.replace("name: t", "name: t\nseed: many"))
    assert "seed" in msg and "'many'" in msg


def test_missing_required_key(tmp_path):
    msg = _error(tmp_path, MINIMAL.replace("model:\n  name_or_path: builtin:tiny-llama\n", ""))
    assert "missing required key 'model'" in msg


def test_unknown_stage_type_lists_known(tmp_path):
    msg = _error(tmp_path, MINIMAL.replace("type: sft", "type: sftt"))
    assert "unknown stage type 'sftt'" in msg and "Did you mean 'sft'?" in msg and "dpo" in msg


def test_malformed_yaml(tmp_path):
    msg = _error(tmp_path, "name: [unclosed\n")
    assert "malformed YAML" in msg and "r.yaml" in msg


def test_bad_loss_parameter_and_unknown_loss(tmp_path):
    base = MINIMAL.replace("type: sft", "type: dpo").replace("split: sft", "split: preference")
    msg = _error(tmp_path, base + "    loss:\n      name: rdpo\n      eps: 0.7\n")
    assert "eps must be in [0, 0.5)" in msg
    msg = _error(tmp_path, base + "    loss:\n      name: dpoo\n")
    assert "unknown preference loss 'dpoo'" in msg and "kldpo" in msg
    msg = _error(tmp_path, base + "    loss:\n      name: dpo\n      tau: 1\n")
    assert "unknown parameter 'tau'" in msg


def test_loss_params_are_sibling_keys(tmp_path):
    base = MINIMAL.replace("type: sft", "type: dpo").replace("split: sft", "split: preference")
    path = tmp_path / "r.yaml"
    path.write_text(base + "    loss:\n      name: kldpo\n      beta: 0.2\n      tau: 0.5\n")
    spec = load_recipe(path).stages[0]
    assert isinstance(spec, DPOSpec) and spec.loss.beta == 0.2 and spec.loss.params == {"tau": 0.5}


def test_overrides_by_stage_name_and_index(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL)
    recipe = load_recipe(path, ["stages.sft.train.max_steps=7", "stages.0.train.learning_rate=0.5", "seed=3"])
    assert recipe.stages[0].train.max_steps == 7 and recipe.stages[0].train.learning_rate == 0.5
    assert recipe.seed == 3
    msg = _error(tmp_path, MINIMAL, ["stages.nope.train.max_steps=1"])
    assert "no stage named 'nope'" in msg and "sft" in msg
    msg = _error(tmp_path, MINIMAL, ["stages.sft.train.max_stepz=1"])
    assert "Did you mean 'max_steps'?" in msg


def test_override_syntax_error():
    with pytest.raises(RecipeError, match="key.sub=value"):
        apply_override({}, "stages.sft.train.max_steps")


def test_stage_chain_must_point_backwards(tmp_path):
    text = MINIMAL + "  - name: dpo\n    type: dpo\n    input: later\n    dataset:\n      path: builtin:arith\n"
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="'later', which is not a stage of this recipe"):
        validate_recipe(path)
    path.write_text(
        MINIMAL.replace("    dataset:", "    input: dpo\n    dataset:")
        + text[len(MINIMAL) :].replace("    input: later\n", "")
    )
    with pytest.raises(RecipeError, match="comes later in the recipe"):
        validate_recipe(path)


def test_duplicate_stage_names(tmp_path):
    msg = _error(tmp_path, MINIMAL + MINIMAL[MINIMAL.index("  - name") :])
    assert "unique" in msg and "sft" in msg


def test_unknown_trl_extra_argument(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL + "    train:\n      extra:\n        warmup_stepz: 3\n")
    with pytest.raises(RecipeError, match="warmup_stepz: not a field of TRL's SFTConfig. Did you mean 'warmup_steps'"):
        validate_recipe(path)


def test_shipped_recipes_are_found():
    names = {p.name for p in RECIPES}
    assert "quickstart.yaml" in names and len(RECIPES) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(path, tiny_model_path):
    recipe, notes = validate_recipe(path)  # tiny_model_path: the builtin is built, so model checks run too
    assert recipe.stages
    # Offline, hub models and datasets are reported as not checked, never as errors; so is a fetched builtin
    # (builtin:smollm2-135m-instruct) before its first fetch, as in a fresh checkout; a dataset an earlier stage
    # writes (stage:NAME) is checked when it exists.
    ok = ("not checked offline", "is not built yet (alignlab builtin", "is written by stage")
    assert all(any(s in n for s in ok) for n in notes), notes


NOISY = ROOT / "recipes" / "robust_dpo_noisy.yaml"  # its dpo stage: loss {name: kldpo, beta: 0.1, tau: 1.0}


def test_switching_the_loss_by_override_drops_the_old_loss_parameters(tmp_path):
    """`stages.dpo.loss.name=rdpo stages.dpo.loss.eps=0.3` on this recipe used to stop at "rdpo: unknown
    parameter 'tau'" (tau came from the file). The file's tau is dropped with a warning; eps from the command line
    stays; beta, which every loss takes, stays."""
    recipe, notes = validate_recipe(NOISY, ["stages.dpo.loss.name=rdpo", "stages.dpo.loss.eps=0.3"])
    loss = recipe.stage("dpo").loss
    assert (loss.name, loss.beta, loss.params) == ("rdpo", 0.1, {"eps": 0.3})
    assert notes[0] == (
        "warning: stages[1] (dpo).loss: dropped tau: 1.0 from the recipe file, which rdpo does not take "
        "(stages.dpo.loss.name=rdpo on the command line)"
    )
    # A parameter the new loss does not take, given on the command line too, is still an error, named as such.
    msg = _error(tmp_path, NOISY.read_text(), ["stages.dpo.loss.name=rdpo", "stages.dpo.loss.tau=0.3"])
    assert "(with command-line override stages.dpo.loss.name=rdpo, stages.dpo.loss.tau=0.3)" in msg
    assert "rdpo: unknown parameter 'tau'" in msg


def test_override_null_and_remove(tmp_path):
    """`loss.tau=null` gives the loss's default (it failed with "tau must be > 0, got tau=None"); `~key` removes a
    key, so it takes its default; a negative index counts from the end."""
    recipe = load_recipe(NOISY, ["stages.dpo.loss.tau=null", "~stages.dpo.train.max_length", "stages.-1.loss.beta=0.2"])
    dpo = recipe.stage("dpo")
    assert dpo.loss.params == {} and dpo.train.max_length == 1024  # TrainSpec's default
    assert dpo.loss.beta == 0.2  # stages.-1: the last stage
    assert recipe.stage("sft").train.max_length == 64
    with pytest.raises(RecipeError, match="no key 'stages.dpo.train.nope' to remove"):
        load_recipe(NOISY, ["~stages.dpo.train.nope"])
    with pytest.raises(RecipeError, match="takes no value; write ~seed"):
        load_recipe(NOISY, ["~seed=1"])


def test_unknown_key_from_the_command_line_names_the_override(tmp_path):
    """An unknown key given on the command line used to be reported at a line of the file (the nearest parent)."""
    msg = _error(tmp_path, MINIMAL, ["stages.sft.dataset.splitt=sft"])
    assert msg == (
        "invalid recipe:\n  - command-line override 'stages.sft.dataset.splitt=sft': unknown key "
        "'stages[0].dataset.splitt'. Did you mean 'split'?"
    )
    # A key of the file keeps its line, even when an override set a key inside it.
    msg = _error(tmp_path, MINIMAL.replace("split: sft", "split: sft\n      sizee: 3"), ["stages.sft.dataset.size=4"])
    assert "r.yaml:10: unknown key 'stages[0].dataset.sizee'" in msg


def test_recipe_settings_see_what_trains_and_not_the_seed_or_the_folder(tmp_path):
    """alignlab.fingerprint.recipe_settings: the seed, the output folder, the recipe's name and logging keys leave it
    as it is; a training key, a loss parameter and the peft section change it; a run folder's resolved recipe.yaml
    (every default written out) has the settings of the recipe it was made from, for every shipped recipe. The
    SmolLM2 results table relies on it to tell a row measured with an older recipe (tests/test_docs.py)."""
    import yaml

    from alignlab.fingerprint import recipe_settings
    from alignlab.freshness import _recipe_yaml

    path = ROOT / "recipes" / "smollm2_grpo_lora.yaml"
    base = recipe_settings(load_recipe(path))
    same = [
        "seed=7",
        "output_dir=elsewhere",
        "name=other",
        "stages.grpo.train.logging_steps=5",
        "stages.eval.num_samples_shown=2",
    ]
    assert recipe_settings(load_recipe(path, same)) == base
    for override in (
        "stages.grpo.train.max_steps=12",
        "stages.grpo.beta=0.0",
        "peft.r=8",
        "stages.eval.rollout.max_new_tokens=32",
    ):
        assert recipe_settings(load_recipe(path, [override])) != base, override
    for shipped in RECIPES:
        resolved = tmp_path / shipped.name
        resolved.write_text(yaml.safe_dump(yaml.safe_load(_recipe_yaml(load_recipe(shipped)))))
        assert recipe_settings(load_recipe(resolved)) == recipe_settings(load_recipe(shipped)), shipped.name


def _moved_keys() -> list[tuple[str, str, str]]:
    from alignlab.stages.types import STAGE_TYPES

    return [(t, old, new) for t, record in STAGE_TYPES.items() for old, new in record.spec.MOVED.items()]


@pytest.mark.parametrize("stage_type, old, new", _moved_keys(), ids=lambda x: str(x))
def test_a_moved_key_is_an_error_naming_its_new_path(tmp_path, stage_type, old, new):
    """Each setting has one home (train: or rollout:); a recipe still using an old key, at the stage's top or in an
    old section (ppo.learning_rate), is refused with the new path, in the file and on the command line."""
    import yaml

    def recipe(**keys) -> str:
        stage = {"name": "s", "type": stage_type, **keys}
        return yaml.safe_dump({"name": "t", "model": {"name_or_path": "builtin:tiny-llama"}, "stages": [stage]})

    head, _, rest = old.partition(".")
    assert f"{old} -> {new}" in _error(tmp_path, recipe(**{head: {rest: 1} if rest else 1}))
    assert f"{old} -> {new}" in _error(tmp_path, recipe(), [f"stages.s.{old}=1"])
