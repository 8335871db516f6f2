"""Evaluation: the `evaluate` metric modules on hand-computed values, the true reward through the evaluator, the
eval stage and `alignlab eval` on the builtin tiny model (policy == reference gives win rate 0.5 and KL 0), an
adapter policy sharing the reference's backbone, the eval.json keys, eval.md's table and the training-curve plots.
"""

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch

from alignlab.contract import StageOutput, checkpoint_output
from alignlab.evaluation.command import _out_dir, _run_dir_of
from alignlab.evaluation.evaluator import EVAL_KEYS, SAMPLE_KEYS, ModelPair, compute_metric, tokenize_completion
from alignlab.evaluation.report import write_results
from alignlab.logprobs import completion_logps
from alignlab.recipe import RecipeError, parse_recipe
from alignlab.rewards import load_reward_fn, reward_fn_scores
from tests.helpers import make_recipe, make_stage

ARITH = "alignlab.builtin.tasks:arith_reward"
N = 8  # prompts (and pairs, and SFT rows) in the end-to-end evaluations: small, the CPU is shared


def user(text):
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------------------ metric modules


def test_win_rate_counts_ties_as_half():
    # wins: 0.9 > 0.1 and 0.5 > 0.4; tie: 0.5 == 0.5; loss: 0.2 < 0.7  ->  (2 + 0.5 * 1) / 4 = 0.625
    out = compute_metric("win_rate", policy_scores=[0.9, 0.2, 0.5, 0.5], reference_scores=[0.1, 0.7, 0.5, 0.4])
    assert out == {"win_rate": 0.625, "wins": 2, "ties": 1, "losses": 1}
    assert compute_metric("win_rate", policy_scores=[0.3] * 3, reference_scores=[0.3] * 3)["win_rate"] == 0.5


def test_preference_accuracy_and_margin():
    # margins [1.0 - 0.0, -0.5 - 0.5, 0.2 - 0.2] = [1, -1, 0]: accuracy (1 + 0.5) / 3 = 0.5, margin 0 / 3 = 0
    out = compute_metric("preference_accuracy", chosen_rewards=[1.0, -0.5, 0.2], rejected_rewards=[0.0, 0.5, 0.2])
    assert out["accuracy"] == pytest.approx(0.5) and out["margin"] == pytest.approx(0.0)
    # margins [0.5, 2.0]: accuracy 1, margin 1.25
    out = compute_metric("preference_accuracy", chosen_rewards=[2.0, 1.0], rejected_rewards=[1.5, -1.0])
    assert out == {"accuracy": 1.0, "margin": 1.25}


def test_training_and_eval_accuracy_count_ties_alike():
    """One convention: a tie counts 1/2 in DPO's rewards/accuracies, the reward model's accuracy and the evaluation's
    preference_accuracy. Rewards [0.4, 0.2, -0.3] vs [0.1, 0.2, 0.3]: right, exact tie, wrong -> 0.5."""
    from alignlab.losses import bradley_terry_loss, preference_loss

    chosen, rejected = [0.4, 0.2, -0.3], [0.1, 0.2, 0.3]
    evaluated = compute_metric("preference_accuracy", chosen_rewards=chosen, rejected_rewards=rejected)["accuracy"]
    _, bt = bradley_terry_loss(torch.tensor(chosen), torch.tensor(rejected))
    zeros = torch.zeros(3, dtype=torch.float64)  # beta = 1, references 0: the DPO rewards ARE these numbers
    c, r = torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)
    _, dpo = preference_loss("dpo", c, r, zeros, zeros, beta=1.0)
    assert evaluated == bt["accuracy"].item() == dpo["rewards/accuracies"].item() == 0.5


def test_mean_reward_and_stderr():
    # mean (1.0 + 0.4 + 0.1) / 3 = 0.5; sample variance (0.5^2 + 0.1^2 + 0.4^2) / 2 = 0.21; stderr sqrt(0.21 / 3)
    out = compute_metric("mean_reward", rewards=[1.0, 0.4, 0.1])
    assert out["mean_reward"] == pytest.approx(0.5)
    assert out["stderr"] == pytest.approx(math.sqrt(0.07))


