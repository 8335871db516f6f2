"""The package's shape: every module imports, reading and validating a recipe needs no torch, every module of the
package sits in one layer of LAYERS, and imports run downward through the layers (command line -> pipeline ->
stages -> ... -> recipe schema), with no cycles."""

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


# The package's layers, lowest first: a module imports modules of its own layer and of the layers below, never above
# (deferred imports inside functions count too; imports under `if TYPE_CHECKING:` do not). An entry names one module
# (a package's __init__ by the package's name), or with `.*` a package and every module under it; an exact entry
# wins over a package's, a longer package over a shorter. A new module goes into the layer of what it does: a module
# in no layer fails test_every_module_is_in_a_layer.
LAYERS: list[tuple[str, list[str]]] = [
    (
        "foundations: no torch-bound alignlab code below them",
        [
            "alignlab",
            "alignlab.losses.*",
            "alignlab.schema",
            "alignlab.cache",
            "alignlab.console",
            "alignlab.threads",
            "alignlab.runlock",
            "alignlab.checkpoints",
        ],
    ),
    (
        "the recipe: stage-type records, loading, data, built-ins, recipe checks that need no model (torch-free)",
        [
            "alignlab.stages.record",
            "alignlab.stages.specs",
            "alignlab.stages.types",
            "alignlab.stages.registry",
            "alignlab.recipe",
            "alignlab.data.*",
            "alignlab.builtin.*",
            "alignlab.gguf",
            "alignlab.input_checks",
            "alignlab.accelerate_checks",
        ],
    ),
    (
        "the stage contract: what a stage gets and leaves behind, and whether it is still current",
        ["alignlab.contract", "alignlab.fingerprint", "alignlab.freshness"],
    ),
    (
        "models and what runs on them: loading and saving, sharding, log-probs, sampling, rewards, parameter groups",
        [
            "alignlab.models",
            "alignlab.parallel",
            "alignlab.logprobs",
            "alignlab.generation",
            "alignlab.rewards",
            "alignlab.optim",
        ],
    ),
    (
        "measuring: the evaluator, its statistics and reports, the `evaluate` modules, training-curve plots",
        [
            "alignlab.evaluation",
            "alignlab.evaluation.stats",
            "alignlab.evaluation.repetition",
            "alignlab.evaluation.evaluator",
            "alignlab.evaluation.report",
            "alignlab.metrics.*",
            "alignlab.plots",
        ],
    ),
    (
        "training engines: alignlab's own RL loops, the glue and the private names of TRL's trainers",
        ["alignlab.rl.*", "alignlab.stages.trl_glue", "alignlab.stages.trl_compat"],
    ),
    (
        "stage runners: one module per stage type, and what the own-loop stages share",
        [
            "alignlab.stages",
            "alignlab.stages.sft",
            "alignlab.stages.dpo",
            "alignlab.stages.kto",
            "alignlab.stages.reward",
            "alignlab.stages.ppo",
            "alignlab.stages.grpo",
            "alignlab.stages.distill",
            "alignlab.stages.generate",
            "alignlab.stages.eval",
            "alignlab.stages.rl_glue",
        ],
    ),
    (
        "commands beside the pipeline: eval, audit, plan, preflight, the end-of-run report",
        ["alignlab.evaluation.command", "alignlab.audit.*", "alignlab.plan", "alignlab.preflight", "alignlab.report"],
    ),
    ("exporting a finished run: the folder, its model card, its GGUF file, the upload", ["alignlab.export.*"]),
    ("the run and its check: the pipeline, the validator", ["alignlab.pipeline", "alignlab.validate"]),
    ("benchmarks (they run pipelines)", ["alignlab.benchmarks.*"]),
    ("the command line", ["alignlab.cli", "alignlab.__main__"]),
]


