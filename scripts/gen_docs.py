"""Writes the docs' measured and computed tables, so that they cannot drift from the code and the results.

A generated block in a Markdown file is

    <!-- table:NAME -->
    ...                  (rewritten by this script; do not edit by hand)
    <!-- /table -->

and NAME is one of TABLES below (numbers computed from the code, or read from a bench/results/*.json file), or
`json:STEM:KEY`: the Markdown table stored under KEY in bench/results/STEM.json (the benches write one).
`recipe-reference` is the body of docs/recipe-reference.md: every recipe key, walked from the schema's pydantic
classes and their field descriptions, so the reference changes with the schema (run this script after changing it).

    python scripts/gen_docs.py           # rewrite every block of README.md, data_cards/, docs/, bench/README.md
    python scripts/gen_docs.py --check   # change nothing; list the blocks that differ, exit 1 if any

tests/test_docs.py runs the check. After a new measurement (e.g. `python bench/quickstart_results.py`), run this
script and commit the JSON and the docs together.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
DOCS = ("README.md", "data_cards/*.md", "docs/*.md", "bench/README.md")
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w:.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _result(stem: str) -> dict:
    return json.loads((RESULTS / f"{stem}.json").read_text())


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "|".join("---" for _ in headers)
    line = lambda cells: "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"  # noqa: E731
    return "\n".join([line(headers), f"|{align}|"] + [line(r) for r in rows])


# ------------------------------------------------------------------------------------------------------ tables


def arith_stats() -> str:
    """data_cards/arith.md: counts and rates of `builtin:arith`, computed from alignlab/builtin/tasks.py."""
    from alignlab.builtin.tasks import arith_stats as stats

    st = stats()
    rows = [
        ["operand pairs (a in [0, 99], b in [1, 9])", f"{st['pairs']}"],
        [f'held out for evaluation (`sha256("a+b")[0] % {st["eval_buckets"]} == 0`)', f"{st['eval_pairs']}"],
        ["train side (`sft`, `preference`)", f"{st['train_pairs']}"],
        ["train pairs that need a carry", _pct(st["train_carry_share"])],
        [
            "`sft`: the demonstrator's number is right",
            f"{_pct(st['sft_right'])} (its probabilities give {_pct(st['sft_right_expected'])})",
        ],
        [
            "`sft`: the demonstrator keeps talking after its number",
            f"{_pct(st['sft_chatter'])} (set to {_pct(st['sft_chatter_expected'])})",
        ],
        ["`sft`: mean reward of the demonstrations", f"{st['sft_mean_reward']:.3f}"],
        ["`sft`: demonstrations earning the full 1.0", _pct(st["sft_full_reward"])],
        [
            "`preference`: rejected = chosen + chatter (the pair differs in manners only)",
            _pct(st["pairs_manners_only"]),
        ],
        ["`preference`: the rejected answer keeps talking after a number", _pct(st["pairs_rejected_chatters"])],
    ]
    note = (
        f"\nRates over {st['rows']:,} rows of each split at seed {st['seed']}, from "
        "`alignlab.builtin.tasks.arith_stats()`; counts are exact."
    )
    return _table(["quantity", "value"], rows) + "\n" + note


def kl_label(settings: dict) -> str:
    """What the eval's `kl` is, from the decoding it was measured with: only samples at temperature 1 make the mean
    log-ratio a KL estimate; on greedy outputs it is the log-ratio of the policy's mode."""
    t = settings.get("temperature")
    if t == 0:
        return "log-ratio on greedy outputs (nats)"
    return "KL (nats, sampled)" if t == 1 else f"log-ratio on samples at temperature {t} (nats)"


