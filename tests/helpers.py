"""What the tests share: recipe builders, running and reading a run, the reward functions recipes name as
`tests.helpers:NAME`, and the one finished SFT-LoRA run that tests starting from an SFT adapter copy
(`SFT_LORA`, `copy_run`; the session fixture `sft_lora_run` in tests/conftest.py trains it once).

A copied run folder is a finished run like any other: its `sft/stage_output.json` records what the stage was made
from (alignlab/freshness.py), and a recipe with the same `sft` stage, model, PEFT settings and seed reuses it
("already finished; skipping") instead of training it again, so each test still runs the whole recipe it names.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from alignlab.benchmarks.robustness import PRESETS

TINY = "builtin:tiny-llama"
REPO = Path(__file__).resolve().parent.parent


def lora(r: int = 8, alpha: int = 16, dropout: float | None = 0.05, method: str = "lora", **keys) -> dict:
    """A `peft:` section (dropout None: the schema's default)."""
    peft = {"method": method, "r": r, "alpha": alpha, **({} if dropout is None else {"dropout": dropout}), **keys}
    return peft


def make_recipe(
    stages: list[dict],
    output_dir=None,
    *,
    name: str = "test",
    seed: int | None = 0,
    model: str | dict = TINY,
    peft: dict | str | None = None,
) -> dict:
    """A recipe dict on the built-in tiny model (or `model`: a name or path, or a whole `model:` section).
    `peft`: a `peft:` section, a method name ("none", "lora", "qlora": the test suite's usual r 8, alpha 16,
    dropout 0.05), or None for no section. `seed` None and `output_dir` None leave those keys out."""
    raw: dict = {"name": name}
    if seed is not None:
        raw["seed"] = seed
    if output_dir is not None:
        raw["output_dir"] = str(output_dir)
    raw["model"] = dict(model) if isinstance(model, dict) else {"name_or_path": str(model)}
    if isinstance(peft, str):
        peft = lora(method=peft)
    if peft is not None:
        raw["peft"] = dict(peft)
    raw["stages"] = list(stages)
    return raw


def make_stage(stage_type: str, name: str | None = None, **keys) -> dict:
    """A stage dict of type `stage_type` (named after it unless `name`), each key put where the schema keeps it:
    a key of the stage itself stays at the top, a key of its `train:` or `rollout:` section goes there (so
    `make_stage("grpo", max_steps=2, temperature=0.7)` is `{..., "train": {"max_steps": 2}, "rollout": {"temperature":
    0.7}}`). A `train={...}` or `rollout={...}` argument is merged with the keys that go there."""
    from alignlab.stages.types import STAGE_TYPES

    fields = STAGE_TYPES[stage_type].spec.model_fields
    raw: dict = {"name": name or stage_type, "type": stage_type}
    for key, value in keys.items():
        section = next(
            (s for s in ("train", "rollout") if s in fields and key in fields[s].annotation.model_fields), None
        )
        if key in fields or section is None:
            raw[key] = {**raw.get(key, {}), **value} if key in ("train", "rollout") else value
        else:
            raw.setdefault(section, {})[key] = value
    return raw


def write_yaml(path, raw: dict) -> str:
    """`raw` as a recipe file at `path`; returns the path as a string (what `alignlab run` takes)."""
    Path(path).write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def run(raw: dict, resume: bool = False, **kwargs):
    """Parse and run a recipe dict in this process (alignlab.pipeline.run_pipeline); returns its stage outputs."""
    from alignlab.pipeline import run_pipeline
    from alignlab.recipe import parse_recipe

    return run_pipeline(parse_recipe(raw), resume=resume, **kwargs)


@contextlib.contextmanager
def alignlab_beside(argv: list[str], log):
    """`python -m alignlab ARGV` in another process while the with-block works in this one, each on one thread: two
    independent runs on the two cores of a small machine (a 2-thread op is barely faster than a 1-thread one at the
    tiny model's sizes, and much slower when another process holds the second core). Its console goes to `log`.
    On leaving, waits for it and asserts it succeeded."""
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGNLAB_THREADS": "1", "PYTHONPATH": str(REPO)}
    threads, setting = torch.get_num_threads(), os.environ.get("ALIGNLAB_THREADS")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "alignlab", *argv], cwd=REPO, env=env, stdout=out, stderr=out)
        torch.set_num_threads(1)
        os.environ["ALIGNLAB_THREADS"] = "1"  # `alignlab run` in this process too
        try:
            yield proc
        finally:
            torch.set_num_threads(threads)
            if setting is None:
                os.environ.pop("ALIGNLAB_THREADS", None)
            else:
                os.environ["ALIGNLAB_THREADS"] = setting
            try:
                proc.wait(timeout=900)
            finally:
                if proc.poll() is None:
                    proc.kill()
    assert proc.returncode == 0, Path(log).read_text()[-3000:]


