"""Shared fixtures. Everything runs offline on the built-in tiny model; the model is built once per session
into a temporary cache (deterministic, so every test sees the same weights)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import yaml  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path():
    from alignlab.builtin import builtin_model_path

    return str(builtin_model_path("tiny-llama"))


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe dict to tmp_path/recipe.yaml (output_dir defaults into tmp_path) and return its path."""

    def _write(recipe: dict, name: str = "recipe.yaml"):
        recipe = dict(recipe)
        recipe.setdefault("output_dir", str(tmp_path / "run"))
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return _write