def quickstart_results() -> str:
    """docs/results.md: what the CPU recipes reach on builtin:arith, from bench/results/quickstart.json."""
    data = _result("quickstart")
    res = data["results"]
    what = {
        "quickstart": "SFT -> DPO, full FT",
        "sft_ppo_reward_fn": "SFT -> PPO on the true reward",
        "sft_reward_ppo": "SFT -> reward model -> PPO",
    }
    evals = [r["eval"] for r in res.values()]
    settings = evals[0]["settings"]
    if any(e["settings"] != settings or e["num_prompts"] != evals[0]["num_prompts"] for e in evals):
        raise ValueError("quickstart.json: the recipes were evaluated with different settings; rerun the bench")
    decoding = (
        "greedy decoding" if settings["temperature"] == 0 else f"sampling at temperature {settings['temperature']}"
    )
    rows = []
    for name, r in res.items():
        e = r["eval"]
        rows.append(
            [
                f"`{Path(r['recipe']).name}` ({what.get(name, name)}, {r['seconds'] / 60:.0f} min)",
                f"{e['true_reward_reference']:.3f} -> {e['true_reward']:.3f}",
                f"{e['win_rate']:.2f}",
                f"{e['kl']:.2f}",
                f"{e['preference_accuracy']:.3f}",
            ]
        )
    m = data["machine"]
    head = (
        f"Measured with `python bench/quickstart_results.py` ({m['date']}, commit {data['commit']}, "
        f"{m['cpu_count']} CPUs, torch {data['versions'].get('torch')}), each policy against its own SFT starting "
        f"point, with the quickstart's eval stage: {evals[0]['num_prompts']} held-out prompts, {decoding}, "
        f"up to {settings['max_new_tokens']} new tokens. Time: the recipe's stages on that (shared) machine.\n"
    )
    headers = ["recipe", "true reward: SFT -> aligned", "win rate vs SFT", kl_label(settings), "held-out pair accuracy"]
    notes = []
    for name, r in res.items():
        if "ppo" in r:
            p = r["ppo"]
            notes.append(
                f"`{name}`: PPO's EOS rate {p['first_eos_rate']:.2f} -> {p['last_eos_rate']:.2f} (first and last "
                f"logged, {p['updates']} updates)"
            )
        if r.get("reward_model_eval_accuracy") is not None:
            notes.append(f"`{name}`: the reward model's held-out pair accuracy {r['reward_model_eval_accuracy']:.3f}")
    table = _table(headers, rows, "---|---|---:|---:|---:")
    if settings["temperature"] != 1:
        notes.append(
            "the log-ratio column is the mean of log pi(y|x) - log ref(y|x) over the policy's own completions at "
            "that decoding: how far the policy moved from the reference there, not a KL (that needs samples at "
            "temperature 1)"
        )
    text = "; ".join(notes)
    return head + "\n" + table + ("\n\n" + text[0].upper() + text[1:] + "." if notes else "")


def constraints_base_rate() -> str:
    """data_cards/constraints.md: SmolLM2-135M-Instruct's score per constraint kind, bench/results/
    constraints_base_rate.json."""
    data = _result("constraints_base_rate")
    rep = data["report"]
    kinds = list(rep["per_kind"].items())
    half = (len(kinds) + 1) // 2
    cells = [[f"`{k}`", str(v["n"]), f"{v['accuracy']:.2f}"] for k, v in kinds]
    rows = [cells[i] + [""] + (cells[half + i] if half + i < len(cells) else ["", "", ""]) for i in range(half)]
    table = _table(
        ["kind", "constraints", "satisfied", "", "kind", "constraints", "satisfied"],
        rows,
        "---|---|---|---|---|---|---",
    )
    rewards = [s["reward"] for s in data["samples"]]
    n, args = rep["n_prompts"], data["args"]
    strict = round(rep["strict_accuracy"] * n)
    return (
        f"Measured on {data['date']}: the first {n} eval prompts, {args['max_new_tokens']} new tokens, transformers "
        f"{data['versions']['transformers']}, {args['threads']} threads ({data['load_s'] + data['generate_s']:.0f} s "
        "on a shared machine).\n\n"
        + table
        + f"\n\nStrict accuracy {rep['strict_accuracy']:.3f} ({strict} of {n} prompts), instruction accuracy "
        f"{rep['instruction_accuracy']:.3f}, mean reward {rep['mean_reward']:.3f}; rewards of the {n} prompts: "
        f"{sum(r == 0 for r in rewards)} at 0, {sum(0 < r < 1 for r in rewards)} in between, "
        f"{sum(r == 1 for r in rewards)} at 1."
    )


