"""The README's first commands are what CI runs: a newcomer's setup and test run must be the one that is tested."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_quickstart_and_test_commands():
    quickstart, tests = _readme_commands()[:2]
    assert quickstart.endswith("alignlab run recipes/quickstart.yaml")
    assert "-c constraints.txt" in quickstart and "-c constraints.txt" in tests
    assert tests.endswith("python -m pytest -q && python -m pytest -q -m real")


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    ci = (ROOT / ".ci" / "run").read_text()
    tests = _readme_commands()[1]
    assert "python3 -m venv .venv" in ci and "rm -rf .venv" in ci
    for step in tests.split(" && ")[2:]:  # after creating and activating the venv: installs, then both tiers
        assert step.replace("pip install", "python -m pip install -q") in ci or step in ci, step


def test_constraints_pin_every_tested_dependency():
    pins = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "evaluate"):
        assert name in pins, name
    for name in ("pytest", "ruff"):
        assert name in pins, name
