"""Every stage on a real pretrained model, SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`: 30 layers, tied
embeddings, vocabulary 49,152, pad = eos = <|im_end|>, a ChatML template that adds a default system prompt), a few
steps each on short sequences, with the behaviour asserted:

- SFT on chat `messages` (LoRA): the first logged loss is the base model's mean NLL of the assistant tokens (and
  their <|im_end|>), computed here by hand from the template, and the loss falls on a tiny repeated set; the eval
  stage after it writes every eval.json key, its true reward is the reward of its own samples, its reference
  answers are the base model's greedy answers, and the trained rows' perplexity fell.
- DPO with each loss (LoRA from the base: policy = reference at step 1): the first loss is its value by hand
  (dpo, cdpo, rdpo, drdpo, kldpo: ln 2; ipo: 1/(2 beta)^2 = 25; hinge: 1; wdpo: ln 2 + rho * penalty), and over 3
  steps DPO's margin and accuracy move; a reward model's loss falls and its accuracy reaches 1 on its pairs.
- generate (bf16 sampling, preference pairs): the written samples are the bf16 model's own, scored by the checker,
  paired best against worst.
- PPO and GRPO (LoRA, reward_fn builtin:constraints): the first step's KL is 0 and its ratio 1 (approx_kl 0,
  nothing clipped); the second step's KL is not (the adapter moved). (GRPO's grouped training forward on this model:
  tests/test_grpo.py, in this tier.)
- QLoRA (4-bit NF4 base on CPU, prompt-completion strings): SFT trains only LoRA weights, kept float32, on an
  untouched 4-bit base, and the DPO stage continuing that adapter starts at exactly ln 2 (policy = its reference).

One run per module (module-scoped fixtures), shared by the tests that read it. `pytest -m real`: the whole tier took 93 s
on 2 idle CPU cores in a CI rehearsal (14 minutes at load 4-6) (the model is converted once into ~/.cache/alignlab, see tests/test_gguf.py).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import alignlab_beside, make_recipe, make_stage, write_yaml
from tests.helpers import run as _run

pytestmark = pytest.mark.real

MODEL = "builtin:smollm2-135m-instruct"
CHATS = [  # a tiny repeated set: every SFT step sees both rows
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Blue is one."}],
]
LORA = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}


def _recipe(name: str, run_dir, stages: list[dict], peft: dict | None = LORA) -> dict:
    return make_recipe(stages, run_dir, name=name, model=MODEL, peft=peft)


def _rows(path) -> list[dict]:
    """The per-step rows of a metrics.jsonl (not the final summary, not the end-of-training eval)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if not r.get("final") and ("loss" in r or "kl" in r)]


@pytest.fixture(scope="module")
def smol_path():
    from alignlab.builtin import builtin_model_path

    return builtin_model_path("smollm2-135m-instruct")


# --------------------------------------------------------------------------------------------- SFT, then eval


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    data = tmp / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    train = {"max_steps": 3, "per_device_batch_size": 2, "learning_rate": 3e-3, "max_length": 64, "logging_steps": 1}
    raw = _recipe(
        "real-sft",
        tmp / "run",
        [
            {"name": "sft", "type": "sft", "dataset": {"path": str(data)}, "train": train},
            {
                "name": "eval",
                "type": "eval",
                "rollout": {"max_new_tokens": 12, "batch_size": 4},
                "dataset": {"path": "builtin:constraints", "split": "eval", "size": 4},
                "sft_dataset": {"path": str(data)},
                "reward_fn": "builtin:constraints",
                "num_prompts": 4,
                "num_samples_shown": 4,
            },
        ],
    )
    _run(raw)
    return tmp / "run"