def smollm2_quant() -> str:
    """data_cards/smollm2-135m-instruct.md: what Q4_1 costs, bench/results/smollm2_quant.json."""
    d = _result("smollm2_quant")
    err = d["estimated_relative_weight_error"]
    second = ", ".join(f"{x:.2f}" for x in d["nll_with_a_second_rounding_error"])
    rows = [
        [
            f"NLL of the shipped model on a fixed {d['text_tokens']}-token English paragraph (in the script)",
            f"{d['nll_nats_per_token']:.3f} nats/token (perplexity {d['perplexity']:.1f})",
        ],
        [
            "estimated weight error of Q4_1, relative to the weights' RMS (rounding step d / sqrt(12) per block)",
            _pct(err["Q4_1"]),
        ],
        ["the same for the Q8_0 embedding / output head", _pct(err["Q8_0"])],
        [
            "NLL after adding a second rounding error of the same size (uniform in +-d/2, "
            f"{len(d['nll_with_a_second_rounding_error'])} seeds)",
            f"{second} (+{d['nll_increase_mean']:.2f} on average)",
        ],
        [
            f"greedy decoding, float32, batch 1, {d['threads']} threads (a shared machine)",
            f"~{d['greedy_tokens_per_s']:.0f} tokens/s",
        ],
    ]
    return _table(["", ""], rows)


SMOLLM2_WHAT = {
    "sft_dpo": "SFT on demonstrations -> DPO on near misses",
    "bon_sft": "best-of-8 SFT on its own answers that met every constraint",
    "revise_sft": "SFT on its own answers revised by code to meet the constraints",
    "revise_sft_2rounds": "the same, two rounds: round 2 samples from the round-1 model",
    "revise_sft_2rounds_ul": "the same, round 2 for 2 epochs with unlikelihood against loops",
    "revise_sft_dpo": "round 1 of the same, then DPO with an NLL term on pairs from the SFT model's own answers",
    "revise_sft_grpo": "round 1 of the same, then GRPO from the SFT model, the checker as reward",
    "revise_sft_grpo_ul": "the same GRPO with unlikelihood on its samples against greedy loops",
    "generate_dpo": "DPO on its own samples, best vs worst",
    "ppo": "PPO, the checker as reward",
    "grpo": "GRPO, the checker as reward",
}


def _ci(ci: list[float] | None, sign: str = "") -> str:
    return f"[{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]" if ci else ""


