"""The generate stage: pairs are the best vs the worst sample with ties dropped, best-of-N SFT data, `stage:NAME`
datasets (validation, reading, freshness), and generate -> dpo -> generate -> dpo on the builtin tiny model."""

import hashlib
import json
import math
from types import SimpleNamespace

import pytest
import yaml

from alignlab.data import DataError, build_datasets
from alignlab.recipe import RecipeError, parse_recipe
from alignlab.rewards import load_reward_fn
from alignlab.stages.generate import build_rows, sample_seed
from alignlab.stages.registry import check_chain
from tests.helpers import lora, make_recipe

CHAT = [{"role": "user", "content": "What is 2+2?"}]
# The end-to-end tests sample the built-in base model, which knows no chat format: its answers to arith prompts are
# rarely numbers (0 from builtin:arith whatever they say) and how rarely depends on the CPU that pretrained it. A
# reward with partial credit on any text, and a higher temperature, give pairs on every machine.
LENGTH_REWARD = "tests.helpers:char_length_reward"


def _spec(**keys):
    base = {"output": "preference", "min_margin": 0.0, "min_score": None, "rollout": SimpleNamespace(num_samples=4)}
    return SimpleNamespace(**{**base, **keys})


def _results():
    """Prompt 0: scores [0.2, 1.0, 0.5, 1.0]: best = sample 1 (the first of the two 1.0s), worst = sample 0, margin
    0.8. Prompt 1: all 0.5: a tie, no pair. Prompt 2: [0.3, 0.0, 0.0, 0.6]: best 3, worst 1 (first of the 0.0s),
    margin 0.6."""
    return [
        {"index": 0, "texts": ["a", "b", "c", "d"], "scores": [0.2, 1.0, 0.5, 1.0], "ended": [True] * 4},
        {"index": 1, "texts": ["e", "f", "g", "h"], "scores": [0.5] * 4, "ended": [True] * 4},
        {"index": 2, "texts": ["i", "", "k", "l"], "scores": [0.3, 0.0, 0.0, 0.6], "ended": [True, True, True, False]},
    ]


def test_pairs_are_best_vs_worst_with_ties_dropped():
    prompts = [CHAT, CHAT, CHAT]
    rows, summary = build_rows(prompts, _results(), _spec())

    def turn(text):
        return [{"role": "assistant", "content": text}]

    assert [(r["chosen"], r["rejected"]) for r in rows] == [(turn("b"), turn("a")), (turn("l"), turn(""))]
    assert [r["score_margin"] for r in rows] == pytest.approx([0.8, 0.6])
    assert [(r["chosen_score"], r["rejected_score"]) for r in rows] == [(1.0, 0.2), (0.6, 0.0)]
    # 2 of 3 prompts gave a pair; mean margin (0.8 + 0.6) / 2 = 0.7; 1 tie; 11 of 12 samples ended.
    assert (summary["rows"], summary["ties"]) == (2, 1) and summary["row_rate"] == pytest.approx(2 / 3)
    assert summary["mean_margin"] == pytest.approx(0.7) and summary["ended_rate"] == pytest.approx(11 / 12)
    assert summary["mean_best_score"] == pytest.approx((1.0 + 0.5 + 0.6) / 3)
    # min_margin 0.7 keeps only the 0.8 pair.
    rows, _ = build_rows(prompts, _results(), _spec(min_margin=0.7))
    assert [r["score_margin"] for r in rows] == pytest.approx([0.8])
    # Plain-string prompts: data cells cannot be empty, so the empty sample of prompt 2 is not its worst; the first
    # of the remaining 0.0s (sample 2, "k") is.
    rows, _ = build_rows(["p0", "p1", "p2"], _results(), _spec())
    assert [(r["chosen"], r["rejected"], r["score_margin"]) for r in rows] == [("b", "a", 0.8), ("l", "k", 0.6)]