def test_kl_divergence_is_mean_log_ratio():
    # log-ratios [-1 - (-2), -3 - (-2.5), -2 - (-2)] = [1, -0.5, 0]: mean 0.5 / 3
    out = compute_metric("kl_divergence", policy_logps=[-1.0, -3.0, -2.0], reference_logps=[-2.0, -2.5, -2.0])
    assert out["kl"] == pytest.approx(1 / 6)


def test_perplexity_weighs_tokens():
    # total NLL 3 + 1 = 4 over 2 + 2 tokens: mean 1 nat/token, perplexity e (not the mean of e^1.5 and e^0.5)
    out = compute_metric("perplexity", nll=[3.0, 1.0], num_tokens=[2, 2])
    assert out["mean_nll"] == pytest.approx(1.0) and out["perplexity"] == pytest.approx(math.e)


# ------------------------------------------------------------------------------------------ true reward


def test_true_reward_on_known_good_and_bad_completions():
    rows = [{"prompt": user("What is 47+8?"), "answer": "55"}] * 4
    completions = ["55", "54", "55 apples", "no idea"]  # right, off by one, trailing text, no number
    rewards = reward_fn_scores(load_reward_fn(ARITH), [r["prompt"] for r in rows], completions)
    assert rewards == [1.0, 0.4, 0.5, 0.0]
    assert compute_metric("mean_reward", rewards=rewards)["mean_reward"] == pytest.approx(0.475)


def test_true_reward_on_the_eval_split():
    from alignlab.data import build_datasets

    spec = _recipe(Path("/tmp/unused")).stages[0]
    rows = list(build_datasets(spec.dataset, None, "eval", chat=True, with_eval=False)[0])
    fn = load_reward_fn(ARITH)
    assert reward_fn_scores(fn, [r["prompt"] for r in rows], [r["answer"] for r in rows]) == [1.0] * len(rows)
    assert reward_fn_scores(fn, [r["prompt"] for r in rows], [str(int(r["answer"]) + 2) for r in rows]) == [0.3] * len(
        rows
    )


# ------------------------------------------------------------------------------------------ end to end


def _recipe(out: Path, **eval_keys):
    """An eval stage on the base model (tests.helpers.make_stage: each key where the schema keeps it)."""
    keys = dict(
        max_new_tokens=6,
        input="base",
        dataset={"path": "builtin:arith", "split": "eval", "size": N},
        preference_dataset={"path": "builtin:arith", "split": "preference_eval", "size": N},
        sft_dataset={"path": "builtin:arith", "split": "sft_eval", "size": N},
        reward_fn=ARITH,
        num_prompts=N,
        num_samples_shown=3,
    )
    return parse_recipe(make_recipe([make_stage("eval", **{**keys, **eval_keys})], out, name="evaltest"))


@pytest.fixture(scope="module")
def base_vs_base(tmp_path_factory):
    """The eval stage, through the pipeline, on the base model against itself."""
    from alignlab.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("run")
    outputs = run_pipeline(_recipe(run_dir))
    return outputs["eval"], run_dir / "eval"


def test_policy_equal_to_reference_ties_everywhere(base_vs_base):
    out, stage_dir = base_vs_base
    res = json.loads((stage_dir / "eval.json").read_text())
    assert res["num_prompts"] == N
    assert res["win_rate"] == 0.5 and res["win_rate_by"] == "reward_fn"  # greedy: same completions, all ties
    assert abs(res["kl"]) < 1e-4
    assert res["preference_accuracy"] == 0.5 and abs(res["preference_margin"]) < 1e-6
    assert res["true_reward"] == res["true_reward_reference"]
    assert math.isfinite(res["perplexity"]) and res["perplexity"] > 1
    assert res["perplexity"] == pytest.approx(res["perplexity_reference"])
    assert all(s["policy"] == s["reference"] for s in res["samples"])
    # The stage's output record carries the numeric metrics (what `alignlab run` prints at the end).
    assert out.kind == "none" and out.path == "" and out.metrics["win_rate"] == 0.5
    assert StageOutput.load(stage_dir).metrics["kl"] == out.metrics["kl"]