def smollm2_results() -> str:
    """docs/results.md: what the SmolLM2 recipes reach on builtin:constraints' held-out prompts, from
    bench/results/smollm2.json (one row per recipe and seed, every seed shown; the base model's row once, checked
    equal in every run)."""
    res = _result("smollm2")["results"]
    runs = sorted(res.values(), key=lambda r: (list(SMOLLM2_WHAT).index(_recipe_key(r["recipe"])), r["seed"]))
    evals = [r["eval"] for r in runs]
    base = evals[0]
    for r, e in zip(runs, evals):
        same = {k: v for k, v in e["settings"].items() if k != "seed"} == {
            k: v for k, v in base["settings"].items() if k != "seed"
        }  # the seed moves only the KL samples
        if not same or e["num_prompts"] != base["num_prompts"]:
            raise ValueError(f"smollm2.json: {r['recipe']} seed {r['seed']} was evaluated with other settings")
        if (e["strict_accuracy_reference"], e["true_reward_reference"]) != (
            base["strict_accuracy_reference"],
            base["true_reward_reference"],
        ):
            raise ValueError(f"smollm2.json: the base model scored differently in {r['recipe']} seed {r['seed']}")
    n = base["num_prompts"]
    rows = [
        [
            "base SmolLM2-135M-Instruct",
            "",
            f"{base['strict_accuracy_reference']:.3f} {_ci(base['strict_accuracy_reference_ci'])}",
            "",
            f"{base['true_reward_reference']:.3f}",
            "",
            "0",
            f"{base['repetition_reference']:.3f}",
            f"{base['response_length_reference']:.0f}",
            "",
            "",
            "",
        ]
    ]
    for r, e in zip(runs, evals):
        rows.append(
            [
                f"`{Path(r['recipe']).name}` ({SMOLLM2_WHAT[_recipe_key(r['recipe'])]})",
                str(r["seed"]),
                f"{e['strict_accuracy']:.3f} {_ci(e['strict_accuracy_ci'])}",
                f"{e['strict_accuracy_diff']:+.3f} {_ci(e['strict_accuracy_diff_ci'], '+')}",
                f"{e['true_reward']:.3f}",
                f"{e['true_reward_diff']:+.3f} {_ci(e['true_reward_diff_ci'], '+')}",
                f"{e['kl']:.2f}",
                f"{e['repetition']:.3f}",
                f"{e['response_length']:.0f}",
                f"{e['nll_change']:+.1%}" if e.get("nll_change") is not None else "",
                _minutes(r),
                _counted(e),
            ]
        )
    s = base["settings"]
    first, dates = runs[0], [r["date"] for r in runs]
    head = (
        f"Measured with `python bench/smollm2_results.py` ({' to '.join(sorted({min(dates), max(dates)}))}, {first['machine']['cpu_count']} shared CPUs, torch "
        f"{first['versions'].get('torch')}): {n} held-out prompts of `builtin:constraints` (10 per constraint kind; "
        f"held-out topics and combinations), greedy answers of up to {s['max_new_tokens']} new tokens, each policy "
        "against the base model on the same prompts (differences paired per prompt); 95% intervals.\n"
    )
    headers = [
        "model (recipe)",
        "seed",
        "strict accuracy",
        "vs base",
        "mean reward",
        "vs base",
        "KL (nats, sampled)",
        "repeated 3-grams",
        "length (tokens)",
        "NLL change",
        "time",
        "meets the goal",
    ]
    foot = (
        "\n\nThe goal ([above](#the-goal)): strict accuracy at least 15 points above the base with the paired "
        "interval above 0, counted only without degeneration: repeated 3-grams within 5 points of the base's and NLL on `builtin:prose` "
        "up by at most 5%. KL: mean log-ratio over answers sampled at temperature 1. Time: the whole recipe's wall "
        f"time (its stages' times summed where a run reused finished stages of another); {IDLE_MARK} alone on the machine with 2 threads, the others with 1 thread beside another job (which "
        "takes up to 3 times as long)."
    )
    return head + "\n" + _table(headers, rows, "---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---") + foot


def smollm2_summary() -> str:
    """docs/results.md: one line per SmolLM2 recipe over its seeds (the smollm2-results table, folded): every seed's
    strict-accuracy gain, their mean and spread, the repetition change and whether each seed meets the goal (defined
    in docs/results.md, "The goal")."""
    res = _result("smollm2")["results"]
    by_recipe: dict[str, list[dict]] = {}
    for r in sorted(res.values(), key=lambda r: r["seed"]):
        by_recipe.setdefault(_recipe_key(r["recipe"]), []).append(r)
    rows = []
    for key in SMOLLM2_WHAT:
        runs = by_recipe.get(key)
        if not runs:
            continue
        gains = [r["eval"]["strict_accuracy_diff"] for r in runs]
        mean = sum(gains) / len(gains)
        spread = (sum((g - mean) ** 2 for g in gains) / (len(gains) - 1)) ** 0.5 if len(gains) > 1 else None
        reps = [r["eval"]["repetition"] - r["eval"]["repetition_reference"] for r in runs]
        alone = [r["seconds"] / 60 for r in runs if r["seconds"] and _minutes(r).endswith(IDLE_MARK)]
        rows.append(
            [
                f"`{Path(runs[0]['recipe']).name}`",
                ", ".join(str(r["seed"]) for r in runs),
                ", ".join(f"{g:+.3f}" for g in gains),
                f"{mean:+.3f}" + (f" ({spread:.3f})" if spread is not None else ""),
                ", ".join(f"{x:+.3f}" for x in reps),
                f"{min(r['eval']['kl'] for r in runs):.1f}-{max(r['eval']['kl'] for r in runs):.1f}",
                f"{max(alone):.0f} min" if alone else "",
                f"{sum(_counted(r['eval']) == 'yes' for r in runs)} of {len(runs)}",
            ]
        )
    headers = [
        "recipe",
        "seeds",
        "strict accuracy vs base, per seed",
        "mean (SD over seeds)",
        "repeated 3-grams vs base",
        "KL (nats)",
        "time alone (slowest seed)",
        "seeds meeting the goal",
    ]
    return _table(headers, rows, "---|---|---|---:|---|---:|---:|---")