def test_sft_first_loss_is_the_base_nll_of_the_assistant_tokens(sft_run, smol_path):
    """Step 1 (LoRA B = 0: the base model) = mean over the batch's assistant tokens of -log p(token | before).
    Assistant tokens, found here without alignlab: the conversation's tokens after the generation prompt (the
    templated chat without its last reply), up to and including <|im_end|>, not the "\\n" after it. Then the loss
    falls on the repeated rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_path)
    model = AutoModelForCausalLM.from_pretrained(smol_path).eval()
    nll, count = 0.0, 0
    for chat in CHATS:
        full = tok.apply_chat_template(chat, tokenize=False)
        prompt = tok.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        assert full.startswith(prompt + chat[-1]["content"]) and full.endswith("<|im_end|>\n")
        assert "You are a helpful AI assistant named SmolLM" in prompt  # the template's default system prompt
        ids = tok(full, add_special_tokens=False, return_tensors="pt").input_ids  # [1, T]
        start, end = len(tok(prompt, add_special_tokens=False).input_ids), ids.shape[1] - 1  # drop the last "\n"
        assert tok.decode(ids[0, start:end]) == chat[-1]["content"] + "<|im_end|>"
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0].float(), -1)  # [T, V]
        targets = ids[0, start:end]
        nll -= logps[start - 1 : end - 1].gather(-1, targets[:, None]).sum().item()
        count += end - start
    rows = _rows(sft_run / "sft" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(nll / count, rel=1e-4)
    assert rows[0]["num_tokens"] > count  # tokens fed (the whole conversations), not only the trained ones
    assert rows[2]["loss"] < 0.5 * rows[0]["loss"]


def test_eval_after_sft_reports_every_key_and_its_own_samples(sft_run, smol_path):
    """eval.json has every key; the true reward is the mean builtin:constraints reward of the texts it shows (all 4
    prompts shown), the reference's answers are the base model's greedy answers (12 new tokens, stopping at
    <|im_end|>), and the SFT rows' perplexity fell under the policy trained on them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.builtin.constraints import constraints_reward
    from alignlab.builtin.tasks import generate_task
    from alignlab.evaluation.evaluator import EVAL_KEYS

    res = json.loads((sft_run / "eval" / "eval.json").read_text())
    assert set(res) == set(EVAL_KEYS) and res["num_prompts"] == 4 and len(res["samples"]) == 4
    prompts = [s["prompt"] for s in res["samples"]]
    expected = [r["prompt"][0]["content"] for r in generate_task("constraints", "eval", 4)]
    assert prompts == expected
    policy_rewards = constraints_reward(prompts, [s["policy"] for s in res["samples"]])
    reference_rewards = constraints_reward(prompts, [s["reference"] for s in res["samples"]])
    assert res["true_reward"] == pytest.approx(sum(policy_rewards) / 4)
    assert res["true_reward_reference"] == pytest.approx(sum(reference_rewards) / 4)
    assert [s["policy_reward"] for s in res["samples"]] == pytest.approx(policy_rewards)
    assert 0.0 <= res["win_rate"] <= 1.0 and res["win_rate_by"] == "reward_fn"
    assert isinstance(res["kl"], float) and res["kl"] != 0.0  # the adapter changed the policy
    assert res["perplexity"] < res["perplexity_reference"]

    tok = AutoTokenizer.from_pretrained(smol_path)
    model = AutoModelForCausalLM.from_pretrained(smol_path).eval()
    for prompt, sample in zip(prompts, res["samples"]):
        enc = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, repetition_penalty=None, eos_token_id=2)
        assert sample["reference"] == tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


# --------------------------------------------------------------------------------------------- DPO and reward

LOSSES = {  # name: (parameters, first loss at policy = reference; wdpo: ln 2 + rho * its logged penalty)
    "dpo": ({}, math.log(2)),
    "cdpo": ({"eps": 0.1}, math.log(2)),
    "rdpo": ({"eps": 0.1}, math.log(2)),
    "ipo": ({}, 25.0),  # (0 - 1 / (2 * 0.1))^2
    "hinge": ({}, 1.0),  # max(0, 1 - 0)
    "drdpo": ({"beta_prime": 0.5}, math.log(2)),
    "kldpo": ({"tau": 0.5}, math.log(2)),  # every weight exp(0) = 1
    "wdpo": ({"rho": 0.1}, None),
}


