"""GRPO stage end to end on the built-in tiny model (one torch thread: these steps are too small for two); the runs
are in the slow tier, the grouped forward and the repetition measure in the default tier (SmolLM2's in the real one).

- learning: full-weight GRPO from the base on builtin:arith with its exact reward raises the held-out true reward
  (greedy, 48 eval prompts) well above the base's; on the first step the ratio is 1 (the sampling pass's log-probs
  are the training forward's) and the KL to the reference (a frozen copy of the input weights) is 0;
- beta > 0 adds exactly beta x the k3 KL term to the loss, and nothing else (same samples, same first update);
- unlikelihood > 0 adds alpha x token-level unlikelihood on the samples, which lowers it on later samples;
- after a LoRA SFT stage the reference is the SFT adapter's frozen copy (KL 0 before the first update), not the
  raw base; the saved adapter holds no "ref";
- resume after a crash equals the uninterrupted run (metrics and weights);
- stop_if ends the stage with the last good checkpoint and says why, or with its input model when no checkpoint that
  passed is left;
- skip_zero_std_groups counts flat groups and drops them from the loss's denominator; a reward_fn list logs each
  component and sums them with their weights.
"""

import copy
import json
import math

import pytest
import torch

from tests.helpers import assert_reused, copy_run, make_recipe, make_stage, sft_lora_recipe
from tests.helpers import rows as _rows
from tests.helpers import run as _run
from tests.helpers import steps as _steps


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def even_first_reward(prompts, completions):
    """1.0 for every completion when the prompt's first operand is even (a flat group), else the completion's length
    in characters (a group with spread, unless its samples are all the same length)."""
    return [1.0 if int(p.split()[-1].split("+")[0]) % 2 == 0 else float(len(c)) for p, c in zip(prompts, completions)]


LENGTH = {"reward_fn": "tests.helpers:char_length_reward", "temperature": 2.0}  # spread in every group


def operand_reward(prompts, completions):
    """The prompt's first operand / 100: the same for a whole group, so it never makes a flat group spread."""
    return [int(p.split()[-1].split("+")[0]) / 100 for p in prompts]


def _grpo(**kw):
    """A grpo stage (tests.helpers.make_stage: each key where the schema keeps it) on 4 arith prompts per step."""
    keys = dict(
        dataset={"path": "builtin:arith", "split": "sft", "size": 64},
        reward_fn="builtin:arith",
        max_steps=2,
        batch_size=4,
        num_samples=4,
        max_new_tokens=4,
        learning_rate=1.0e-3,
        watch_steps=None,
    )
    return make_stage("grpo", **{**keys, **kw})


def _recipe(output_dir, stages, peft="lora"):
    return make_recipe(stages, output_dir, name="grpo-test", peft=peft)  # LoRA: r 8, alpha 16, dropout 0.05