def test_eval_json_has_the_documented_keys(base_vs_base):
    _, stage_dir = base_vs_base
    res = json.loads((stage_dir / "eval.json").read_text())
    assert set(res) == set(EVAL_KEYS)
    assert res["mean_score"] is None and res["reward_model_accuracy"] is None  # no reward model given
    assert len(res["samples"]) == 3 and all(set(s) == set(SAMPLE_KEYS) for s in res["samples"])
    assert res["samples"][0]["prompt"].startswith("What is ")
    settings = {"temperature": 0.0, "max_new_tokens": 6, "beta": 0.1, "seed": 0, "kl_temperature": 1.0}
    assert {k: res["settings"][k] for k in settings} == settings
    # Every measured number carries its stderr and 95% interval; with policy == reference every paired difference
    # is exactly 0 with a zero-width interval.
    assert res["true_reward_diff"] == 0 and res["true_reward_diff_ci"] == [0, 0]
    # The reward's stderr and interval, by hand from the per-prompt rewards: s / sqrt(n) (s with n - 1) and mean +- 1.96
    # stderr (a reward has no fixed range, so no clipping). Not "stderr > 0": which answers the tiny base gives depends
    # on the CPU that built it; on some every reward is 0, whose stderr is exactly 0.
    rewards = res["per_prompt"]["true_reward"]
    m = sum(rewards) / N
    se = math.sqrt(sum((r - m) ** 2 for r in rewards) / (N - 1) / N)
    assert res["true_reward"] == pytest.approx(m) and res["true_reward_stderr"] == pytest.approx(se, abs=1e-12)
    assert res["true_reward_ci"] == pytest.approx([m - 1.959964 * se, m + 1.959964 * se], abs=1e-6)
    assert res["kl"] == 0 and res["kl_exact"] == 0 and res["kl_ci"] == [0, 0]
    assert len(res["per_prompt"]["true_reward"]) == N and res["per_prompt"]["win"] == [0.5] * N


def test_eval_md_is_a_table(base_vs_base):
    _, stage_dir = base_vs_base
    md = (stage_dir / "eval.md").read_text()
    header = "| metric | policy | reference | policy - reference |"
    assert "| win rate vs reference (by reward fn) | 0.5 [0.5, 0.5] |  |  |" in md
    assert "### Samples" in md and md.count("| What is ") == 3
    lines = md.splitlines()
    table = lines[lines.index(header) :]
    table = table[: table.index("")]
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in table]  # unescaped pipes split
    # header, rule, 10 measured metrics: reward, win rate, KL twice, repetition, distinct-2, length, preference
    # accuracy and margin, perplexity
    assert len(table) == 2 + 10 and {len(c) for c in cells} == {4}
    assert cells[4] == ["KL(policy \\|\\| reference), nats (k1, samples at T=1)", "0 [0, 0]", "", ""]
    reward = cells[2]
    assert reward[0] == "true reward (mean)" and reward[1] == reward[2] and reward[3] == "0 [0, 0]"
    assert re.fullmatch(r"[0-9.]+ \[-?[0-9.]+, [0-9.]+\]", reward[1]), reward  # normal: may cross 0


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.builtin import builtin_model_path

    path = builtin_model_path("tiny-llama")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), path


