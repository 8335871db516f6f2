"""Shared fixtures. Everything runs offline on the built-in tiny model, built once into the alignlab cache
($ALIGNLAB_CACHE, else ~/.cache/alignlab; deterministic, so every test sees the same weights). One thread policy
for the whole session (alignlab/threads.py), and one finished SFT-LoRA run that tests starting from an SFT adapter
copy (tests/helpers.py). Recipe builders and shared reward functions: tests/helpers.py.

Tiers: `pytest` runs the default tier (neither `slow` nor `real`), `pytest -m slow` the end-to-end training tests
on the tiny model, `pytest -m real` the real-model tier; CI runs all three (README, .ci/run)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import yaml  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The tiers are disjoint: a test is `slow` or `real` or neither, never both (CI runs each tier once)."""
    both = [item.nodeid for item in items if item.get_closest_marker("slow") and item.get_closest_marker("real")]
    if both:
        raise pytest.UsageError(f"tests marked both slow and real (pick one tier): {', '.join(both)}")


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


@pytest.fixture(scope="session", autouse=True)
def thread_policy():
    """One thread policy for every test: alignlab's (alignlab/threads.py: ALIGNLAB_THREADS=N, else fewer threads
    only on a busy machine, and OMP_NUM_THREADS set by you is left alone), applied once at the start of the session.
    `alignlab run` applies it itself at its start; a test that calls run_pipeline directly would otherwise run on
    torch's default count whatever the load. Under pytest-xdist (`-n N`) the N workers count as N processes of one
    run: each gets its share of the free cores (one each on 2 cores, 2 workers). Returns the count the session runs
    on."""
    import torch

    from alignlab.threads import apply_thread_policy

    apply_thread_policy(processes=int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    return torch.get_num_threads()


@pytest.fixture(autouse=True)
def _thread_count_kept(thread_policy):
    """A test that changes torch's thread count (`--threads 1`, a one-thread fixture) changes it for itself only."""
    yield
    import torch

    if torch.get_num_threads() != thread_policy:
        torch.set_num_threads(thread_policy)


@pytest.fixture(scope="session")
def sft_lora_run(tmp_path_factory):
    """A finished run folder holding the shared SFT-LoRA stage (tests/helpers.py SFT_LORA), trained once per session.
    A test that starts from it copies it (helpers.copy_run) into its own output_dir and runs a recipe that begins
    with the same stage (helpers.sft_lora_recipe): the stage is reused as finished, and only what follows trains."""
    from tests.helpers import run, sft_lora_recipe

    out = tmp_path_factory.mktemp("sft-lora") / "run"
    run(sft_lora_recipe(out, name="sft-lora"))
    return out