def _heldout_reward(model_dir, n=48):
    """Mean arith reward of greedy completions of the first n held-out prompts by the full model in model_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.builtin.tasks import arith_reward, generate_task
    from alignlab.data import prompt_text
    from alignlab.generation import generate

    prompts = [r["prompt"] for r in generate_task("arith", "eval", n, seed=1)]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rollout = generate(model, AutoTokenizer.from_pretrained(model_dir), prompts, max_new_tokens=8, temperature=0.0)
    return sum(arith_reward([prompt_text(p) for p in prompts], rollout.texts)) / n


def test_grpo_watches_the_repetition_eval_reports():
    """The repetition GRPO logs (and stop_if.repetition reads) is eval's measure, words lowercased without
    punctuation: "The cat. the cat. the cat." repeats 2 of its 4 word 3-grams, as eval.json would say (split on
    spaces, case and full stops kept, it would be 1 of 4)."""
    from alignlab.evaluation import repetition
    from alignlab.rl import grpo

    assert grpo.repeated_ngram_share is repetition.repeated_ngram_share
    assert grpo.repeated_ngram_share("The cat. the cat. the cat.") == pytest.approx(0.5)
    assert grpo.repeated_ngram_share("a b c a b c") == pytest.approx(0.25)  # abc bca cab abc: 1 - 3/4
    assert grpo.repeated_ngram_share("go go go go go") == pytest.approx(2 / 3)  # 3 x (go go go): 1 - 1/3


@pytest.mark.parametrize(
    "model_name, lora, new_tokens, tol",
    [  # measured, tiny: logits and log-probs within 3e-6, gradients within 3e-6 relative
        ("tiny-llama", False, 6, 1e-5),
        ("tiny-llama", True, 6, 1e-5),
        # the real model: 30 layers, grouped-query attention, tied embeddings, pad = eos, a default system prompt.
        # Measured: logits within 1.1e-4 (of values ~10-30), log-probs within 1.9e-5, gradients within 7e-5 relative
        pytest.param("smollm2-135m-instruct", True, 8, 3e-4, marks=pytest.mark.real),
    ],
    ids=["full", "lora", "smollm2-lora"],
)
def test_grouped_forward_is_the_full_forward(model_name, lora, new_tokens, tol):
    """Each group's prompt computed once, its KV cache repeated for the group's responses: the same logits,
    log-probs and gradients as a forward over every prompt + response row, up to float summation order. Prompts of
    different lengths (left padding), responses of different lengths (right padding)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.builtin import builtin_model_path
    from alignlab.builtin.tasks import generate_task
    from alignlab.generation import generate
    from alignlab.logprobs import completion_logits, token_logprobs
    from alignlab.rl.grpo import GroupedPolicy

    size = 3
    model_path = builtin_model_path(model_name)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    if lora:
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    prompts = [r["prompt"] for r in generate_task("arith", "sft", 4, seed=3)]
    prompts[1] = [{"role": "user", "content": "What is 5+5? Answer with a number."}]  # a longer prompt
    ro = generate(model, tokenizer, [p for p in prompts for _ in range(size)], max_new_tokens=new_tokens,
                  temperature=1.0, row_seeds=list(range(4 * size)))  # fmt: skip
    for row in (1, 2 * size):  # two responses end after 2 tokens, as after an end token: right padding, however
        ro.completion_ids[row, 2:] = tokenizer.pad_token_id  # long the model's answers are
        ro.completion_mask[row, 2:] = 0
    mask = ro.completion_mask.float()
    assert ro.prompt_mask.sum(1).unique().numel() > 1 and mask.sum(1).unique().numel() > 1  # both paddings occur
    params = [p for p in model.parameters() if p.requires_grad]

    def run(logits_fn):
        logits = logits_fn()
        loss = (token_logprobs(logits, ro.completion_ids) * mask).sum()
        grads = torch.autograd.grad(loss, params)
        return logits.detach(), grads

    full, g_full = run(lambda: completion_logits(model, ro.input_ids, ro.attention_mask, mask.shape[1], 0.7))
    grouped, g_grouped = run(
        lambda: GroupedPolicy(model)(ro.prompt_ids[::size], ro.prompt_mask[::size], ro.completion_ids,
                                     ro.completion_mask, size, 0.7)
    )  # fmt: skip
    real = mask.bool()
    torch.testing.assert_close(grouped[real], full[real], rtol=tol, atol=tol)
    torch.testing.assert_close(  # what the loss and the ratio read
        token_logprobs(grouped, ro.completion_ids)[real],
        token_logprobs(full, ro.completion_ids)[real],
        rtol=0,
        atol=tol,
    )
    for a, b in zip(g_grouped, g_full):
        assert (a - b).norm() <= 10 * tol * b.norm(), float((a - b).norm() / b.norm())