@pytest.fixture(scope="module")
def adapter_dir(tiny, tmp_path_factory):
    """A LoRA adapter with random (non-zero) A and B: a policy that differs from the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny[2])
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    path = tmp_path_factory.mktemp("ckpt") / "adapter"
    peft.save_pretrained(path)
    return path


def test_tokenization_matches_trl(tiny):
    _, tok, _ = tiny
    ids, n = tokenize_completion(tok, user("What is 47+8?"), "55")
    prompt = tok.apply_chat_template(user("What is 47+8?"), tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids[:n]) == prompt
    assert tok.decode(ids[n:]) == "55<|im_end|>\n"  # the rest of the templated conversation, as TRL scores it


def test_completion_logps_do_not_depend_on_padding(tiny):
    model, tok, _ = tiny
    a = tokenize_completion(tok, user("What is 47+8?"), "55")
    b = tokenize_completion(tok, user("What is 3+4? Answer in a long sentence"), "7 is the answer, surely")
    together, counts = completion_logps(model, [a, b], tok.pad_token_id)
    alone = torch.cat([completion_logps(model, [x], tok.pad_token_id)[0] for x in (a, b)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-5)
    assert counts.tolist() == [len(a[0]) - a[1], len(b[0]) - b[1]]


def test_completion_logps_bound_the_logits_they_hold(tiny):
    """Scoring holds at most MAX_LOGITS logits per forward (rows x scored positions x vocabulary) and computes only
    the positions from the first completion token on, with the same log-probs as one unbounded forward. Here the
    bound is set to 2 rows' worth of the 4 examples' 1 + longest-completion positions: 2 forwards of 2 rows."""
    model, tok, _ = tiny
    examples = [
        tokenize_completion(tok, user(q), a)
        for q, a in [("What is 47+8?", "55"), ("What is 3+4?", "7, surely"), ("Hi", "Hello there"), ("2+2?", "4")]
    ]
    full, counts = completion_logps(model, examples, tok.pad_token_id)  # the default bound: one forward
    width = max(len(ids) for ids, _ in examples)
    start = min(n for _, n in examples)
    vocab = model.get_output_embeddings().weight.shape[0]
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    try:
        chunked, _ = completion_logps(model, examples, tok.pad_token_id, max_logits=2 * (width - start + 1) * vocab)
    finally:
        hook.remove()
    assert shapes == [(2, width - start + 1, vocab)] * 2
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-6)
    assert counts.tolist() == [len(ids) - n for ids, n in examples]


def test_adapter_policy_shares_the_reference_backbone(tiny, adapter_dir, tmp_path):
    model, tok, _ = tiny
    recipe = _recipe(tmp_path)
    policy = checkpoint_output(adapter_dir)
    assert policy.kind == "adapter" and policy.base == str(tiny[2])
    pair = ModelPair(recipe, policy, None)
    assert pair.adapter_off and pair.reference is pair.policy  # one backbone, no second copy
    ids = torch.tensor([tokenize_completion(tok, user("What is 47+8?"), "55")[0]])
    with pair.ref() as ref:
        ref_logits = ref(input_ids=ids).logits
    torch.testing.assert_close(ref_logits, model(input_ids=ids).logits)  # adapter off = the base model
    assert (pair.policy(input_ids=ids).logits - ref_logits).abs().max() > 1e-3  # adapter on = the policy


@pytest.fixture(scope="module")
def reward_model_dir(tiny, tmp_path_factory):
    """A sequence-classification model with a random score head: a reward model that is not constant."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny[2], num_labels=1)
    path = tmp_path_factory.mktemp("rm") / "rm"
    rm.save_pretrained(path)
    tiny[1].save_pretrained(path)
    return path