IDLE_MARK = "(idle)"
IDLE_MARK = "(idle)"


def _minutes(run: dict) -> str:
    """A run's wall time, marked when it ran alone: 2 threads or more, and other processes used under 10% of the
    machine's CPU meanwhile."""
    if not run["seconds"]:
        return ""
    alone = run.get("threads", 1) >= 2 and run.get("others_cpu_share", 1.0) < 0.1
    return f"{run['seconds'] / 60:.0f} min" + (f" {IDLE_MARK}" if alone else "")


def _counted(e: dict) -> str:
    """Whether a row meets the goal (docs/results.md, "The goal": strict accuracy +15 points over the base with the
    paired interval above 0; repeated 3-grams at most 5 points and NLL on builtin:prose at most 5% above the base's),
    or the first reason it does not."""
    if e["repetition"] - e["repetition_reference"] > 0.05:
        return f"no: repetition +{e['repetition'] - e['repetition_reference']:.3f}"
    if e.get("nll_change") is not None and e["nll_change"] > 0.05:
        return f"no: NLL +{e['nll_change']:.1%}"
    if e["strict_accuracy_diff_ci"][0] <= 0:
        return "no: interval includes 0"
    return "yes" if e["strict_accuracy_diff"] >= 0.15 else "no: gain under 15 points"


def _recipe_key(recipe: str) -> str:
    return Path(recipe).stem.removeprefix("smollm2_").removesuffix("_lora")


# ------------------------------------------------------------------------------------------- recipe reference


def recipe_reference() -> str:
    """docs/recipe-reference.md: every key a recipe can hold, read from the schema's pydantic classes (alignlab/
    schema.py, alignlab/stages/specs.py, the Recipe in alignlab/recipe.py) and their field descriptions: the top-level
    keys and their sections, the keys every stage has, then each registered stage type's own keys and sections, each
    key with its type, default and description. A section met in several places with the same defaults (a dataset,
    `parallel`) is written once, under "Sections used in several places", and linked from each place."""
    import alignlab.recipe as recipe_module
    from alignlab.stages.registry import stage_types

    stage_base = _section_class(recipe_module.Recipe.model_fields["stages"].annotation)
    stages = _Place("Keys of every stage", stage_base, skip={"type"}, owner="every stage: ", link_text="stage")
    roots = [_Place("Top-level keys", recipe_module.Recipe), stages]
    for name, record in stage_types().items():
        inherited = {"type"} | {
            k for k, f in stage_base.model_fields.items() if repr(record.spec.model_fields.get(k)) == repr(f)
        }
        roots.append(_Place(f"Stage type `{name}`", record.spec, skip=inherited, owner=f"`{name}` stage: "))
    for root in roots:
        root.grow(stop={stage_base: stages})
    return _render_reference(roots)