def rows(stage_dir) -> list[dict]:
    """Every row of a stage's metrics.jsonl (the final summary, marked "final", included)."""
    return [json.loads(line) for line in (Path(stage_dir) / "metrics.jsonl").read_text().splitlines()]


def steps(stage_dir) -> list[dict]:
    """The rows of a stage's metrics.jsonl without its final summary."""
    return [r for r in rows(stage_dir) if not r.get("final")]


def write_jsonl(path, records) -> str:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(path)


# ------------------------------------------------------------------------------------------ reward functions


def length_reward(prompts, completions):
    """Longer decoded text scores higher, capped at 20 characters: a reward in [0, 1] with variance even for a
    random model's completions."""
    return [min(len(c), 20) / 20 for c in completions]


def char_length_reward(prompts, completions):
    """The completion's length in characters, uncapped: spread among samples whenever their answers differ, whatever
    the built-in base model (which knows no chat format: its answers to arith prompts are rarely numbers, and how
    rarely depends on the CPU that pretrained it) says. (length_reward's cap would tie long samples.)"""
    return [float(len(c)) for c in completions]


# ------------------------------------------------------------------------------ the shared SFT-LoRA run

# LoRA SFT on builtin:arith that learns the task's format (tests/test_chain.py checks how well), and is the `sft`
# stage of the robustness bench's `small` preset too (alignlab/benchmarks/robustness.py), so a bench run reuses it.
SFT_LORA_PEFT = copy.deepcopy(PRESETS["small"]["peft"])  # r 8, alpha 16, no dropout
SFT_LORA = {"name": "sft", "type": "sft", **copy.deepcopy(PRESETS["small"]["sft"])}


def sft_lora_recipe(output_dir, *later_stages: dict, name: str = "test") -> dict:
    """The shared SFT-LoRA stage, then `later_stages`, on the tiny model with SFT_LORA_PEFT and seed 0."""
    return make_recipe([SFT_LORA, *later_stages], output_dir, name=name, peft=SFT_LORA_PEFT)


def copy_run(src, dest) -> Path:
    """Copy the finished run folder `src` to `dest` (which must not exist yet): the stages' records point at the
    copy's own model folders, so the copy is what training in `dest` would have left (less its logs)."""
    src, dest = Path(src), Path(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".alignlab.lock", "logs"))
    for record in dest.glob("*/stage_output.json"):
        record.write_text(record.read_text().replace(json.dumps(str(src))[1:-1], json.dumps(str(dest))[1:-1]))
    return dest


def assert_reused(src, run_dir, stage: str = "sft") -> None:
    """`stage` in run_dir is the copied one from src (the same training attempt), not trained again."""
    copied, own = (json.loads((Path(d) / stage / "stage_output.json").read_text()) for d in (src, run_dir))
    assert own["origin"]["attempt"] == copied["origin"]["attempt"], f"{run_dir}: stage {stage} was trained again"


class Unreadable(Exception):
    """What a user's function may return or raise that cannot be read at all: not a number, not a list, and not
    even printable (its repr and its message fail too)."""

    def __float__(self):
        raise RuntimeError("no float")

    def __len__(self):
        raise RuntimeError("no len")

    def __iter__(self):
        raise RuntimeError("no iter")

    def __repr__(self):
        raise RuntimeError("no repr")

    def __str__(self):
        raise RuntimeError("no str")