def _package_files() -> list[Path]:
    """The package's Python files as git tracks them (a file someone is still writing is not yet the package's);
    every .py file under alignlab/ where there is no git."""
    try:
        out = subprocess.run(["git", "ls-files", "alignlab"], cwd=ROOT, capture_output=True, text=True, check=True)
        files = [ROOT / f for f in out.stdout.splitlines() if f.endswith(".py")]
    except (OSError, subprocess.CalledProcessError):
        files = []
    return sorted(f for f in files or PACKAGE.rglob("*.py") if f.exists())


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _all_modules() -> dict[str, Path]:
    """Every module of the package (its __main__ and the `evaluate` scripts in alignlab/metrics/ included) -> file."""
    return {_module_name(p): p for p in _package_files()}


def _imports(module: str, modules: dict[str, Path]) -> set[str]:
    """alignlab modules `module` imports (function-level imports are deferred, but count too; imports for type
    annotations only, under `if TYPE_CHECKING:`, do not). `from alignlab.x import y` is the module alignlab.x.y when
    there is one, else alignlab.x."""
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []  # drop annotation-only imports from the walk
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "alignlab" or base.startswith("alignlab."):
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in modules else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name == "alignlab" or a.name.startswith("alignlab.")}
    return {m for m in found if m != module}


def test_no_import_cycles_between_modules():
    modules = _all_modules()
    graph = {m: {i for i in _imports(m, modules) if i in modules and not m.startswith(i + ".")} for m in modules}
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


def _entry_matches(entry: str, module: str) -> bool:
    package = entry.removesuffix(".*")
    return module == entry or (entry.endswith(".*") and (module == package or module.startswith(package + ".")))


def _layer(module: str) -> int | None:
    """The index in LAYERS of `module`: its own entry's, else that of the longest `package.*` entry above it."""
    best, where = -1, None
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if entry == module:
                return i
            if _entry_matches(entry, module) and len(entry) > best:
                best, where = len(entry), i
    return where


def test_every_module_is_in_a_layer():
    """Every module of the package has a layer, and every entry of LAYERS names something that exists."""
    modules = _all_modules()
    missing = sorted(m for m in modules if _layer(m) is None)
    assert not missing, f"modules in no layer of tests/test_layout.py's LAYERS (add each where it belongs): {missing}"
    entries = [e for _, names in LAYERS for e in names]
    on_disk = {_module_name(p) for p in PACKAGE.rglob("*.py")}  # a module not yet added to git is not stale
    stale = [e for e in entries if not any(_entry_matches(e, m) for m in {*modules, *on_disk})]
    assert not stale, f"LAYERS names modules the package does not have: {stale}"
    assert len(entries) == len(set(entries)), "a module is in two layers"


def _short(layer: int) -> str:
    return LAYERS[layer][0].split(":")[0]


def test_lower_layers_never_import_higher_ones():
    modules = _all_modules()
    upward = []
    for m in sorted(modules):
        for i in sorted(_imports(m, modules)):
            low, high = _layer(m), _layer(i) if i in modules else None
            if low is not None and high is not None and high > low:
                upward.append(f"{m} ({_short(low)}) imports {i} ({_short(high)})")
    assert not upward, "imports that run upward through the layers:\n" + "\n".join(upward)


def test_the_layer_check_reads_every_form_of_import(tmp_path):
    """The import reader above on a made-up package: absolute, `from alignlab import x`, relative and deferred
    imports are all read; an import for type annotations only is not."""
    pkg = tmp_path / "alignlab"
    (pkg / "sub").mkdir(parents=True)
    for name in ("__init__.py", "a.py", "b.py", "c.py", "d.py", "sub/__init__.py", "sub/e.py"):
        (pkg / name).write_text("")
    (pkg / "sub" / "f.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import alignlab.a\n"
        "from alignlab import b\n"
        "from .e import thing\n"
        "from .. import c as renamed\n"
        "if TYPE_CHECKING:\n"
        "    from alignlab.d import Only\n"
        "def later():\n"
        "    from alignlab.sub import e\n"
    )
    modules = {_module_name(p, tmp_path): p for p in sorted(pkg.rglob("*.py"))}
    assert _imports("alignlab.sub.f", modules) == {"alignlab.a", "alignlab.b", "alignlab.c", "alignlab.sub.e"}