@pytest.mark.slow
def test_grpo_raises_heldout_true_reward(tmp_path):
    stage = _grpo(
        dataset={"path": "builtin:arith", "split": "sft", "size": 512},
        max_steps=16,
        batch_size=8,
        num_samples=8,
        max_new_tokens=6,
        learning_rate=3.0e-4,
        watch_steps=8,
        watch_samples=2,
    )
    outputs = _run(_recipe(tmp_path / "run", [stage], peft="none"))
    stage_dir = tmp_path / "run" / "grpo"
    rows = _steps(stage_dir)
    assert [r["step"] for r in rows] == list(range(1, 17))

    # Before any update: the sampling pass's log-probs are the training forward's (ratio 1), and the policy IS the
    # reference (a frozen copy of the input weights): KL 0.
    assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-5) and rows[0]["approx_kl"] < 1e-10
    assert abs(rows[0]["kl"]) < 1e-6
    assert [r["step"] for r in rows if "kl" in r] == [1, 8, 16]  # the watch measures the KL with beta 0
    assert rows[-1]["kl"] > 0.01
    samples = [json.loads(line) for line in (stage_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 8, 8, 16, 16]
    assert all(s["prompt"].startswith("What is ") and isinstance(s["completion"], str) for s in samples)

    out = outputs["grpo"]
    before, after = _heldout_reward(out.base), _heldout_reward(out.path)
    train = [round(r["reward"], 3) for r in rows]
    print(f"held-out true reward: base {before:.3f} -> grpo {after:.3f}; train reward per step {train}")
    assert after > before + 0.04, (before, after)  # measured 0.008 -> 0.069
    assert sum(r["reward"] for r in rows[-4:]) / 4 > rows[0]["reward"] + 0.015  # measured 0.024 -> ~0.055
    assert out.kind == "full" and out.metrics["first_reward"] == rows[0]["reward"]


@pytest.mark.slow
def test_recomputed_old_logprobs_give_ratio_one(tmp_path):
    """recompute_logprobs: the sampling policy's log-probs come from the training forward's own arithmetic (whole
    groups, shared prompts), so the first pass's ratio is 1 to float precision. One epoch, one minibatch: the
    logged ratio is that pass's."""
    _run(_recipe(tmp_path / "run", [_grpo(max_steps=1, recompute_logprobs=True)]))
    row = _steps(tmp_path / "run" / "grpo")[0]
    assert row["ratio"] == pytest.approx(1.0, abs=1e-6) and row["approx_kl"] < 1e-12
    assert row["clip_low_frac"] == row["clip_high_frac"] == 0.0


@pytest.mark.slow
def test_beta_adds_the_k3_term_to_the_loss(tmp_path):
    """Same seed, same samples. Step 1: pi = ref, so k3 and its gradient are 0 and both runs take the same update.
    Step 2 samples the same responses again, and with token_mean the loss differs by exactly beta x (k3 summed
    over all tokens / tokens) = beta x (mean per-response KL) / (mean response length)."""
    beta = 0.5
    runs = {}
    for b in (0.0, beta):
        stage = _grpo(beta=b, loss_agg="token_mean", watch_steps=1, **LENGTH)  # the watch logs the KL for beta 0 too
        _run(_recipe(tmp_path / f"beta{b}", [stage]))
        runs[b] = _steps(tmp_path / f"beta{b}" / "grpo")
    plain, with_kl = runs[0.0], runs[beta]
    for key in ("reward", "response_length", "kl", "ratio"):  # the same samples and policy at both steps
        assert [r[key] for r in plain] == pytest.approx([r[key] for r in with_kl], rel=1e-5, abs=1e-9), key
    assert abs(plain[0]["kl"]) < 1e-6 and plain[1]["kl"] > 1e-3
    expected = beta * with_kl[1]["kl"] / with_kl[1]["response_length"]
    assert with_kl[0]["policy_loss"] == pytest.approx(plain[0]["policy_loss"], abs=1e-6)
    assert with_kl[1]["policy_loss"] - plain[1]["policy_loss"] == pytest.approx(expected, rel=1e-3)


def _unlikelihood_of(model_dir, rollout) -> float:
    """Mean token-level unlikelihood per completion token of `rollout` under the full model in model_dir, at
    temperature 1: how much probability it gives, at each token, to tokens the completion already wrote."""
    from transformers import AutoModelForCausalLM

    from alignlab.logprobs import completion_logits
    from alignlab.losses.sft import token_unlikelihood

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids, mask = rollout.completion_ids, rollout.completion_mask
    with torch.no_grad():
        logits = completion_logits(model, rollout.input_ids, rollout.attention_mask, ids.shape[1], 1.0)
    return (token_unlikelihood(torch.log_softmax(logits, dim=-1), ids, mask).sum() / mask.sum()).item()


@pytest.mark.slow
def test_unlikelihood_is_the_whole_loss_of_flat_groups_and_unlearns_repeats(tmp_path):
    """operand_reward gives a whole group one reward: every advantage is 0, so without the term nothing would train,
    and the loss is exactly alpha x the unlikelihood term (token_mean, one minibatch). After 8 steps, on 32 fixed
    answers the base model sampled (temperature 2, 16 tokens), the policy gives the tokens each answer already
    wrote under half the probability mass the base gives them (the unlikelihood term; measured: 0.083 -> 0.019)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.builtin.tasks import generate_task
    from alignlab.generation import generate

    stage = _grpo(
        reward_fn="tests.test_grpo:operand_reward", unlikelihood=1.0, max_steps=8, max_new_tokens=16, temperature=2.0,
        loss_agg="token_mean", learning_rate=1e-3,
    )  # fmt: skip
    out = _run(_recipe(tmp_path / "run", [stage], peft="none"))["grpo"]
    rows = _steps(tmp_path / "run" / "grpo")
    assert rows[0]["unlikelihood"] > 0.01
    for row in rows:
        assert row["policy_loss"] == pytest.approx(row["unlikelihood"], rel=1e-5)

    prompts = [r["prompt"] for r in generate_task("arith", "eval", 32, seed=1)]
    base = AutoModelForCausalLM.from_pretrained(out.base).eval()
    rollout = generate(
        base, AutoTokenizer.from_pretrained(out.base), prompts, max_new_tokens=16, temperature=2.0, generator_seed=0
    )
    before, after = _unlikelihood_of(out.base, rollout), _unlikelihood_of(out.path, rollout)
    print(f"unlikelihood on the base's answers: base {before:.3f} -> policy {after:.3f}")
    assert after < 0.5 * before, (before, after)


def _after_sft(sft_lora_run, run_dir, stage):
    """SFT (LoRA) -> `stage`: the session's finished SFT-LoRA run copied into run_dir, so the recipe's `sft` stage is
    reused as finished (tests/helpers.py) and only `stage` trains."""
    copy_run(sft_lora_run, run_dir)
    outputs = _run(sft_lora_recipe(run_dir, stage, name="grpo-test"))
    assert_reused(sft_lora_run, run_dir)
    assert outputs["sft"].path == str(run_dir / "sft" / "model")
    return outputs


@pytest.mark.slow
def test_reference_after_lora_sft_is_the_sft_adapter(tmp_path, sft_lora_run):
    outputs = _after_sft(sft_lora_run, tmp_path / "run", _grpo(watch_steps=1, learning_rate=1.0e-2))
    rows = _steps(tmp_path / "run" / "grpo")
    # KL 0 before the first update: the reference is the SFT adapter's frozen copy, not the base (the SFT adapter
    # moved the model away from the base: the adapter-disabled backbone would give a KL far above 0).
    assert abs(rows[0]["kl"]) < 1e-6
    assert rows[1]["kl"] > 1e-4  # the policy moved and the copy did not train along
    out = outputs["grpo"]
    assert out.kind == "adapter" and out.base == outputs["sft"].base
    saved = tmp_path / "run" / "grpo" / "model"
    assert (saved / "adapter_model.safetensors").exists() and not (saved / "ref").exists()


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from alignlab.rl.grpo import GRPOTrainer

    def recipe(name):  # two minibatches per epoch, two epochs: the shuffles must resume too
        stage = _grpo(max_steps=4, save_steps=2, epochs=2, minibatch_size=8, clip_high=0.28, watch_steps=2)
        return _recipe(tmp_path / name, [stage])

    _run(recipe("straight"))

    real_step = GRPOTrainer.train_step

    def crashing_step(self):  # cut off during step 3, after the step-2 checkpoint, leaving a half-written folder
        if self.step == 2:
            (self.ckpt_dir / "step-3").mkdir()  # no completion marker: must be ignored
            raise RuntimeError("simulated crash")
        return real_step(self)

    monkeypatch.setattr(GRPOTrainer, "train_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(recipe("resumed"))
    monkeypatch.setattr(GRPOTrainer, "train_step", real_step)
    _run(recipe("resumed"), resume=True)

    straight, resumed = _rows(tmp_path / "straight" / "grpo"), _rows(tmp_path / "resumed" / "grpo")
    assert [r["step"] for r in straight] == [r["step"] for r in resumed] == [1, 2, 3, 4, 4]
    for a, b in zip(straight, resumed):
        assert a.keys() == b.keys()
        for key in a:
            if key not in ("train_runtime",) and not key.endswith("step_time"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    for name in ("straight", "resumed"):  # the watch's samples too: the same responses, no duplicates
        lines = (tmp_path / name / "grpo" / "samples.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 1, 1, 2, 2, 2, 4, 4, 4]
    a = load_file(str(tmp_path / "straight" / "grpo" / "model" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "grpo" / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _collapse_from_step(monkeypatch, step, responses_per_step):
    """repeated_ngram_share reports 0.9 for every response from training step `step` on (0 before): a collapse on
    cue (the measure itself is tested with hand values above)."""
    import alignlab.rl.grpo as grpo

    calls = {"n": 0}

    def fake(text, n=3):
        calls["n"] += 1
        return 0.9 if calls["n"] > (step - 1) * responses_per_step else 0.0

    monkeypatch.setattr(grpo, "repeated_ngram_share", fake)


@pytest.mark.slow
def test_stop_if_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    _collapse_from_step(monkeypatch, 3, 16)
    stage = _grpo(max_steps=6, save_steps=1, stop_if={"repetition": 0.5}, **LENGTH)
    outputs = _run(_recipe(tmp_path / "run", [stage]))
    stage_dir = tmp_path / "run" / "grpo"
    final = _rows(stage_dir)[-1]
    # Step 3's samples (from the weights after 2 updates) collapsed; step 2's (after 1 update) did not: keep step 1.
    assert final["final"] and final["stopped_at_step"] == 3 and final["kept_checkpoint_step"] == 1
    assert final["stop_reason"] == (
        "grpo stopped at step 3 of 6: the share of repeated word 3-grams in step 3's responses is 0.900, above "
        f"stop_if.repetition = 0.5. The stage's model is the last good checkpoint, {stage_dir}/checkpoints/step-1 "
        "(step 1), whose weights passed the checks of step 2."
    )
    assert outputs["grpo"].metrics["stop_reason"] == final["stop_reason"]
    assert [r["step"] for r in _steps(stage_dir)] == [1, 2]  # the updates that happened
    kept = load_file(str(stage_dir / "checkpoints" / "step-1" / "trainable.safetensors"))
    saved = load_file(str(stage_dir / "model" / "adapter_model.safetensors"))
    later = load_file(str(stage_dir / "checkpoints" / "step-2" / "trainable.safetensors"))
    name = next(k for k in kept if "lora_B" in k)
    short = name.removeprefix("policy.").replace(".default", "")  # PEFT saves them without the adapter's name
    torch.testing.assert_close(saved[short], kept[name])
    assert not torch.equal(saved[short], later[name])


def _assert_kept_the_sft_adapter(run_dir, rejected_checkpoint):
    """GRPO saved its input, the SFT adapter, tensor for tensor; the rejected checkpoint had moved away from it."""
    from safetensors.torch import load_file

    sft = load_file(str(run_dir / "sft" / "model" / "adapter_model.safetensors"))
    saved = load_file(str(run_dir / "grpo" / "model" / "adapter_model.safetensors"))
    moved = load_file(str(run_dir / "grpo" / "checkpoints" / f"step-{rejected_checkpoint}" / "trainable.safetensors"))
    assert saved.keys() == sft.keys() and all(torch.equal(saved[k], sft[k]) for k in sft)
    name = next(k for k in moved if "lora_B" in k)
    assert not torch.equal(moved[name], sft[name.removeprefix("policy.").replace(".default", "")])


@pytest.mark.slow
def test_stop_if_without_a_good_checkpoint_keeps_the_input_model(tmp_path, monkeypatch, sft_lora_run):
    """SFT, then GRPO from its adapter. Step 2's samples (the weights after 1 update) collapse: the last good weights
    are the input's, which no checkpoint holds (checkpoint 1 holds those after the update); the stage ends with its
    input model, the SFT adapter, and says so (it no longer fails)."""
    _collapse_from_step(monkeypatch, 2, 16)
    stage = _grpo(max_steps=6, save_steps=1, stop_if={"repetition": 0.5}, **LENGTH)
    outputs = _after_sft(sft_lora_run, tmp_path / "run", stage)
    final = _rows(tmp_path / "run" / "grpo")[-1]
    assert final["stopped_at_step"] == 2 and final["kept_checkpoint_step"] == 0
    assert final["stop_reason"] == (
        "grpo stopped at step 2 of 6: the share of repeated word 3-grams in step 2's responses is 0.900, above "
        "stop_if.repetition = 0.5. The stage's model is its input model, whose weights passed the checks of step 1: "
        "no checkpoint at or before step 0 is left (train.save_steps 1, train.save_total_limit 2). Lower "
        "train.learning_rate (now 0.001) or raise beta (now 0.0); save more often."
    )
    assert outputs["grpo"].metrics["stop_reason"] == final["stop_reason"]
    _assert_kept_the_sft_adapter(tmp_path / "run", 1)


@pytest.mark.slow
def test_greedy_probe_falls_back_to_the_input_model(tmp_path, monkeypatch, sft_lora_run):
    """Measured on SmolLM2 (README): the SFT model passed the probe, the first checkpoint's weights did not. The
    stage keeps its input weights (the newest that passed) instead of failing; checkpoint 2 is left as it was."""
    probes = _greedy_loops_after(monkeypatch, 2)
    stage = _grpo(max_steps=6, save_steps=2, stop_if={"greedy_repetition": 0.5}, greedy_prompts=4, **LENGTH)
    _after_sft(sft_lora_run, tmp_path / "run", stage)
    assert [u for u, _ in probes] == [0, 2]
    final = _rows(tmp_path / "run" / "grpo")[-1]
    assert final["stopped_at_step"] == 3 and final["kept_checkpoint_step"] == 0
    assert (
        "(after 2 updates)" in final["stop_reason"] and "The stage's model is its input model" in final["stop_reason"]
    )
    _assert_kept_the_sft_adapter(tmp_path / "run", 2)


def _record_trainer(monkeypatch) -> dict:
    """A dict whose "trainer" is the GRPOTrainer the next run builds."""
    import alignlab.rl.grpo as grpo

    seen = {}
    real_init = grpo.GRPOTrainer.__init__

    def recording_init(self, *a, **kw):
        real_init(self, *a, **kw)
        seen["trainer"] = self

    monkeypatch.setattr(grpo.GRPOTrainer, "__init__", recording_init)
    return seen


def _greedy_loops_after(monkeypatch, updates):
    """The greedy probe's answers loop once the weights have had `updates` updates ("x y z x y z x y z": 7 word
    3-grams, 3 distinct, so 1 - 3/7 = 4/7 repeated) and are plain before (0); every probe is recorded as (updates,
    its prompts). The sampling passes (temperature > 0) are left alone."""
    import dataclasses

    import alignlab.rl.grpo as grpo

    probes = []
    real_generate = grpo.generate

    def fake_generate(model, tokenizer, prompts, **kw):
        if kw.get("temperature") != 0.0:
            return real_generate(model, tokenizer, prompts, **kw)
        trainer = probes_owner["trainer"]
        probes.append((trainer.step, [p[-1]["content"] if isinstance(p, list) else p for p in prompts]))
        text = "x y z x y z x y z" if trainer.step >= updates else "one two three four"
        return dataclasses.replace(real_generate(model, tokenizer, prompts, **kw), texts=[text] * len(prompts))

    probes_owner = _record_trainer(monkeypatch)
    monkeypatch.setattr(grpo, "generate", fake_generate)
    return probes


@pytest.mark.slow
def test_greedy_probe_keeps_the_last_checkpoint_that_passed(tmp_path, monkeypatch):
    """save_steps 2, 6 steps: the probe decodes the same evenly spaced prompts greedily before step 1 (the input
    model), at steps 3 and 5 (the weights of checkpoints 2 and 4) and after the loop (the final weights). Loops from
    4 updates on: step 5's probe fails (checkpoint 4's weights), so the stage keeps checkpoint 2, which passed."""
    probes = _greedy_loops_after(monkeypatch, 4)
    stage = _grpo(max_steps=6, save_steps=2, stop_if={"greedy_repetition": 0.5}, greedy_prompts=4, **LENGTH)
    outputs = _run(_recipe(tmp_path / "run", [stage]))
    stage_dir = tmp_path / "run" / "grpo"
    assert [u for u, _ in probes] == [0, 2, 4]
    prompts = {tuple(p) for _, p in probes}
    assert len(prompts) == 1 and len(next(iter(prompts))) == 4  # the same 4 prompts every time
    rows = _steps(stage_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r.get("greedy_repetition") for r in rows] == [0.0, None, 0.0, None]
    final = _rows(stage_dir)[-1]
    assert final["stopped_at_step"] == 5 and final["kept_checkpoint_step"] == 2
    assert final["stop_reason"] == (
        "grpo stopped at step 5 of 6: the greedy answers to 4 training prompts at step 5 (after 4 updates) repeat "
        f"word 3-grams at a share of {4 / 7:.3f}, above stop_if.greedy_repetition = 0.5. The stage's model is the "
        f"last good checkpoint, {stage_dir}/checkpoints/step-2 (step 2), whose weights passed the checks of step 3."
    )
    assert outputs["grpo"].metrics["kept_checkpoint_step"] == 2


@pytest.mark.slow
def test_greedy_probe_of_the_final_weights(tmp_path, monkeypatch):
    """Only the final weights loop: every checkpoint passed, the stage keeps the newest (step 4 of 6)."""
    from safetensors.torch import load_file

    probes = _greedy_loops_after(monkeypatch, 6)
    stage = _grpo(max_steps=6, save_steps=2, stop_if={"greedy_repetition": 0.5}, greedy_prompts=4, **LENGTH)
    _run(_recipe(tmp_path / "run", [stage]))
    stage_dir = tmp_path / "run" / "grpo"
    assert [u for u, _ in probes] == [0, 2, 4, 6]
    final = _rows(stage_dir)[-1]
    assert [r["step"] for r in _steps(stage_dir)] == [1, 2, 3, 4, 5, 6]
    assert final["stopped_at_step"] == 6 and final["kept_checkpoint_step"] == 4
    assert "the greedy answers to 4 training prompts of the final weights (after 6 updates)" in final["stop_reason"]
    kept = load_file(str(stage_dir / "checkpoints" / "step-4" / "trainable.safetensors"))
    saved = load_file(str(stage_dir / "model" / "adapter_model.safetensors"))
    name = next(k for k in kept if "lora_B" in k)
    torch.testing.assert_close(saved[name.removeprefix("policy.").replace(".default", "")], kept[name])


@pytest.mark.slow
def test_greedy_probe_of_the_input_model_fails_the_stage(tmp_path, monkeypatch):
    from alignlab.contract import StageFailed

    _greedy_loops_after(monkeypatch, 0)
    stage = _grpo(max_steps=4, save_steps=2, stop_if={"greedy_repetition": 0.5}, greedy_prompts=4, **LENGTH)
    with pytest.raises(StageFailed, match=r"at step 1 \(after 0 updates\).* The input model itself fails this check"):
        _run(_recipe(tmp_path / "run", [stage]))


@pytest.mark.slow
def test_greedy_probe_that_passes_changes_nothing(tmp_path):
    """The probe decodes greedily (no random draws): a run it never stops trains exactly the run without it."""
    from safetensors.torch import load_file

    weights = []
    for name, extra in (("plain", {}), ("probed", {"stop_if": {"greedy_repetition": 1.0}, "greedy_prompts": 4})):
        _run(_recipe(tmp_path / name, [_grpo(max_steps=4, save_steps=2, **LENGTH, **extra)]))
        weights.append(load_file(str(tmp_path / name / "grpo" / "model" / "adapter_model.safetensors")))
        rows = _steps(tmp_path / name / "grpo")
    assert [r.get("greedy_repetition") is not None for r in rows] == [True, False, True, False]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_skip_zero_std_groups_counts_and_drops_flat_groups(tmp_path):
    """8 prompts, all in step 1. Flat groups (even first operand: reward 1 for every response) have advantage 0, so
    they add nothing to the loss's numerator; dropping them only shrinks its denominator: with Dr. GRPO's constant
    (token sums / (responses x max_new_tokens)) the step-1 loss (ratio 1, the same samples) becomes loss x responses /
    kept responses. (With sequence_mean it would be 0 at ratio 1: each group's advantages sum to 0.)"""
    from alignlab.builtin.tasks import generate_task

    components = [
        {"fn": "tests.test_grpo:even_first_reward", "weight": 1.0},
        {"fn": "tests.test_grpo:operand_reward", "weight": 0.5},
    ]
    rows = {}
    for skip in (False, True):
        stage = _grpo(
            dataset={"path": "builtin:arith", "split": "sft", "size": 8}, reward_fn=components, max_steps=1,
            batch_size=8, advantage="dr_grpo", skip_zero_std_groups=skip,
        )  # fmt: skip
        _run(_recipe(tmp_path / f"skip{skip}", [stage]))
        rows[skip] = _steps(tmp_path / f"skip{skip}" / "grpo")[0]
    kept, dropped = rows[False], rows[True]
    prompts = [r["prompt"][-1]["content"] for r in generate_task("arith", "sft", 8, seed=0)]
    even = sum(int(p.split()[-1].split("+")[0]) % 2 == 0 for p in prompts) / 8
    assert 0 < even < 1
    flat = kept["zero_std_groups"]
    assert flat == dropped["zero_std_groups"] and even <= flat < 1  # every even group, and any odd one by chance
    assert dropped["policy_loss"] == pytest.approx(kept["policy_loss"] / (1 - flat), rel=1e-5)
    assert abs(kept["policy_loss"]) > 1e-4
    # Each component is logged; the reward is their weighted sum (means are linear).
    total = kept["reward/tests.test_grpo:even_first_reward"] + 0.5 * kept["reward/tests.test_grpo:operand_reward"]
    assert math.isclose(kept["reward"], total, rel_tol=1e-6)


@pytest.mark.slow
def test_qlora_default_recomputes_old_logprobs(tmp_path, monkeypatch):
    """QLoRA from the base, recompute_logprobs left null: the 4-bit layers compute in bfloat16 (QLoRA's default
    compute_dtype) while the trainable and norm weights stay float32, so neither accelerate's mixed precision nor the
    parameters' dtype says "low precision", yet cached decoding drifts from the training forward. The default reads
    the quantized base's compute dtype too (PPO's rule, one shared function) and recomputes the old log-probs with
    the training forward: no SamplingRecorder, and the first (only) pass's ratio is exactly 1 (approx_kl 0, no
    clipping). Temperature 3 keeps the tiny base from ending at once (16 new tokens: 223 response tokens here; at
    temperature 1 it says EOS after ~2 tokens and the two passes happen to agree bitwise).
    Measured before the fix (old log-probs off the bf16 sampling pass): |new - old| mean 4.4e-5, max 1.3e-3 nats per
    token, ratio 1.0000031, approx_kl 9.7e-9."""
    import alignlab.rl.grpo as grpo

    seen = {"recorders": 0}
    real_step = grpo.GRPOTrainer.train_step

    class CountingRecorder(grpo.SamplingRecorder):
        def __init__(self, *a, **kw):
            seen["recorders"] += 1
            super().__init__(*a, **kw)

    def recording_step(self):
        seen["trainer"] = self
        return real_step(self)

    monkeypatch.setattr(grpo.GRPOTrainer, "train_step", recording_step)
    monkeypatch.setattr(grpo, "SamplingRecorder", CountingRecorder)
    stage = _grpo(max_steps=1, max_new_tokens=16, temperature=3.0)
    _run(_recipe(tmp_path / "run", [stage], peft="qlora"))
    row = _steps(tmp_path / "run" / "grpo")[0]
    assert row["ratio"] == 1.0 and row["approx_kl"] == 0.0  # one epoch, one minibatch: the first pass
    assert row["clip_low_frac"] == row["clip_high_frac"] == 0.0
    assert seen["recorders"] == 0  # the old log-probs did not come off the sampling pass

    from alignlab.rl.loop import low_precision, quantized_compute_dtype

    trainer = seen["trainer"]
    # the two checks GRPO had see nothing (no autocast, float32 parameters); the quantized layers compute in bf16
    assert trainer.acc.mixed_precision == "no" and next(trainer.policy.parameters()).dtype == torch.float32
    assert quantized_compute_dtype(trainer.policy) == torch.bfloat16
    assert low_precision(trainer.acc, trainer.policy) is True


@pytest.mark.slow
def test_rollout_dtype_samples_from_the_refreshed_bf16_copy(tmp_path, monkeypatch):
    """rollout.dtype: bfloat16, LoRA: every step's responses come from the bf16 copy, refreshed to the policy as it is
    at that step (step 2: after step 1's update); the old log-probs come from the float32 training forward (no
    SamplingRecorder), so the first pass's ratio is exactly 1; the responses are what generate() gives that copy."""
    import alignlab.rl.grpo as grpo
    from alignlab import generation

    seen = {"recorders": 0, "calls": []}
    real_generate = grpo.generate
    trainer_of = _record_trainer(monkeypatch)

    class CountingRecorder(grpo.SamplingRecorder):
        def __init__(self, *a, **kw):
            seen["recorders"] += 1
            super().__init__(*a, **kw)

    def recording_generate(model, *args, **kwargs):
        trainer = trainer_of["trainer"]
        merged = dict(copy.deepcopy(trainer.policy).merge_and_unload().to(torch.bfloat16).named_parameters())
        own = dict(model.named_parameters())
        seen["calls"].append(
            (
                next(model.parameters()).dtype,
                all(torch.equal(own[k], merged[k]) for k in merged),
                len(own) == len(merged),
            )
        )
        return real_generate(model, *args, **kwargs)

    monkeypatch.setattr(grpo, "generate", recording_generate)
    monkeypatch.setattr(grpo, "SamplingRecorder", CountingRecorder)
    monkeypatch.setattr(generation, "native_half_precision", lambda dtype: False)  # a CPU without native bf16
    _run(_recipe(tmp_path / "run", [_grpo(dtype="bfloat16", **LENGTH)]))
    rows = _steps(tmp_path / "run" / "grpo")
    assert seen["calls"] == [(torch.bfloat16, True, True)] * 2 and seen["recorders"] == 0
    assert "stages.grpo.rollout.dtype: bfloat16 on this CPU (" in (tmp_path / "run" / "logs" / "run.0.log").read_text()
    assert rows[0]["ratio"] == 1.0 and rows[0]["approx_kl"] == 0.0  # one epoch, one minibatch: the first pass
    assert rows[1]["ratio"] == 1.0  # step 2's old log-probs: the updated float32 policy's own forward