class _Place:
    """A section of the recipe at one place: its pydantic class, the defaults it has there (`instance`: the
    field's default object, whose values can differ from the class's, e.g. each stage type's learning rate), its
    path below its root section, and the sections under it."""

    def __init__(self, title: str, cls, instance=None, path="", skip=frozenset(), owner="", link_text=None):
        self.title, self.cls, self.instance, self.path, self.skip, self.owner = title, cls, instance, path, skip, owner
        self.link_text = link_text  # how a key holding this section names it (default: the title)
        self.children: list[_Place] = []
        self.links: dict[str, _Place] = {}  # field name -> the section it holds

    def fields(self) -> list[tuple[str, object, object]]:
        """(key, pydantic field, its default here) for each key of the section, in declaration order."""
        return [
            (k, f, _default_of(k, f, self.instance))
            for k, f in self.cls.model_fields.items()
            if k not in self.skip and not f.exclude
        ]

    def grow(self, stop: dict) -> None:
        from pydantic import BaseModel

        for key, field, value in self.fields():
            model = _section_class(field.annotation)
            if model in stop:
                self.links[key] = stop[model]
            elif model is not None:
                path = (f"{self.path}.{key}" if self.path else key) + ("[]" if _holds_list(field.annotation) else "")
                held = value if isinstance(value, BaseModel) else None
                child = _Place(f"{self.owner}`{path}`", model, held, path, owner=self.owner)
                child.grow(stop)
                self.children.append(child)
                self.links[key] = child

    def signature(self) -> tuple:
        """Equal for two places that render the same table (same class, same defaults, same sections below)."""
        return (
            self.cls,
            tuple((k, _default_text(v)) for k, _, v in self.fields()),
            tuple(c.signature() for c in self.children),
        )

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def where(self) -> str:
        return f"{self.owner}`{self.path}`"


def _render_reference(roots: list[_Place]) -> str:
    uses: dict[tuple, list[_Place]] = {}
    for root in roots:
        for place in list(root.walk())[1:]:
            uses.setdefault(place.signature(), []).append(place)
    shared = [places for places in uses.values() if len(places) > 1]
    titles = {p.title for root in roots for p in root.walk() if len(uses.get(p.signature(), [p])) == 1}
    for places in shared:  # one heading per shared section: the key it is held under
        name = f"`{places[0].path.rsplit('.', 1)[-1].removesuffix('[]')}`"
        name = name if name not in titles else f"{name} ({places[0].where()})"
        titles.add(name)
        for place in places:
            place.title = name
    out: list[str] = []

    def write(place: _Place, level: str, used_as: list[_Place] | None = None) -> None:
        out.extend([f"{level} {place.title}", ""])
        if _class_doc(place.cls):
            out.extend([_class_doc(place.cls), ""])
        if used_as:
            out.extend([f"Used as {', '.join(p.where() for p in used_as)}.", ""])
        rows = [
            [f"`{key}`", _type_text(field, place.links.get(key)), _default_text(value), _cell(field.description)]
            for key, field, value in place.fields()
        ]
        out.extend([_table(["key", "type", "default", "description"], rows) if rows else "(no keys of its own)", ""])
        if place.cls.model_config.get("extra") == "allow":
            out.extend(["Other keys are allowed in this section: see its description above.", ""])
        moved = getattr(place.cls, "MOVED", None) or {}
        if moved:
            pairs = ", ".join(f"`{old}` -> `{new}`" for old, new in moved.items())
            out.extend(
                [f"Keys that moved (a recipe that still uses one gets an error naming its new path): {pairs}.", ""]
            )

    for root in roots:
        write(root, "##")
        for place in list(root.walk())[1:]:
            if len(uses[place.signature()]) == 1:
                write(place, "###")
    if shared:
        out.extend(["## Sections used in several places", ""])
        for places in shared:
            write(places[0], "###", used_as=places)
    return "\n".join(out).rstrip("\n")


def _anchor(title: str) -> str:
    """GitHub's anchor for a heading (tests/test_docs.py checks every link against the same rule)."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _section_class(annotation):
    """The pydantic class a field's annotation holds (directly, in a list, or in a union with other types), if any:
    the recipe's own reading of it (the one the override paths use)."""
    from alignlab.recipe import _model_in

    return _model_in(annotation)


