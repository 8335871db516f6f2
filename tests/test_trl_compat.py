"""A TRL upgrade that removes a private name alignlab relies on fails here, with the name and why it matters,
instead of silently (an override TRL no longer calls) in the middle of a run; and TRL's private names are used in
alignlab/stages/trl_compat.py only, so that file is the whole list of what an upgrade can break quietly."""

from __future__ import annotations

import ast
import importlib.util
import textwrap
from pathlib import Path

from alignlab.stages.trl_compat import PRIVATE_ATTRIBUTES, missing_private_names

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alignlab"
COMPAT = PACKAGE / "stages" / "trl_compat.py"


def test_trl_private_names_exist():
    missing = missing_private_names()
    assert not missing, "the installed TRL/transformers lack private names alignlab uses: " + "; ".join(missing)


def test_private_instance_attributes_exist_on_a_built_trainer(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from alignlab.builtin import builtin_model_path
    from alignlab.models import load_tokenizer
    from alignlab.recipe import parse_recipe

    path = str(builtin_model_path("tiny-llama"))
    recipe = parse_recipe(
        {
            "name": "x",
            "model": {"name_or_path": path},
            "stages": [{"type": "eval", "dataset": {"path": "builtin:arith"}}],
        }
    )
    from transformers import AutoModelForCausalLM

    pairs = Dataset.from_list([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 2)
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", max_steps=1, use_cpu=True)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        args=args,
        train_dataset=pairs,
        processing_class=load_tokenizer(recipe, path),
    )
    missing = [f"{name} ({why})" for name, why in PRIVATE_ATTRIBUTES.items() if not hasattr(trainer, name)]
    assert not missing, "TRL's DPOTrainer lacks attributes alignlab uses: " + "; ".join(missing)


def test_without_reference_builds_no_reference(tmp_path, monkeypatch):
    """TRL 1.16's DPOTrainer has no reference-free mode: with ref_model=None it loads a second model (full
    fine-tuning) or copies the adapter as frozen adapter "ref" (a PeftModel). `ref_model=NO_REFERENCE` on a trainer
    with the WithoutReference mixin builds neither, prepares nothing, and leaves trainer.ref_model None."""
    import trl.trainer.dpo_trainer as dpo_module
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from alignlab.builtin import builtin_model_path
    from alignlab.stages.trl_compat import NO_REFERENCE, WithoutReference

    class Trainer(WithoutReference, DPOTrainer):
        pass

    loads = []
    real_create = dpo_module.create_model_from_path
    monkeypatch.setattr(dpo_module, "create_model_from_path", lambda *a, **k: loads.append(a) or real_create(*a, **k))
    path = str(builtin_model_path("tiny-llama"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    pairs = Dataset.from_list([{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 2)
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", max_steps=1, use_cpu=True)

    def build(peft: bool, ref_model):
        model = AutoModelForCausalLM.from_pretrained(path)
        if peft:
            model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
        trainer = Trainer(model=model, ref_model=ref_model, args=args, train_dataset=pairs, processing_class=tokenizer)
        return trainer, getattr(model, "peft_config", {})

    trainer, _ = build(peft=False, ref_model=NO_REFERENCE)
    assert trainer.ref_model is None and loads == []
    trainer, adapters = build(peft=True, ref_model=NO_REFERENCE)
    assert trainer.ref_model is None and set(adapters) == {"default"}
    # What TRL does without the sentinel (why the mixin exists): a second model, a frozen adapter copy.
    trainer, _ = build(peft=False, ref_model=None)
    assert trainer.ref_model is not None and len(loads) == 1
    trainer, adapters = build(peft=True, ref_model=None)
    assert set(adapters) == {"default", "ref"}


# ------------------------------------------------------------------- TRL's private names only in trl_compat.py


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _trl_private_names() -> set[str]:
    """The private names (`_x`, not dunders) of TRL's and transformers' Trainer objects: the methods they define and
    the `self._x` attributes they set, read from the installed sources (nothing is imported)."""
    trl = Path(importlib.util.find_spec("trl").origin).parent
    transformers = Path(importlib.util.find_spec("transformers").origin).parent
    files = [*trl.rglob("*.py"), *transformers.glob("trainer*.py"), transformers / "training_args.py"]
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _private(node.name):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr):
                if isinstance(node.value, ast.Name) and node.value.id == "self":
                    names.add(node.attr)
    return names


def _trl_private_uses(sources: dict[str, str], trl_names: set[str]) -> list[str]:
    """`file:line: what` for each use of a TRL private name in `sources` ({file: Python source}):
    - in a class on TRL's side (one whose bases include a class imported from trl or transformers, or such an alignlab
      class, or a mixin listed beside one): a method overriding a TRL private, or `self._x` reaching one;
    - anywhere: `obj._x` on another object (e.g. `self.trainer._metrics`, `super()._save_checkpoint`), a
      getattr / setattr / hasattr of "_x", an import of a private name from trl or transformers.
    Names alignlab defines for itself outside TRL's side (e.g. its RL loop's `_stop`) are not taken for TRL's there."""
    trees = {f: ast.parse(src) for f, src in sources.items()}
    bases, imported = {}, set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("trl", "transformers"):
                imported |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.ClassDef):
                bases[node.name] = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
    trl_side = {c for c, bs in bases.items() if set(bs) & imported}
    while True:
        more = {c for c, bs in bases.items() if set(bs) & trl_side} | {
            b for bs in bases.values() if set(bs) & (trl_side | imported) for b in bs if b in bases
        }
        if more <= trl_side:
            break
        trl_side |= more
    own = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name not in trl_side:
                own |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)}
                own |= {n.name for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        own |= {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    foreign = trl_names - own
    found = []
    for file, tree in trees.items():
        for cls in [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name in trl_side]:
            for node in ast.walk(cls):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in trl_names:
                    found.append(f"{file}:{node.lineno}: {cls.name} overrides {node.name}")
                elif isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "self":
                    if node.attr in trl_names:
                        found.append(f"{file}:{node.lineno}: {cls.name} reaches self.{node.attr}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in foreign and getattr(node.value, "id", None) != "self":
                found.append(f"{file}:{node.lineno}: .{node.attr} of another object")
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "setattr", "hasattr"):
                if len(node.args) > 1 and getattr(node.args[1], "value", None) in foreign:
                    found.append(f"{file}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("trl", "transformers"):
                found += [f"{file}:{node.lineno}: imports {a.name}" for a in node.names if _private(a.name)]
    return sorted(set(found))


def test_the_private_name_scan_finds_each_kind_of_use():
    """The scan below on a made-up module: each way of reaching TRL's private state is found, alignlab's own private
    names are not."""
    source = textwrap.dedent(
        """
        from trl import SFTTrainer
        from trl.trainer.utils import _private_helper

        class Mixin:
            def _save_checkpoint(self, model, trial):
                return super()._save_checkpoint(model, trial)

        class Trainer(Mixin, SFTTrainer):
            def step(self):
                self._metrics["train"]["x"].append(1.0)

        class Loss:
            def __call__(self):
                self.trainer._metrics["train"]["x"].append(1.0)
                return getattr(self.trainer, "_metrics")

        class Loop:
            def _stop(self):
                return self._stop
        """
    )
    found = _trl_private_uses({"m.py": source}, {"_save_checkpoint", "_metrics", "_stop", "_private_helper"})
    assert found == [
        "m.py:11: Trainer reaches self._metrics",
        "m.py:15: ._metrics of another object",
        "m.py:16: getattr(..., '_metrics')",
        "m.py:3: imports _private_helper",
        "m.py:6: Mixin overrides _save_checkpoint",
        "m.py:7: ._save_checkpoint of another object",
    ]


def test_trl_private_names_only_in_trl_compat():
    """Outside alignlab/stages/trl_compat.py the package uses no private name of a TRL or transformers object: a
    trainer stage logs a metric with trl_compat.log_metric (not `trainer._metrics`), overrides a private method
    through a trl_compat hook (CheckpointHook, ReferenceLogpsHook), and so on. A new private name goes into
    trl_compat.py, with why alignlab needs it (PRIVATE_NAMES, PRIVATE_ATTRIBUTES)."""
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in sorted(PACKAGE.rglob("*.py")) if p != COMPAT}
    found = _trl_private_uses(sources, _trl_private_names())
    assert not found, "TRL private names outside alignlab/stages/trl_compat.py:\n" + "\n".join(found)