def test_sft_output_is_best_of_n_with_min_score():
    rows, summary = build_rows(["p0", "p1", "p2"], _results(), _spec(output="sft"))
    assert [(r["prompt"], r["completion"], r["score"]) for r in rows] == [
        ("p0", "b", 1.0),
        ("p1", "e", 0.5),
        ("p2", "l", 0.6),
    ]
    rows, summary = build_rows(["p0", "p1", "p2"], _results(), _spec(output="sft", min_score=0.6))
    assert [r["completion"] for r in rows] == ["b", "l"] and summary["rows"] == 2  # rejection sampling


def test_revised_best_of_n_prefers_the_least_revised_sample():
    """With revise_fn, samples are scored as revised; among equal revised scores the one that scored higher before
    revision wins (prompt 0: samples 1 and 3 both reach 1.0 revised; 3 scored 0.5 before, 1 scored 0.0)."""
    results = [
        {"index": 0, "texts": ["A", "B", "C", "D"], "scores": [0.5, 1.0, 0.5, 1.0], "ended": [True] * 4,
         "raw_texts": ["a", "b", "C", "d"], "raw_scores": [0.5, 0.0, 0.5, 0.5]},
        {"index": 1, "texts": ["E", "f", "g", "h"], "scores": [1.0, 0.0, 0.0, 0.0], "ended": [True] * 4,
         "raw_texts": ["e", "f", "g", "h"], "raw_scores": [0.0] * 4},
    ]  # fmt: skip
    rows, summary = build_rows(["p0", "p1"], results, _spec(output="sft", min_score=1.0))
    assert [(r["prompt"], r["completion"], r["score"]) for r in rows] == [("p0", "D", 1.0), ("p1", "E", 1.0)]
    assert summary["revised_rate"] == 4 / 8  # A, B, D and E were revised; C, f, g, h came back unchanged
    assert summary["mean_score_before_revision"] == pytest.approx((0.5 + 0.0 + 0.5 + 0.5) / 8)


def test_sample_seeds_depend_on_the_sample_only():
    seeds = {sample_seed(0, "pairs", i, j) for i in range(50) for j in range(4)}
    assert len(seeds) == 200  # one stream per sample
    assert sample_seed(0, "pairs", 3, 1) == sample_seed(0, "pairs", 3, 1) != sample_seed(1, "pairs", 3, 1)
    assert sample_seed(0, "pairs", 3, 1) != sample_seed(0, "pairs2", 3, 1)  # a second generate stage draws anew


# ------------------------------------------------------------------------------------------ recipes


def _raw(stages, out="/tmp/alignlab-unused"):
    return make_recipe(stages, out, name="gen")


GEN = {"name": "pairs", "type": "generate", "dataset": {"path": "builtin:arith", "split": "sft", "size": 8}}
GEN_FN = {**GEN, "reward_fn": "builtin:arith"}
DPO = {"name": "dpo", "type": "dpo", "dataset": {"path": "stage:pairs"}}


@pytest.mark.parametrize(
    "stages, message",
    [
        (
            [DPO, GEN_FN],
            "stages[0] (dpo).dataset.path = 'stage:pairs', but stage 'pairs' comes later in the recipe. A 'stage:NAME' "
            "dataset is the data an EARLIER stage wrote (generate stages): none before it.",
        ),
        (
            [GEN_FN, {**DPO, "dataset": {"path": "stage:pair"}}],
            "stages[1] (dpo).dataset.path = 'stage:pair', but stage 'pair' is not a stage of this recipe. A "
            "'stage:NAME' dataset is the data an EARLIER stage wrote (generate stages): pairs.",
        ),
        (
            [
                {"name": "sft", "type": "sft", "dataset": {"path": "builtin:arith", "split": "sft"}},
                {**DPO, "dataset": {"path": "stage:sft"}},
            ],
            "stages[1] (dpo).dataset.path = 'stage:sft', but 'sft' is an sft stage, which writes no dataset; "
            "'stage:NAME' reads the data of a generate stage",
        ),
        (
            [{**GEN_FN, "output": "sft"}, DPO],
            "stages[1] (dpo).dataset.path = 'stage:pairs': stage 'pairs' writes prompt_completion data, which a dpo "
            "stage's dataset cannot read (it reads preference)",
        ),
        (
            [GEN_FN, {**DPO, "input": "pairs"}],
            "stages[1] (dpo).input = 'pairs' is a generate stage, which writes no model",
        ),
    ],
)
def test_stage_data_references_are_checked(stages, message):
    with pytest.raises(RecipeError) as e:
        check_chain(parse_recipe(_raw(stages)))
    assert str(e.value) == message


