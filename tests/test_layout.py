"""The package's shape: every module imports, reading and validating a recipe needs no torch, and imports run
downward through the layers (command line -> pipeline -> stages -> ... -> recipe schema), with no cycles."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import alignlab

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alignlab"


def _modules() -> list[str]:
    return sorted(
        m.name for m in pkgutil.walk_packages(alignlab.__path__, "alignlab.") if m.name != "alignlab.__main__"
    )


def test_every_module_imports():
    for name in _modules():
        importlib.import_module(name)


def test_reading_and_validating_a_recipe_imports_no_torch():
    code = (
        "import sys\n"
        "from alignlab.recipe import load_recipe\n"
        "from alignlab.validate import validate_recipe\n"
        "load_recipe('recipes/sft_reward_ppo.yaml')\n"
        "validate_recipe('recipes/sft_dpo_lora.yaml', ['model.name_or_path=org/some-hub-model'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _imports(module: str) -> set[str]:
    """alignlab modules `module` imports (function-level imports are deferred, but count too; imports for type
    annotations only, under `if TYPE_CHECKING:`, do not)."""
    path = PACKAGE.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []  # drop annotation-only imports from the walk
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alignlab"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("alignlab")}
    return {m for m in found if m != module}


def test_no_import_cycles_between_modules():
    modules = set(_modules())
    graph = {m: {i for i in _imports(m) if i in modules and not m.startswith(i + ".")} for m in modules}
    # Packages re-export their own submodules; an __init__ importing its children is not a cycle.
    for m in modules:
        graph[m] = {i for i in graph[m] if not i.startswith(m + ".")}
    seen, stack = set(), []

    def visit(node):
        if node in stack:
            cycle = stack[stack.index(node) :] + [node]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if node in seen:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()
        seen.add(node)

    for m in sorted(modules):
        visit(m)


def test_lower_layers_never_import_higher_ones():
    layers = [  # lowest first; a module may import its own layer and those below
        ["alignlab.losses", "alignlab.schema", "alignlab.cache"],
        [
            "alignlab.stages.registry",
            "alignlab.stages.specs",
            "alignlab.recipe",
            "alignlab.data",
            "alignlab.builtin",
            "alignlab.gguf",
        ],
        ["alignlab.contract"],
    ]
    top = ["alignlab.pipeline", "alignlab.cli", "alignlab.validate", "alignlab.benchmarks"]

    def layer(m):
        for i, names in enumerate(layers):
            if any(m == n or m.startswith(n + ".") for n in names):
                return i
        return len(layers)

    for m in _modules():
        for i in _imports(m):
            assert layer(i) <= layer(m), f"{m} (layer {layer(m)}) imports {i} (layer {layer(i)})"
            if m not in top and not any(m.startswith(t + ".") for t in top):
                assert i not in top, f"{m} imports {i}, which sits above it"