def test_cli_evaluates_several_checkpoints(tmp_path, adapter_dir, reward_model_dir, tiny, capsys):
    """`alignlab eval base ADAPTER` with sampling and a reward model: base vs itself samples the same completions
    (same seed), so win rate 0.5, KL 0 and equal scores; the adapter differs from the base, so its log-ratio does
    not vanish. The reward model's pair accuracy equals scoring each conversation alone (no padding)."""
    import yaml

    from alignlab.cli import main
    from alignlab.data import build_datasets

    recipe = tmp_path / "recipe.yaml"
    raw = _recipe(tmp_path / "run").model_dump(mode="json", serialize_as_any=True)  # stage keys too
    recipe.write_text(yaml.safe_dump(raw))
    argv = ["eval", "base", str(adapter_dir), "--recipe", str(recipe), "--out", str(tmp_path / "out")]
    sets = ["rollout.temperature=1.0", "sft_dataset=", f"reward_model={reward_model_dir}"]
    assert main([*argv, *(x for kv in sets for x in ("--set", kv))]) == 0
    assert "| metric | policy | reference |" in capsys.readouterr().out
    base = json.loads((tmp_path / "out" / "base" / "eval.json").read_text())
    assert base["win_rate"] == 0.5 and base["kl"] == 0.0 and base["settings"]["temperature"] == 1.0
    assert base["win_rate_by"] == "reward_model" and base["mean_score"] == base["mean_score_reference"]
    assert base["true_reward"] == base["true_reward_reference"] and base["perplexity"] is None  # not asked for
    adapted = json.loads((tmp_path / "out" / "adapter" / "eval.json").read_text())
    assert adapted["policy"].startswith("adapter (adapter:") and adapted["reference"].startswith("base")
    assert math.isfinite(adapted["kl"]) and abs(adapted["kl"]) > 1e-3
    assert adapted["kl_exact"] > 0  # a sum of per-token KLs: positive when the models differ
    # The two checkpoints on the same prompts: their paired difference (adapter - base) per prompt.
    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert comparison["baseline"] == "base" and list(comparison["against"]) == ["adapter"]
    diff = comparison["against"]["adapter"]["true_reward"]
    assert diff["value"] == pytest.approx(adapted["true_reward"] - base["true_reward"]) and diff["n"] == N
    per_prompt = [a - b for a, b in zip(adapted["per_prompt"]["true_reward"], base["per_prompt"]["true_reward"])]
    assert diff["stderr"] == pytest.approx(statistics.stdev(per_prompt) / math.sqrt(N))
    assert (tmp_path / "out" / "comparison.md").read_text().startswith("## Paired comparison with base")

    # Reward-model accuracy, by hand: each conversation scored alone.
    from transformers import AutoModelForSequenceClassification

    rm, tok = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval(), tiny[1]
    spec = _recipe(tmp_path).stages[0].preference_dataset

    def score(prompt, completion):
        return rm(**tok(tok.apply_chat_template(prompt + completion, tokenize=False), return_tensors="pt")).logits[0, 0]

    with torch.no_grad():
        margins = [
            score(r["prompt"], r["chosen"]) - score(r["prompt"], r["rejected"])
            for r in build_datasets(spec, None, "dpo", True, with_eval=False)[0]
        ]
    assert base["reward_model_accuracy"] == pytest.approx(sum(float(m > 0) for m in margins) / N)
    assert base["reward_model_margin"] == pytest.approx(sum(margins).item() / N, abs=1e-5)


def test_checkpoint_forms(tmp_path, tiny, adapter_dir):
    assert checkpoint_output("base") is None
    assert checkpoint_output(tiny[2]).kind == "full"
    assert checkpoint_output("builtin:tiny-llama").path == str(tiny[2])
    stage = StageOutput("dpo", "dpo", str(adapter_dir), "adapter", str(tiny[2]))
    stage.save(tmp_path / "run" / "dpo")
    (tmp_path / "run" / "recipe.yaml").write_text("stages:\n  - {name: sft}\n  - {name: dpo}\n  - {name: eval}\n")
    assert checkpoint_output(tmp_path / "run" / "dpo") == stage
    assert checkpoint_output(tmp_path / "run") == stage  # a run: its last finished stage with a model
    with pytest.raises(RecipeError, match="not a run directory"):
        checkpoint_output(tmp_path)
    # Where `alignlab eval` writes without --out: never into the run's own eval stage folder.
    run = tmp_path / "run"
    assert _out_dir(str(run), stage, None, many=False) == run / "dpo" / "eval"
    assert _out_dir(str(run / "dpo"), stage, None, many=False) == run / "dpo" / "eval"
    assert _out_dir(str(adapter_dir), stage, None, many=False) == adapter_dir.with_name("adapter-eval")
    assert _out_dir("base", None, None, many=False) == Path("eval-base")
    assert _out_dir(str(adapter_dir), stage, "out", many=True) == Path("out/adapter")


# ------------------------------------------------------------------------------------------ plots