@pytest.mark.parametrize(
    "keys, message",
    [
        ({}, "a generate stage needs exactly one of reward_model"),
        (
            {"reward_fn": "builtin:arith", "rollout": {"num_samples": 1}},
            "output: preference needs rollout.num_samples >= 2",
        ),
        ({"reward_fn": "builtin:arith", "min_score": 0.5}, "min_score applies to output: sft"),
        ({"reward_fn": "builtin:arith", "revise_fn": "builtin:constraints"}, "revise_fn applies to output: sft"),
    ],
)
def test_generate_keys_are_checked(keys, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(_raw([{**GEN, **keys}]))


def test_validate_accepts_stage_data(write_recipe):
    """The data does not exist before the run: validate checks the reference and the format (check_chain), and the
    rest of the generate stage (its reward function), without a note about the data."""
    from alignlab.validate import validate_recipe

    _, notes = validate_recipe(write_recipe(_raw([GEN_FN, DPO])))
    assert not any("stage:pairs" in n for n in notes)
    with pytest.raises(RecipeError, match="stages\\[0\\] \\(pairs\\).reward_fn: unknown built-in reward function"):
        validate_recipe(write_recipe(_raw([{**GEN, "reward_fn": "builtin:chess"}, DPO])))
    sft_gen = {**GEN_FN, "output": "sft"}
    with pytest.raises(
        RecipeError, match="stages\\[0\\] \\(pairs\\).revise_fn: no built-in revise function 'builtin:arith'"
    ):
        validate_recipe(write_recipe(_raw([{**sft_gen, "revise_fn": "builtin:arith"}])))
    with pytest.raises(RecipeError, match="revise_fn: cannot import module 'no_such_module'"):
        validate_recipe(write_recipe(_raw([{**sft_gen, "revise_fn": "no_such_module:fix"}])))
    with pytest.raises(RecipeError, match="stage 'pairs' writes prompt_completion data"):
        validate_recipe(write_recipe(_raw([{**GEN_FN, "output": "sft"}, DPO])))


def test_reading_a_stage_that_has_not_finished_says_so(tmp_path):
    recipe = parse_recipe(_raw([GEN_FN, DPO], tmp_path / "run"))
    with pytest.raises(DataError, match="stage 'pairs' has not finished in .*run it first|Run it first"):
        build_datasets(recipe.stages[1].dataset, recipe, "dpo", chat=True)


# ------------------------------------------------------------------------------------------ end to end


def chain_raw(out, prompts=8):
    """generate -> dpo -> generate -> dpo: iterative on-policy DPO. Small: the CPU is shared."""
    gen = {
        "reward_fn": LENGTH_REWARD,
        "rollout": {"num_samples": 4, "max_new_tokens": 4, "batch_size": 3, "temperature": 2.0},
    }
    train = {"per_device_batch_size": 4, "learning_rate": 1e-3, "max_length": 48, "logging_steps": 1}
    data = {"path": "builtin:arith", "split": "sft", "size": prompts}
    stages = [
        {"name": "pairs", "type": "generate", "dataset": data, **gen},
        {"name": "dpo", "type": "dpo", "dataset": {"path": "stage:pairs"}, "train": train},
        {"name": "pairs2", "type": "generate", "dataset": {**data, "seed": 1}, **gen},
        {"name": "dpo2", "type": "dpo", "dataset": {"path": "stage:pairs2"}, "train": {**train, "max_steps": 1}},
    ]
    return make_recipe(stages, out, name="generate-chain", peft=lora(dropout=0.0))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from alignlab.cli import main

    tmp = tmp_path_factory.mktemp("generate")
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(chain_raw(tmp / "run")))
    assert main(["run", str(path)]) == 0
    return path, tmp / "run"


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generated_pairs_are_the_scored_samples(chain):
    _, run = chain
    samples, rows = _jsonl(run / "pairs" / "samples.jsonl"), _jsonl(run / "pairs" / "data" / "train.jsonl")
    assert [s["index"] for s in samples] == list(range(8)) and all(len(s["texts"]) == 4 for s in samples)
    # Each sample's score is the reward function's on its text.
    reward = load_reward_fn(LENGTH_REWARD)
    for s in samples:
        assert s["scores"] == reward([s["prompt"]] * 4, s["texts"])
    # One pair per prompt whose scores differ: chosen the first best, rejected the first worst.
    expected = []
    for s in samples:
        sc = s["scores"]
        if max(sc) > min(sc):
            best, worst = sc.index(max(sc)), sc.index(min(sc))
            expected.append((s["prompt"], s["texts"][best], s["texts"][worst], max(sc) - min(sc)))
    got = [
        (r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"], r["score_margin"])
        for r in rows
    ]
    assert got == expected and len(rows) >= 2
    summary = json.loads((run / "pairs" / "generation.json").read_text())
    assert summary["rows"] == len(rows) and summary["ties"] == 8 - len(rows)


def test_dpo_trains_on_the_generated_pairs(chain):
    _, run = chain
    data = run / "pairs" / "data" / "train.jsonl"
    n = len(_jsonl(data))
    steps = [r["step"] for r in _jsonl(run / "dpo" / "metrics.jsonl") if "loss" in r]
    assert max(steps) == math.ceil(n / 4)  # one epoch over the n pairs, 4 per step
    parts = json.loads((run / "dpo" / "started.json").read_text())["parts"]
    assert parts["dataset.content"] == "sha256:" + _digest(data)  # exactly the file the generate stage wrote
    assert parts["dataset.from_stage"]["stage"] == "pairs" and parts["input"] is None  # dpo starts from the base


def _digest(path):
    h = hashlib.sha256()
    h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
    h.update(path.read_bytes())
    return h.hexdigest()


def test_iterative_dpo_samples_from_the_first_dpo_model(chain):
    """The second generate stage's input (`input: previous`) is the first dpo model, not the generate stage before
    it; the second dpo stage starts from (and so is referenced to) that same model."""
    _, run = chain
    pairs2 = json.loads((run / "pairs2" / "started.json").read_text())["parts"]
    dpo2 = json.loads((run / "dpo2" / "started.json").read_text())["parts"]
    dpo = json.loads((run / "dpo" / "stage_output.json").read_text())
    assert pairs2["input"]["stage"] == "dpo" and pairs2["input"]["attempt"] == dpo["origin"]["attempt"]
    assert dpo2["input"]["stage"] == "dpo" and dpo2["dataset.from_stage"]["stage"] == "pairs2"
    out = json.loads((run / "pairs2" / "stage_output.json").read_text())
    assert out["kind"] == "none" and out["metrics"]["prompts"] == 8


def test_sampling_from_an_adapter_folds_it_in_and_samples_the_same(chain):
    """The second generate stage samples from the first dpo model, an adapter, folded into its base for speed
    (merged_for_sampling): what it wrote is what the adapter model itself samples with the same random streams."""
    import torch
    from peft import PeftModel

    from alignlab.contract import checkpoint_output
    from alignlab.generation import generate
    from alignlab.models import load_frozen_model, load_tokenizer, merged_for_sampling, output_tokenizer_dir

    path, run = chain
    recipe = parse_recipe(yaml.safe_load(path.read_text()))
    dpo = checkpoint_output(run / "dpo")
    assert dpo.kind == "adapter"
    adapter = load_frozen_model(recipe, dpo)
    merged = merged_for_sampling(load_frozen_model(recipe, dpo))
    assert isinstance(adapter, PeftModel) and not isinstance(merged, PeftModel)
    tok = load_tokenizer(recipe, output_tokenizer_dir(recipe, dpo))
    ids = torch.tensor([tok("12+7=")["input_ids"]])
    torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapter(ids).logits, load_frozen_model(recipe, None)(ids).logits)  # dpo moved it

    spec, samples = recipe.stages[2], _jsonl(run / "pairs2" / "samples.jsonl")
    prompts = [[{"role": "user", "content": s["prompt"]}] for s in samples for _ in range(spec.rollout.num_samples)]
    seeds = [
        sample_seed(recipe.seed, spec.name, s["index"], j) for s in samples for j in range(spec.rollout.num_samples)
    ]
    out = generate(adapter, tok, prompts, max_new_tokens=spec.rollout.max_new_tokens, temperature=spec.rollout.temperature,
                   row_seeds=seeds)  # fmt: skip
    assert out.texts == [t for s in samples for t in s["texts"]]