def _holds_list(annotation) -> bool:
    """Whether the annotation holds its section in a list (`reward_fn: [{fn: ...}, ...]`)."""
    import typing

    if typing.get_origin(annotation) is list:
        return _section_class(annotation) is not None
    return any(_holds_list(a) for a in typing.get_args(annotation))


def _default_of(key: str, field, instance):
    """A key's default at a place: its value on the place's default object when there is one, else the field's."""
    from pydantic_core import PydanticUndefined

    if instance is not None:
        return getattr(instance, key)
    if field.is_required():
        return PydanticUndefined
    return field.get_default(call_default_factory=True)


def _default_text(value) -> str:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "the section's defaults"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{json.dumps(value, default=str)}`"


def _type_text(field, link: _Place | None) -> str:
    """A key's type in words, with its bounds (> 0, <= 1, ...) and a link to the section it holds."""
    bounds = []
    for meta in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{sign} {getattr(meta, attr)}")
        if getattr(meta, "min_length", None):
            bounds.append(f"at least {meta.min_length}")
    return _words(field.annotation, link) + (f", {' and '.join(bounds)}" if bounds else "")


def _words(annotation, link: _Place | None) -> str:
    import types
    import typing
    from pathlib import PurePath

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    value = lambda v: "`null`" if v is None else f"`{v}`" if isinstance(v, str) else f"`{json.dumps(v)}`"  # noqa: E731
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(value(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        if all(a is type(None) or typing.get_origin(a) is typing.Literal for a in args):
            choices = [v for a in args for v in (typing.get_args(a) if a is not type(None) else (None,))]
            return "one of " + ", ".join(value(v) for v in choices)
        return " or ".join(_words(a, link) for a in args)
    if origin is list:
        return f"list of {_words(args[0], link)}" if args else "list"
    if origin is dict:
        return f"mapping of {_words(args[0], link)} to {_words(args[1], link)}" if args else "mapping"
    if _section_class(annotation) is annotation:
        return f"section [{link.link_text or link.title}](#{_anchor(link.title)})" if link else "section"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", typing.Any: "any"}
    if annotation in names:
        return names[annotation]
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _class_doc(cls) -> str:
    import inspect

    doc = cls.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else ""


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


TABLES: dict[str, Callable[[], str]] = {
    "arith-stats": arith_stats,
    "quickstart-results": quickstart_results,
    "constraints-base-rate": constraints_base_rate,
    "smollm2-quant": smollm2_quant,
    "smollm2-results": smollm2_results,
    "smollm2-summary": smollm2_summary,
    "recipe-reference": recipe_reference,
}


def render_block(name: str) -> str:
    if name.startswith("json:"):
        _, stem, key = name.split(":")
        return "\n".join(line for line in _result(stem)[key].strip().splitlines() if line.startswith("|"))
    if name not in TABLES:
        raise KeyError(f"unknown generated table '{name}'; known: {', '.join(TABLES)}, json:STEM:KEY")
    return TABLES[name]()


def render(text: str) -> str:
    """`text` with every generated block rewritten."""
    return BLOCK.sub(lambda m: m.group(1) + render_block(m.group("name")).rstrip("\n") + "\n" + m.group(4), text)


def doc_files() -> list[Path]:
    return sorted({p for pattern in DOCS for p in ROOT.glob(pattern)})


def blocks(text: str) -> list[str]:
    return [m.group("name") for m in BLOCK.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs")
    args = ap.parse_args(argv)
    stale = []
    for path in doc_files():
        text = path.read_text()
        changed = [m.group("name") for m in BLOCK.finditer(text) if render(m.group(0)) != m.group(0)]
        if changed:
            stale.append(f"{path.relative_to(ROOT)}: {', '.join(changed)}")
            if not args.check:
                path.write_text(render(text))
    for line in stale:
        print(("differs: " if args.check else "rewritten: ") + line)
    return 1 if (stale and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