def test_plots_from_metrics_jsonl(tmp_path):
    lines = [
        {
            "step": 1,
            "epoch": 0.1,
            "loss": 2.0,
            "rewards/accuracies": 0.5,
            "rewards/margins": 0.0,
            "learning_rate": 1e-4,
        },
        {"step": 2, "epoch": 0.2, "loss": 1.5, "rewards/accuracies": 0.7, "rewards/margins": 0.3},
        {"step": 2, "epoch": 0.2, "eval_loss": 1.6},
        {"step": 2, "epoch": 0.2, "train_loss": 1.7, "train_runtime": 3.0},  # the trainer's end-of-training average
        {"step": 2, "final": True, "train_loss": 1.7},
    ]
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{cut off")
    ppo = [{"step": s, "score": 0.1 * s, "kl": 0.01 * s, "kl_coef": 0.05, "policy_loss": 0.5} for s in (1, 2, 3)]
    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in ppo))

    from alignlab.plots import PANELS, read_curves

    curves = read_curves(tmp_path / "dpo" / "metrics.jsonl")
    assert curves["loss"] == [(1, 2.0), (2, 1.5)] and curves["eval_loss"] == [(2, 1.6)]
    assert "train_loss" not in curves and "train_runtime" not in curves  # summaries are not curves
    assert [k for k in read_curves(tmp_path / "ppo" / "metrics.jsonl") if PANELS["kl"](k)] == ["kl"]

    res = json.loads(json.dumps(dict.fromkeys(EVAL_KEYS)))
    res.update(policy="p", reference="r", num_prompts=0, kl=0.0, samples=[], settings=_settings())
    files = {"dpo": tmp_path / "dpo" / "metrics.jsonl", "ppo": tmp_path / "ppo" / "metrics.jsonl"}
    written = write_results(res, tmp_path / "eval", files)
    pngs = sorted(p.name for p in written if p.suffix == ".png")
    assert pngs == ["accuracy.png", "kl.png", "loss.png", "margin.png", "reward.png"]
    for p in written:
        assert p.stat().st_size > 1000 if p.suffix == ".png" else p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _settings():
    return {"temperature": 0.0, "max_new_tokens": 6, "beta": 0.1, "seed": 0}


@pytest.mark.slow
def test_implicit_reward_matches_trl_on_the_dpo_stage_eval_split(tmp_path):
    """Two DPO steps, then eval against the DPO reference (the base model) on the very pairs DPO held out
    (builtin held-out rows use seed + 1; one eval batch, so TRL's batch mean is the mean over pairs): the
    evaluator's implicit-reward margin and accuracy equal TRL's eval_rewards/margins and eval_rewards/accuracies."""
    from alignlab.pipeline import run_pipeline

    dpo = {
        "name": "dpo",
        "type": "dpo",
        "dataset": {"path": "builtin:arith", "split": "preference", "size": 16, "eval_size": 16},
        "train": {"max_steps": 2, "per_device_batch_size": 8, "eval_batch_size": 16, "learning_rate": 1e-2},
    }
    recipe = _recipe(tmp_path, input="previous", sft_dataset=None, max_new_tokens=2)
    pref = {"path": "builtin:arith", "split": "preference_eval", "size": 16, "seed": 1}
    raw = recipe.model_dump(mode="json", serialize_as_any=True)
    raw["stages"][0]["preference_dataset"] = pref
    raw["stages"].insert(0, dpo)
    outputs = run_pipeline(parse_recipe(raw))
    trl_margin = outputs["dpo"].metrics["eval_rewards/margins"]
    res = outputs["eval"].metrics
    assert abs(trl_margin) > 1e-3  # the policy moved away from its reference
    assert res["preference_margin"] == pytest.approx(trl_margin, rel=1e-3, abs=1e-5)
    assert res["preference_accuracy"] == pytest.approx(outputs["dpo"].metrics["eval_rewards/accuracies"])
    assert res["kl"] != 0.0
    # eval.json keeps every pair's margin, in row order: the accuracy and margin are their mean outcome and mean.
    margins = json.loads((recipe.run_dir / "eval" / "eval.json").read_text())["per_pair"]["preference_margin"]
    assert len(margins) == 16
    assert res["preference_margin"] == pytest.approx(sum(margins) / 16)
    assert res["preference_accuracy"] == pytest.approx(
        sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / 16
    )