def test_regenerated_data_makes_the_reading_stage_stale(chain, capsys):
    """A rerun reuses every stage; regenerating the pairs (same settings, a new attempt) makes the dpo stage that
    read them stale, and the message says which data changed."""
    from alignlab.cli import main

    path, run = chain

    def attempts():
        return {
            n: json.loads((run / n / "stage_output.json").read_text())["origin"]["attempt"] for n in ("pairs", "dpo")
        }

    before = attempts()
    assert main(["run", str(path)]) == 0 and attempts() == before  # nothing changed: reused, not rerun
    assert main(["run", str(path), "--stage", "pairs", "--force"]) == 0
    assert attempts()["pairs"] != before["pairs"]
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stage 'dpo'" in err and "dataset.from_stage: stage 'pairs' (trained " in err


REVISERS = '''
def revise(prompts, completions):
    """Revise every other sample (by its text's length parity): "FIXED " + text; None keeps it."""
    return ["FIXED " + c if len(c) % 2 == 0 else None for c in completions]


def reward(prompts, completions, **kwargs):
    return [1.0 if c.startswith("FIXED ") else 0.0 for c in completions]
'''


def test_revise_fn_rewrites_samples_before_scoring(tmp_path, monkeypatch):
    """A generate stage with revise_fn (a user's module:function) scores the revised texts, trains on the best
    revision, and keeps each sample's text and score from before the revision in samples.jsonl."""
    from alignlab.cli import main

    (tmp_path / "my_revisers.py").write_text(REVISERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    gen = {"name": "best", "type": "generate", "dataset": {"path": "builtin:arith", "split": "sft", "size": 6},
           "reward_fn": "my_revisers:reward", "revise_fn": "my_revisers:revise", "output": "sft", "min_score": 1.0,
           "rollout": {"num_samples": 4, "max_new_tokens": 4, "batch_size": 3}}  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_raw([gen], tmp_path / "run")))
    assert main(["run", str(path)]) == 0
    stage = tmp_path / "run" / "best"
    samples, rows = _jsonl(stage / "samples.jsonl"), _jsonl(stage / "data" / "train.jsonl")
    revised = 0
    for s in samples:
        for raw, text, raw_score, score in zip(s["raw_texts"], s["texts"], s["raw_scores"], s["scores"]):
            assert raw_score == 0.0  # the model never writes "FIXED "
            assert text == ("FIXED " + raw if len(raw) % 2 == 0 else raw) and score == float(text != raw)
            revised += text != raw
    summary = json.loads((stage / "generation.json").read_text())
    assert summary["revised_rate"] == revised / 24 and summary["mean_score_before_revision"] == 0.0
    # A row per prompt with a revised sample: the first revised one (all scored 0 before revision).
    expected = [
        next(t for t in s["texts"] if t.startswith("FIXED "))
        for s in samples
        if any(t.startswith("FIXED ") for t in s["texts"])
    ]
    assert [r["completion"][0]["content"] for r in rows] == expected and 0 < len(rows) <= 6
    # The reviser's source is part of what the stage was made from: editing it makes the stage stale.
    from alignlab.fingerprint import stage_parts
    from alignlab.recipe import load_recipe

    recipe = load_recipe(path)
    assert stage_parts(recipe, recipe.stages[0], {})["revise_fn.source"].startswith("sha256:")


