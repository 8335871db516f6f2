"""docs/recipe-reference.md is generated from the schema (scripts/gen_docs.py, `recipe-reference`; test_docs.py
checks that the page is current). Here: what the generator writes holds every key of every section, following
each section's links, so a key the schema gains can never be missing from the reference."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from alignlab.recipe import Recipe
from alignlab.stages.registry import stage_types

ROOT = Path(__file__).resolve().parents[1]


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sections(gen, text: str) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """{anchor: (the keys of its table in order, {key: anchor of the section it links to}, the raw text)}."""
    sections = {}
    for block in re.split(r"^(?=#{2,3} )", text, flags=re.M):
        if not block.startswith("#"):
            continue
        heading = block.splitlines()[0].lstrip("#").strip()
        keys = re.findall(r"^\| `(\w+)` \|", block, re.M)
        links = dict(re.findall(r"^\| `(\w+)` \|[^|]*\]\(#([\w-]+)\)", block, re.M))
        assert gen._anchor(heading) not in sections, f"two headings '{heading}'"
        sections[gen._anchor(heading)] = (keys, links, block)
    return sections


def test_the_reference_holds_every_key_of_every_section():
    gen = _gen_docs()
    sections = _sections(gen, gen.recipe_reference())
    stage_base = gen._section_class(Recipe.model_fields["stages"].annotation)
    seen = set()

    def check(anchor: str, cls, own: list[str]) -> None:
        keys, links, block = sections[anchor]
        assert keys == own, f"section {anchor}: {keys} != {own}"
        seen.add(anchor)
        for key, target in links.items():
            model = gen._section_class(cls.model_fields[key].annotation)
            assert model is not None, f"{anchor}: {key} links to a section but holds none"
            if target not in seen:
                check(target, model, _keys(model, skip={"type"} if model is stage_base else set()))

    check("top-level-keys", Recipe, _keys(Recipe))
    for name, record in stage_types().items():
        base = stage_base.model_fields  # a key every stage has is listed once, unless this type redefines it
        own = [k for k, f in record.spec.model_fields.items() if k != "type" and repr(f) != repr(base.get(k))]
        check(gen._anchor(f"Stage type `{name}`"), record.spec, own)
    assert seen == set(sections) - {"sections-used-in-several-places"}, set(sections) - seen


def _keys(cls, skip=frozenset()) -> list[str]:
    return [k for k, f in cls.model_fields.items() if k not in skip and not f.exclude]


def test_a_stage_types_own_defaults_are_shown():
    """The sft stage's `train:` defaults its learning rate to 2e-4, the class's default is 2e-5: the reference shows
    the stage's."""
    gen = _gen_docs()
    sections = _sections(gen, gen.recipe_reference())
    sft = sections["stage-type-sft"][1]["train"]
    row = re.search(r"^\| `learning_rate` \|.*$", sections[sft][2], re.M).group(0)
    assert "`0.0002`" in row, row