@pytest.fixture(scope="module")
def preference_run(tmp_path_factory):
    from alignlab.builtin.tasks import write_task

    tmp = tmp_path_factory.mktemp("dpo")
    pairs = {"path": str(write_task("arith", "preference", tmp / "pairs.jsonl", 2))}  # a local file: no eval split
    train = {"max_steps": 1, "per_device_batch_size": 2, "learning_rate": 1e-3, "max_length": 64, "logging_steps": 1}
    stages = [
        {
            "name": name,
            "type": "dpo",
            "input": "base",
            "dataset": pairs,
            "loss": {"name": name, "beta": 0.1, **params},
            "train": {**train, "max_steps": 3 if name == "dpo" else 1},
        }
        for name, (params, _) in LOSSES.items()
    ]
    stages.append(
        {
            "name": "rm",
            "type": "reward",
            "input": "base",
            "dataset": pairs,
            "train": {**train, "max_steps": 3, "learning_rate": 3e-3},
        }
    )
    # Two runs side by side, one thread each (each stage starts from the base model and the recipe's seed, so a
    # stage's result does not depend on the stages run before it): the run folder of every stage, by name.
    half = (len(stages) + 1) // 2  # the process beside starts up first
    beside = write_yaml(tmp / "beside.yaml", _recipe("real-dpo", tmp / "beside", stages[half:]))
    with alignlab_beside(["run", beside], log=tmp / "beside.log"):
        _run(_recipe("real-dpo", tmp / "run", stages[:half]))
    return {s["name"]: (tmp / "run" if i < half else tmp / "beside") / s["name"] for i, s in enumerate(stages)}


@pytest.mark.parametrize("name", list(LOSSES))
def test_dpo_first_loss_is_its_value_at_policy_equal_reference(preference_run, name):
    """The policy's log-probs and the reference's come from the same forward (a zero adapter adds exact zeros), so
    the implicit rewards are exactly 0; wdpo's policy pass goes through the math SDPA kernel and plain logits (for
    the double backward), the reference's through the default ones: equal up to float noise (3e-6 measured)."""
    first = _rows(preference_run[name] / "metrics.jsonl")[0]
    assert first["step"] == 1
    expected = LOSSES[name][1]
    if name == "wdpo":  # the gradient penalty ||d loss / d embeddings||^2
        assert first["wdpo/penalty"] > 0 and abs(first["rewards/margins"]) < 1e-4
        expected = math.log(2) + 0.1 * first["wdpo/penalty"]
    else:
        assert first["rewards/margins"] == 0.0
    assert first["loss"] == pytest.approx(expected, rel=1e-5)


