"""The README's first commands are what CI runs: a newcomer's setup and test run must be the one that is tested.
And the docs cannot drift from the code: generated tables are current (scripts/gen_docs.py), the names they state
(splits, recipes, stage chains, losses, modules, versions) are the code's, every relative link resolves, and no file
points at what a user does not have (a document outside the repository, an issue number of the project's tracker)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_quickstart_and_test_commands():
    quickstart, tests = _readme_commands()[:2]
    assert quickstart.endswith("alignlab run recipes/quickstart.yaml")
    assert "-c constraints.txt" in quickstart and "-c constraints.txt" in tests
    tiers = "python -m pytest -q -n auto --dist loadfile -m slow && python -m pytest -q -n auto --dist loadfile && "
    assert tests.endswith(tiers + "python -m pytest -q -n auto --dist loadfile -m real")


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
    for name in ("pytest", "ruff", "pytest-xdist"):
        assert name in pins, name


# ------------------------------------------------------------------------------ docs that cannot drift from the code


def _gen_docs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_tables_match_the_code_and_the_results():
    """Every `<!-- table:NAME -->` block is what scripts/gen_docs.py writes from the code and bench/results/*.json:
    after a new measurement, or a change to a task, run `python scripts/gen_docs.py`."""
    gen = _gen_docs()
    stale = []
    for path in gen.doc_files():
        text = path.read_text()
        for name, body in ((m.group("name"), m.group("body")) for m in gen.BLOCK.finditer(text)):
            if body != gen.render_block(name).rstrip("\n") + "\n":
                stale.append(f"{path.relative_to(ROOT)}: {name}")
    assert not stale, "run `python scripts/gen_docs.py`; stale: " + ", ".join(stale)
    names = {n for p in gen.doc_files() for n in gen.blocks(p.read_text())}
    assert {
        "quickstart-results",
        "arith-stats",
        "constraints-base-rate",
        "smollm2-quant",
        "smollm2-results",
        "smollm2-summary",
        "recipe-reference",
    } <= names


def test_kl_column_is_labelled_by_how_it_was_measured():
    gen = _gen_docs()
    assert gen.kl_label({"temperature": 0}) == "log-ratio on greedy outputs (nats)"
    assert gen.kl_label({"temperature": 1}) == "KL (nats, sampled)"
    assert gen.kl_label({"temperature": 0.7}) == "log-ratio on samples at temperature 0.7 (nats)"


def test_smollm2_times_are_marked_idle_only_when_measured_so():
    """A recipe's time in docs/results.md's SmolLM2 table says "(idle)" only when bench/smollm2_results.py measured that
    it ran with 2 threads or more and other processes used under 10% of the machine's CPU meanwhile."""
    gen = _gen_docs()
    assert gen._minutes({"seconds": 696.3, "threads": 2, "others_cpu_share": 0.013}) == "12 min (idle)"
    assert gen._minutes({"seconds": 696.3, "threads": 2, "others_cpu_share": 0.4}) == "12 min"
    assert gen._minutes({"seconds": 696.3, "threads": 1, "others_cpu_share": 0.0}) == "12 min"
    assert gen._minutes({"seconds": 2880.0}) == "48 min"  # a run collected by hand: nothing measured
    assert gen._minutes({"seconds": None}) == ""


def test_smollm2_summary_folds_the_seeds_of_each_recipe(monkeypatch):
    """One line per recipe: every seed's gain, their mean and sample SD, repetition changes, KL range, the slowest
    idle time, and how many seeds meet the goal (docs/results.md: the same test as the per-seed table's last
    column)."""
    gen = _gen_docs()

    def run(seed, gain, low, rep, kl, seconds, threads):
        e = {"strict_accuracy_diff": gain, "strict_accuracy_diff_ci": [low, gain + 0.08], "repetition": 0.07 + rep,
             "repetition_reference": 0.07, "nll_change": 0.0, "kl": kl}  # fmt: skip
        return {"recipe": "recipes/smollm2_ppo_lora.yaml", "seed": seed, "eval": e, "seconds": seconds,
                "threads": threads, "others_cpu_share": 0.01}  # fmt: skip

    runs = [run(1, 0.10, 0.02, 0.01, 2.0, 600, 2), run(0, 0.20, 0.12, -0.02, 3.5, 700, 2), run(2, 0.30, 0.2, 0.06,
            1.5, 1500, 1)]  # fmt: skip
    monkeypatch.setattr(gen, "_result", lambda stem: {"results": {str(i): r for i, r in enumerate(runs)}})
    line = gen.smollm2_summary().splitlines()[2]
    assert line == (
        "| `smollm2_ppo_lora.yaml` | 0, 1, 2 | +0.200, +0.100, +0.300 | +0.200 (0.100) | -0.020, +0.010, +0.060 "
        "| 1.5-3.5 | 12 min | 1 of 3 |"
    )  # seed 1: gain under 15 points; seed 2: repetition +0.06; the 25-min run shared the machine


def test_quickstart_results_were_measured_with_the_shipped_recipes():
    """bench/results/quickstart.json describes the recipes as they are: each exists, and the eval settings it was
    measured with are those of the quickstart's eval stage now (else rerun bench/quickstart_results.py)."""
    from alignlab.recipe import load_recipe

    data = json.loads((ROOT / "bench" / "results" / "quickstart.json").read_text())
    spec = load_recipe(ROOT / data["eval_recipe"]).stage("eval")
    for name, res in data["results"].items():
        assert (ROOT / res["recipe"]).exists(), name
        e = res["eval"]
        assert e["num_prompts"] == spec.num_prompts, name
        assert (e["settings"]["temperature"], e["settings"]["max_new_tokens"]) == (
            spec.rollout.temperature,
            spec.rollout.max_new_tokens,
        ), name


def test_smollm2_results_were_measured_with_the_shipped_recipes():
    """bench/results/smollm2.json describes the SmolLM2 recipes as they are: each exists, and its eval stage evaluates
    what the measurement did (prompts, tokens, decoding), so the results table's rows compare with each other; and every
    row was measured with the settings its recipe has now (a recipe changed after its rows were measured would show
    numbers it never produced)."""
    from alignlab.fingerprint import fingerprint, recipe_settings
    from alignlab.recipe import load_recipe

    data = json.loads((ROOT / "bench" / "results" / "smollm2.json").read_text())
    assert data["results"]
    for name, res in data["results"].items():
        recipe = load_recipe(ROOT / res["recipe"])
        assert res.get("settings") == fingerprint(recipe_settings(recipe))[:16], (
            f"row {name} of bench/results/smollm2.json was measured with other settings than {res['recipe']} has "
            f"now: rerun python bench/smollm2_results.py --recipes {name.rsplit('-s', 1)[0]} --seeds {res['seed']}"
        )
        spec = recipe.stage("eval")
        e = res["eval"]
        assert (e["num_prompts"], spec.dataset.path, spec.dataset.split) == (160, "builtin:constraints", "eval"), name
        assert (spec.num_prompts, spec.reference) == (160, "base"), name
        assert e["settings"]["max_new_tokens"] == spec.rollout.max_new_tokens, name
        assert e["settings"]["temperature"] == spec.rollout.temperature == 0.0, name


def test_arith_card_lists_every_split_the_task_has():
    from alignlab.builtin.tasks import get_task

    card = (ROOT / "data_cards" / "arith.md").read_text()
    block = card[card.index("| split | fields | content |") :].split("\n\n")[0]
    splits = [line.split("|")[1].strip().strip("`") for line in block.splitlines()[2:]]
    assert splits == list(get_task("arith").splits)
    quickstart = (ROOT / "recipes" / "quickstart.yaml").read_text()
    for split in re.findall(r"path: \"?builtin:arith\"?, split: (\w+)", quickstart):
        assert split in splits, split


def _shipped_recipes() -> list[Path]:
    return sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


def test_readme_recipe_table_lists_every_shipped_recipe():
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(recipes/[^`]+)` \|", readme, re.M)
    for path in _shipped_recipes():
        rel = str(path.relative_to(ROOT))
        assert any(Path(rel).match(row) for row in rows), f"README's recipe table lacks {rel}"
    for row in rows:
        assert list(ROOT.glob(row)), f"README's recipe table lists {row}, which does not exist"


def _chain(text: str, types: set[str]) -> list[str] | None:
    """The stage types a line like `SFT (LoRA) -> Bradley-Terry reward model -> PPO against it` names, or None."""
    if "->" not in text:
        return None
    pieces = [re.sub(r"\([^)]*\)", " ", p).split() for p in re.sub(r"\(->\s*(\w+)\)", r"-> \1", text).split("->")]
    found = [pieces[0][-1]] + [w for p in pieces[1:-1] for w in p if w.lower() in types] + [pieces[-1][0]]
    return [w.strip(",.:").lower() for w in found]


def test_recipe_headers_and_readme_name_the_stages_the_recipes_run():
    """`SFT -> DPO -> eval` in a recipe's first comment line, or in the README's recipe table, is the recipe's list
    of stage types."""
    from alignlab.recipe import load_recipe
    from alignlab.stages.types import STAGE_TYPES

    types = set(STAGE_TYPES)
    readme = (ROOT / "README.md").read_text()
    checked = 0
    for path in _shipped_recipes():
        stages = [s.type for s in load_recipe(path).stages]
        header = path.read_text().splitlines()[0]
        rel = str(path.relative_to(ROOT))
        row = re.search(rf"^\| `{re.escape(rel)}` \| (.*) \|$", readme, re.M)
        for where, text in ((f"{rel} header", header), (f"README row of {rel}", row.group(1) if row else "")):
            named = _chain(text, types)
            if named is not None:
                assert named == stages, f"{where} says {' -> '.join(named)}; the recipe runs {' -> '.join(stages)}"
                checked += 1
    assert checked >= 8


def test_bench_readme_lists_every_bench_script():
    readme = (ROOT / "bench" / "README.md").read_text()
    listed = set(re.findall(r"^\| `(\w+\.py)` \|", readme, re.M))
    assert listed == {p.name for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_")}


# ------------------------------------------------------------------------ the docs as a whole: links, names, scope


def _without_code_blocks(text: str) -> str:
    """Markdown text with its fenced code blocks blanked out (a `# comment` in a bash block is not a heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lowercased, punctuation dropped, spaces to hyphens, and -1, -2, ...
    after a repeated one."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", _without_code_blocks(page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_relative_link_in_the_docs_resolves():
    """Every relative link of README.md and docs/ points at a file or folder of the repository, and a `#fragment`
    at a heading of that page (GitHub's anchors), so moving a section cannot leave a link behind."""
    broken = []
    for page in _markdown_pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", _without_code_blocks(page.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, fragment = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)} -> {target}"
            if not resolved.exists():
                broken.append(f"{where}: no such file")
            elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
                broken.append(f"{where}: no heading with that anchor")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_a_front_door_to_every_page_of_the_docs():
    """The README stays short (what alignlab is, the two commands, a recipe, the stage and recipe tables, links) and
    links every page of docs/, so that nothing moved out of it is lost."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250, "README.md is the front door: move long sections into docs/"
    opening = readme.split("```")[0]
    for name in ("GRPO", "KTO", "generate", "DPO", "PPO", "SFT"):
        assert name in opening, f"the README's opening paragraph does not name {name}"
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", readme))
    pages = {str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").rglob("*.md"))}
    assert pages <= linked, f"pages of docs/ the README does not link: {sorted(pages - linked)}"
    assert "docs/multi-gpu.md" in linked


# Each pattern is written so that this file does not match it. Own-tracker issue numbers: "issue N", "issues N",
# "issue #N" with N a number (another project's "LLaMA-Factory #N" is a fine reference, and is not flagged).
_POINTS_OUTSIDE = {
    "a design note users do not have": re.compile("ALGO" + r"RITHMS\.md"),
    "a folder outside the repository": re.compile(r"\.\./shared|/shared" + "/design"),
    "an issue number of the project's own tracker": re.compile(r"\bissues? #?\d+", re.I),
}
_TEXT_FILES = ("*.py", "*.md", "*.yaml", "*.yml", "*.toml", "*.txt", "*.sh", "*.cfg")


def _project_text_files() -> list[Path]:
    folders = ("alignlab", "tests", "bench", "scripts", "recipes", "docs", "data_cards", ".ci")
    files = {ROOT / name for name in ("README.md", "pyproject.toml", "constraints.txt", ".ci/run")}
    for folder in folders:
        for pattern in _TEXT_FILES:
            files |= {p for p in (ROOT / folder).rglob(pattern) if ".cache" not in p.parts}
    return sorted(p for p in files if p.is_file())


def test_no_file_points_outside_the_repository_or_at_an_issue_number():
    """A user has the repository and nothing else: no file of it may send them to a document outside it, or to an
    issue of the project's own tracker; the docs say what is meant instead (docs/algorithms.md, the goal in
    docs/results.md)."""
    found = []
    for path in _project_text_files():
        rel = str(path.relative_to(ROOT))
        hits = [
            f"{rel}:{i}: {what}: {line.strip()}"
            for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
            for what, pattern in _POINTS_OUTSIDE.items()
            if pattern.search(line)
        ]
        found += hits
    assert not found, "\n".join(found)


def test_algorithms_doc_names_every_method_a_recipe_can_choose():
    """docs/algorithms.md has the formula of every loss, advantage, aggregation and KL estimator the recipe keys
    accept (read from the torch-free catalog and stage specs), and the arXiv id of every preference loss's source."""
    import typing

    from alignlab.losses.catalog import PREFERENCE_LOSS_INFO
    from alignlab.stages.specs import DistillLossSpec, GRPOSpec, PPOHyperSpec, SFTLossSpec

    doc = (ROOT / "docs" / "algorithms.md").read_text()

    def choices(model, key) -> list[str]:
        annotation = model.model_fields[key].annotation
        literals = [a for a in typing.get_args(annotation) if typing.get_origin(a) is typing.Literal] or [annotation]
        return [v for lit in literals for v in typing.get_args(lit)]

    names = list(PREFERENCE_LOSS_INFO) + choices(SFTLossSpec, "name") + choices(PPOHyperSpec, "kl_estimator")
    names += choices(GRPOSpec, "advantage") + choices(GRPOSpec, "loss_agg") + choices(DistillLossSpec, "name")
    missing = [n for n in names if f"`{n}`" not in doc and not re.search(rf"^{n}:", doc, re.M)]
    assert not missing, f"docs/algorithms.md lacks {missing}"
    for name, info in PREFERENCE_LOSS_INFO.items():
        for arxiv in re.findall(r"\d{4}\.\d{5}", info.source):
            assert arxiv in doc, f"{name}'s source arXiv {arxiv} is not in docs/algorithms.md"


def _package_modules() -> list[str]:
    """The package's Python files as git tracks them (a file someone is still writing is not yet the package's);
    every .py file under alignlab/ where there is no git."""
    try:
        out = subprocess.run(["git", "ls-files", "alignlab"], cwd=ROOT, capture_output=True, text=True, check=True)
        files = out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        files = []
    if not files:
        files = [str(p.relative_to(ROOT)) for p in (ROOT / "alignlab").rglob("*.py")]
    return sorted(f for f in files if f.endswith(".py") and (ROOT / f).exists())


def test_architecture_doc_lists_every_module_and_only_real_ones():
    """docs/architecture.md names modules that exist (every alignlab/... path, every `x.py` of its tables), and its
    module list names every module of the package, so a new or moved module shows up there."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    named = {p.rstrip(".") for p in re.findall(r"\balignlab/[\w/.]*\w/?", doc)}
    named |= {f"alignlab/{p}" for p in re.findall(r"`((?:\w+/)*\w+\.py)`", doc) if not p.startswith("alignlab/")}
    assert not [p for p in named if not (ROOT / p).exists()], [p for p in named if not (ROOT / p).exists()]
    listed = set(re.findall(r"^(alignlab/\S+\.py)\s", doc.split("## Modules", 1)[1], re.M))
    unlisted = [m for m in _package_modules() if m not in listed and not m.endswith("/__init__.py")]
    assert not unlisted, f"docs/architecture.md's module list lacks {unlisted}"


def test_readme_names_the_versions_constraints_txt_pins():
    """The README's tested versions are constraints.txt's pins (5.24 is not 5.23)."""
    pins = {
        name.lower().replace("_", "-"): version
        for name, version in re.findall(r"^([\w.-]+)==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    }
    section = (ROOT / "README.md").read_text().split("## Tested versions", 1)[1]
    stated = re.findall(
        r"\b(torch|transformers|trl|peft|accelerate|bitsandbytes|datasets|evaluate) (\d[\d.]*\d)", section
    )
    assert {name for name, _ in stated} >= {"torch", "transformers", "trl", "peft", "accelerate", "datasets"}
    for name, version in stated:
        assert (pins[name] + ".").startswith(version + "."), (
            f"README says {name} {version}; constraints.txt pins {pins[name]}"
        )