def test_a_stage_folder_is_not_taken_for_its_run(tmp_path):
    """A stage folder holds a recipe.yaml too (its latest attempt's): `alignlab eval RUN/ppo --reference sft` must
    look for `sft` in RUN, not in RUN/ppo (it then took `sft` for a hub id)."""
    run = tmp_path / "run"
    (run / "ppo" / "model").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: x\n")
    (run / "ppo" / "recipe.yaml").write_text("name: x\n")
    (run / "ppo" / "started.json").write_text("{}")
    assert _run_dir_of(run / "ppo") == run
    assert _run_dir_of(run / "ppo" / "model") == run
    assert _run_dir_of(run) == run
    assert _run_dir_of(tmp_path) is None


def test_constraint_task_report_with_intervals(tmp_path):
    """With `reward_fn: builtin:constraints` eval.json adds strict and instruction accuracy with intervals, their
    paired difference and the accuracy per kind, computed by constraint_report on the same completions."""
    from alignlab.builtin.constraints import constraint_report
    from alignlab.evaluation.evaluator import evaluate_models
    from alignlab.evaluation.stats import wilson_interval

    recipe = _recipe(
        tmp_path,
        dataset={"path": "builtin:constraints", "split": "eval", "size": 16},
        reward_fn="builtin:constraints",
        preference_dataset=None,
        sft_dataset=None,
        nll_dataset={"path": "builtin:prose", "split": "text", "size": 2},
        num_prompts=16,
        num_samples_shown=16,
    )
    res = evaluate_models(recipe, recipe.stages[0], None, None)
    prompts = [s["prompt"] for s in res["samples"]]
    report = constraint_report(prompts, [s["policy"] for s in res["samples"]])
    k = round(report["strict_accuracy"] * 16)
    assert res["strict_accuracy"] == report["strict_accuracy"] and res["strict_accuracy_ci"] == list(
        wilson_interval(k, 16)
    )
    assert res["instruction_accuracy"] == pytest.approx(report["instruction_accuracy"])
    assert res["strict_accuracy_diff"] == 0 and res["strict_accuracy_reference"] == res["strict_accuracy"]
    assert set(res["per_kind"]) == set(report["per_kind"]) and len(res["per_kind"]) == 16  # one prompt per kind
    for kind, entry in res["per_kind"].items():
        assert entry["n"] == report["per_kind"][kind]["n"] and entry["policy"] == report["per_kind"][kind]["accuracy"]
        assert entry["policy_ci"] == list(wilson_interval(round(entry["policy"] * entry["n"]), entry["n"]))
    # The held-out text: every token scored, the same model on both sides.
    assert res["nll"] == res["nll_reference"] > 0 and res["nll_change"] == 0 and res["nll_tokens"] > 100
    md = (write_results(res, tmp_path / "out")[1]).read_text()
    assert "### Per constraint kind" in md and "| strict accuracy (all constraints met) |" in md


def test_eval_without_an_eval_stage_defaults_to_the_tasks_held_out_prompts():
    """`alignlab eval RUN_DIR` on a run whose recipe has no eval stage used to stop with "missing required key
    'stages[2].dataset'". A run that trains on a built-in task is evaluated on that task's held-out prompts with its
    exact reward; any other run gets a message naming the --set to give."""
    from alignlab.evaluation.command import default_eval_stage, run_cli

    arith = {"stages": [{"type": "sft", "dataset": {"path": "builtin:arith", "split": "sft"}}, {"type": "dpo"}]}
    assert default_eval_stage(arith) == {
        "name": "eval",
        "type": "eval",
        "dataset": {"path": "builtin:arith", "split": "eval"},
        "reward_fn": "builtin:arith",
    }
    assert "dataset" not in default_eval_stage({"stages": [{"type": "sft", "dataset": {"path": "data.jsonl"}}]})
    with pytest.raises(RecipeError, match=r"no eval stage .* --set dataset.path=PROMPTS.jsonl"):
        run_cli(["Qwen/some-model"])