def test_slow_half_precision_is_named_with_its_key_and_fix(monkeypatch):
    """bf16/fp16 sampling on a CPU without native kernels for it is a warning that names the key and the fix; on a
    CPU with them, on a GPU, in float32, and where torch cannot tell, nothing."""
    from alignlab import generation

    for native, expected in ((False, True), (True, False), (None, False)):
        monkeypatch.setattr(generation, "native_half_precision", lambda dtype, native=native: native)
        note = generation.slow_half_precision_note("bfloat16", "stages.pairs.dtype", "cpu")
        assert (note is not None) == expected, native
    monkeypatch.setattr(generation, "native_half_precision", lambda dtype: False)
    note = generation.slow_half_precision_note("float16", "stages.grpo.rollout.dtype", "cpu")
    assert note.startswith("stages.grpo.rollout.dtype: float16 on this CPU (") and "slower than float32" in note
    assert "Remove stages.grpo.rollout.dtype for speed" in note
    assert generation.slow_half_precision_note("bfloat16", "k", "cuda:0") is None
    assert generation.slow_half_precision_note("float32", "k", "cpu") is None


def test_dtype_samples_from_the_model_in_that_precision(tmp_path, monkeypatch):
    """`rollout.dtype: bfloat16`: the stage samples from the model cast to bf16 (exactly what that model samples with the
    same random streams), and most samples match the float32 model's, since only the precision differs. On a CPU
    without native bf16 kernels the run log says it is slow, naming the key."""
    import torch

    from alignlab import generation
    from alignlab.cli import main
    from alignlab.generation import generate
    from alignlab.models import load_frozen_model, load_tokenizer, resolve_base

    monkeypatch.setattr(generation, "native_half_precision", lambda dtype: False)  # a CPU without native bf16

    gen = {
        **GEN,
        "reward_fn": LENGTH_REWARD,
        "rollout": {"num_samples": 4, "max_new_tokens": 6, "batch_size": 4, "dtype": "bfloat16"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_raw([gen], tmp_path / "run")))
    assert main(["run", str(path)]) == 0
    samples = _jsonl(tmp_path / "run" / "pairs" / "samples.jsonl")
    recipe = parse_recipe(yaml.safe_load(path.read_text()))
    tok = load_tokenizer(recipe, resolve_base(recipe))
    prompts = [[{"role": "user", "content": s["prompt"]}] for s in samples for _ in range(4)]
    seeds = [sample_seed(0, "pairs", s["index"], j) for s in samples for j in range(4)]
    written = [t for s in samples for t in s["texts"]]
    texts = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = load_frozen_model(recipe, None).to(dtype)
        texts[dtype] = generate(model, tok, prompts, max_new_tokens=6, temperature=1.0, row_seeds=seeds).texts
    assert written == texts[torch.bfloat16]
    assert sum(a == b for a, b in zip(written, texts[torch.float32])) >= len(written) // 2
    log = (tmp_path / "run" / "logs" / "run.0.log").read_text()
    assert "stages.pairs.rollout.dtype: bfloat16 on this CPU (" in log and "slower than float32" in log


def test_dtype_with_a_4bit_base_is_refused(write_recipe):
    from alignlab.validate import validate_recipe

    raw = {**_raw([{**GEN_FN, "rollout": {"dtype": "bfloat16"}}]), "peft": {"method": "qlora"}}
    with pytest.raises(RecipeError, match=r"stages\[0\] \(pairs\): rollout.dtype: bfloat16 casts the model .* qlora"):
        validate_recipe(write_recipe(raw))