def test_dpo_margin_and_accuracy_move(preference_run):
    rows = _rows(preference_run["dpo"] / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["rewards/accuracies"] == 0.5  # ties count 1/2
    assert rows[2]["rewards/margins"] > 0.1 and rows[2]["rewards/accuracies"] == 1.0
    assert rows[2]["loss"] < math.log(2) - 0.05


def test_reward_model_learns_its_pairs(preference_run):
    rows = _rows(preference_run["rm"] / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["loss"] < rows[0]["loss"] and rows[2]["accuracy"] == 1.0


# --------------------------------------------------------------------------------------------- PPO


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppo")
    raw = _recipe(
        "real-ppo",
        tmp / "run",
        [
            {
                "name": "ppo",
                "type": "ppo",
                "train": {"max_steps": 2, "epochs": 1, "minibatch_size": 2, "learning_rate": 2e-3},
                "dataset": {"path": "builtin:constraints", "split": "train", "size": 4},
                "reward_fn": "builtin:constraints",
                "rollout": {"batch_size": 2, "max_new_tokens": 12, "temperature": 1.0},
                "ppo": {"kl_coef": 0.05},
            }
        ],
    )
    _run(raw)
    return tmp / "run"


def test_ppo_first_step_has_kl_0_and_ratio_1(ppo_run):
    """Step 1: the policy (a fresh adapter, B = 0) is the reference, so KL = 0 up to the cached decoding's float
    noise, and its one minibatch is scored before any update: ratio 1 (approx_kl 0, nothing clipped). Step 2 has
    moved."""
    first, second = _rows(ppo_run / "ppo" / "metrics.jsonl")
    assert abs(first["kl"]) < 1e-4 and first["approx_kl"] < 1e-8 and first["clipfrac"] == 0.0
    assert 0.0 <= first["score"] <= 1.0 and 1 <= first["response_length"] <= 12
    assert abs(second["kl"]) > 1e-3


# --------------------------------------------------------------------------------------------- generate


def test_generate_writes_the_bf16_models_own_samples_scored_by_the_checker(tmp_path):
    """A generate stage (dtype bfloat16, output preference) on the real model: the samples it writes are what the
    bf16 model samples from the rendered chat prompts with the stage's seeds, each scored by builtin:constraints on
    its text (end token stripped), and each pair is the prompt's best sample against its worst. The stage runs in a
    process beside this one, which meanwhile samples the same prompts itself (one thread each)."""
    from alignlab.builtin.tasks import generate_task
    from alignlab.generation import generate
    from alignlab.models import load_frozen_model, load_tokenizer, resolve_base
    from alignlab.recipe import parse_recipe
    from alignlab.rewards import load_reward_fn
    from alignlab.stages.generate import sample_seed

    n, k, tokens = 3, 4, 16
    gen = make_stage(
        "generate", "pairs", dataset={"path": "builtin:constraints", "split": "train", "size": n},
        reward_fn="builtin:constraints", output="preference",
        num_samples=k, max_new_tokens=tokens, temperature=1.0, batch_size=n, dtype="bfloat16",
    )  # fmt: skip
    raw = _recipe("real-gen", tmp_path / "run", [gen], peft=None)
    rows = generate_task("constraints", "train", n, seed=0)  # the stage's prompts: the dataset's rows, in order
    with alignlab_beside(["run", write_yaml(tmp_path / "gen.yaml", raw)], log=tmp_path / "gen.log"):
        recipe = parse_recipe(raw)
        model = load_frozen_model(recipe, None).to(torch.bfloat16)
        ro = generate(
            model,
            load_tokenizer(recipe, resolve_base(recipe)),
            [r["prompt"] for r in rows for _ in range(k)],
            max_new_tokens=tokens,
            temperature=1.0,
            row_seeds=[sample_seed(0, "pairs", i, j) for i in range(n) for j in range(k)],
        )
    samples = [json.loads(line) for line in (tmp_path / "run" / "pairs" / "samples.jsonl").read_text().splitlines()]
    pairs = [
        json.loads(line) for line in (tmp_path / "run" / "pairs" / "data" / "train.jsonl").read_text().splitlines()
    ]
    assert [(s["index"], [{"role": "user", "content": s["prompt"]}]) for s in samples] == list(
        enumerate(r["prompt"] for r in rows)
    )
    assert [t for s in samples for t in s["texts"]] == ro.texts and len(samples) == n
    assert not any("<|im_end|>" in t for t in ro.texts)

    checker = load_reward_fn("builtin:constraints")
    best_worst = []
    for s in samples:
        assert s["scores"] == checker([s["prompt"]] * k, s["texts"])
        sc = s["scores"]
        if max(sc) > min(sc):
            best_worst.append((s["texts"][sc.index(max(sc))], s["texts"][sc.index(min(sc))]))
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == best_worst != []


# --------------------------------------------------------------------------------------------- GRPO


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    raw = _recipe(
        "real-grpo",
        tmp / "run",
        [
            {
                "name": "grpo",
                "type": "grpo",
                "train": {"max_steps": 2, "learning_rate": 2e-3, "logging_steps": 1},
                "rollout": {"batch_size": 2, "num_samples": 4, "max_new_tokens": 12, "temperature": 1.0},
                "dataset": {"path": "builtin:constraints", "split": "train", "size": 8},
                "reward_fn": "builtin:constraints",
                "beta": 0.1,
            }
        ],
    )
    _run(raw)
    return tmp / "run"


def test_grpo_first_step_has_kl_0_and_ratio_1(grpo_run):
    """Step 1: the policy (a fresh adapter, B = 0) is the reference (the adapter-disabled backbone), so the k3 KL is
    0, and the training forward (each group's prompt once, its KV cache continued by the group's answers) gives the
    sampling pass's log-probs: ratio 1, approx_kl 0, nothing clipped. Step 2 has moved away from the reference."""
    first, second = _rows(grpo_run / "grpo" / "metrics.jsonl")
    assert abs(first["kl"]) < 1e-4 and first["approx_kl"] < 1e-8 and abs(first["ratio"] - 1) < 1e-4
    assert first["clip_low_frac"] == first["clip_high_frac"] == 0.0
    assert 0.0 <= first["reward"] <= 1.0 and 1 <= first["response_length"] <= 12
    assert abs(second["kl"]) > 1e-3


# --------------------------------------------------------------------------------------------- QLoRA


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """QLoRA SFT on prompt-completion strings, then DPO continuing its adapter; records what the SFT trainer
    trains and the 4-bit weights before and after. The DPO pairs are a local file: no held-out split, so no final
    evaluation (nothing here reads one; on the 4-bit base it cost as much as the training step)."""
    import bitsandbytes as bnb

    import alignlab.stages.sft as sft_stage
    from alignlab.builtin.tasks import write_task

    tmp = tmp_path_factory.mktemp("qlora")
    data = tmp / "pc.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": c[0]["content"], "completion": c[1]["content"]}) + "\n" for c in CHATS)
    )
    seen = {}
    real = sft_stage.train_and_save

    def recording(trainer, ctx, **kw):
        model = trainer.model
        seen["trainable"] = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        seen["4bit"] = [m.weight.detach().clone() for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        out = real(trainer, ctx, **kw)
        seen["4bit_after"] = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        return out

    train = {"max_steps": 2, "per_device_batch_size": 2, "learning_rate": 3e-3, "max_length": 64, "logging_steps": 1}
    raw = _recipe(
        "real-qlora",
        tmp / "run",
        [
            {"name": "sft", "type": "sft", "dataset": {"path": str(data)}, "train": train},
            {
                "name": "dpo",
                "type": "dpo",
                "dataset": {"path": str(write_task("arith", "preference", tmp / "pairs.jsonl", 2))},
                "train": {**train, "max_steps": 1},
            },
        ],
        peft={**LORA, "method": "qlora"},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft_stage, "train_and_save", recording)
        _run(raw)
    return tmp / "run", seen


def test_qlora_sft_trains_only_float32_adapters_on_an_untouched_4bit_base(qlora_run):
    from safetensors.torch import load_file

    run, seen = qlora_run
    assert seen["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in seen["trainable"])
    assert set(seen["trainable"].values()) == {torch.float32}  # TRL's cast to bf16 undone
    assert len(seen["4bit"]) == 7 * 30  # q k v o gate up down in each of the 30 layers
    assert all(w.dtype == torch.uint8 for w in seen["4bit_after"])
    assert all(torch.equal(a, b) for a, b in zip(seen["4bit"], seen["4bit_after"]))
    saved = load_file(run / "sft" / "model" / "adapter_model.safetensors")
    assert len(saved) == 2 * len(seen["4bit"]) and {t.dtype for t in saved.values()} == {torch.float32}
    rows = _rows(run / "sft" / "metrics.jsonl")
    assert rows[1]["loss"] < rows[0]["loss"]


def test_qlora_dpo_continuing_the_sft_adapter_starts_at_ln2(qlora_run):
    """Policy and reference are the same float32 SFT adapter on the same 4-bit base (TRL's bf16 cast of the policy
    alone made them differ by ~0.1 nats per completion)."""
    run, _ = qlora_run
    first = _rows(run / "dpo" / "metrics.jsonl")[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)
