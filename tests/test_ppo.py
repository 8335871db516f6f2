"""PPO stage end to end on the built-in tiny model, with programmatic rewards (recipes name them as
`tests.test_ppo:sevens_reward`, `tests.helpers:length_reward`; pytest runs from the repo root with pythonpath ["."]).

- learning: a short full SFT on builtin:arith teaches the format (digits, then EOS); full-weight PPO (reference:
  a frozen copy of the SFT model) must then raise the reward of sampled completions clearly above the SFT
  policy's, on the same held-out prompts with the same seed, while the KL to the reference stays bounded.
  (Full weights because the built-in base is randomly initialised: LoRA alone cannot make it confident.)
- reference under LoRA: continuing an SFT adapter, the reference is its frozen "ref" copy: KL exactly 0 before
  the first update, non-zero after (the copy did not train along), and the saved adapter holds no "ref";
- QLoRA: on a 4-bit base, KL exactly 0 before the first update (reference = adapter disabled), only the LoRA weights
  and the value head train, the quantized weights stay as loaded (no CPU inference repacking during rollouts);
- resume: a run cut off after its step-2 checkpoint and resumed gives the same metrics and weights as an
  uninterrupted run (fresh LoRA on the base: reference = adapter disabled, adaptive KL controller).
"""

import pytest
import torch

from tests.helpers import assert_reused, copy_run, length_reward, make_recipe, make_stage, sft_lora_recipe
from tests.helpers import rows as _rows
from tests.helpers import run as _run
from tests.helpers import steps as _steps

pytestmark = pytest.mark.slow
# Recipes elsewhere name `tests.test_ppo:length_reward` (tests/test_shard.py): it is tests.helpers' (imported above).

KL_COEF = 0.1


def sevens_reward(prompts, completions):
    """Fraction of the completion's characters that are the digit 7 (0 for an empty completion), in [0, 1]."""
    return [sum(ch == "7" for ch in c) / max(len(c), 1) for c in completions]


def _recipe(output_dir, stages, peft="lora"):
    return make_recipe(stages, output_dir, name="ppo-test", peft=peft)  # LoRA: r 8, alpha 16, dropout 0.05


SFT_STAGE = {
    "name": "sft",
    "type": "sft",
    "dataset": {"path": "builtin:arith", "split": "sft", "size": 1280, "eval_size": 32},
    "train": {"epochs": 1, "per_device_batch_size": 32, "learning_rate": 2.0e-3, "max_length": 64, "logging_steps": 10},
}


def _ppo_stage(**kw):
    """A ppo stage (tests.helpers.make_stage: each key where the schema keeps it; `rollout=` and `train=` merge)."""
    keys = dict(
        dataset={"path": "builtin:arith", "split": "sft", "size": 512},
        reward_fn="tests.test_ppo:sevens_reward",
        max_steps=12,
        epochs=4,
        minibatch_size=16,
        learning_rate=1.0e-4,
        rollout={"batch_size": 32, "max_new_tokens": 6, "temperature": 1.0},
        ppo={"kl_coef": KL_COEF},
    )
    return make_stage("ppo", **{**keys, **kw})


def _mean_reward(model_dir, prompts, fn):
    """Mean `fn` reward of completions sampled (seed 0, temperature 1) from the full model in model_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlab.data import prompt_text
    from alignlab.generation import generate

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rollout = generate(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, generator_seed=0)
    return sum(fn([prompt_text(p) for p in prompts], rollout.texts)) / len(prompts)


def test_ppo_raises_reward_with_bounded_kl(tmp_path):
    from alignlab.builtin.tasks import generate_task

    raw = _recipe(tmp_path / "run", [SFT_STAGE, _ppo_stage()], peft="none")
    outputs = _run(raw)
    ppo_dir = tmp_path / "run" / "ppo"
    rows = _steps(ppo_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))

    # Before any update the policy IS the reference (a frozen copy of the SFT weights): the KL estimate is 0.
    assert abs(rows[0]["kl"]) < 1e-6
    # Same held-out prompts, same seed: SFT policy vs PPO policy.
    prompts = [r["prompt"] for r in generate_task("arith", "eval", 64, seed=1)]
    before = _mean_reward(outputs["sft"].path, prompts, sevens_reward)
    after = _mean_reward(outputs["ppo"].path, prompts, sevens_reward)
    print(f"sevens reward before {before:.3f} after {after:.3f}; kl per step {[round(r['kl'], 2) for r in rows]}")
    assert before < 0.3, before
    assert after > before + 0.3, (before, after)
    # KL bound: at the optimum of E[score] - kl_coef KL, kl_coef KL <= the score gain <= 1, so KL <= 1 / kl_coef
    # nats per response; PPO stays below it (measured about 2-4).
    assert max(r["kl"] for r in rows) < 1 / KL_COEF
    for key in ("entropy", "clipfrac", "approx_kl", "value_loss", "value_clipfrac", "response_length", "eos_rate"):
        assert all(key in r for r in rows), key
    assert rows[-1]["eos_rate"] > 0.9  # still stops after its answer

    # Output: full weights, the value head beside them.
    assert outputs["ppo"].kind == "full" and outputs["ppo"].base == outputs["sft"].path
    assert (ppo_dir / "value_head.safetensors").exists()


@pytest.mark.parametrize("recompute", [False, True], ids=["logprobs-from-sampling", "recompute-logprobs"])
def test_lora_reference_is_the_frozen_sft_adapter(tmp_path, recompute, sft_lora_run):
    """A PPO stage continuing an SFT adapter (the session's SFT-LoRA run, copied: its stage is reused as finished)."""
    rollout = {"batch_size": 8, "max_new_tokens": 4, "temperature": 1.0, "recompute_logprobs": recompute}
    ppo = _ppo_stage(max_steps=2, rollout=rollout, learning_rate=1.0e-2, minibatch_size=8)
    ppo["reward_fn"] = "tests.helpers:length_reward"
    copy_run(sft_lora_run, tmp_path / "run")
    outputs = _run(sft_lora_recipe(tmp_path / "run", ppo, name="ppo-test"))
    assert_reused(sft_lora_run, tmp_path / "run")
    rows = _steps(tmp_path / "run" / "ppo")
    assert abs(rows[0]["kl"]) < 1e-6  # policy = "ref" copy before the first update
    assert abs(rows[1]["kl"]) > 1e-4  # the policy moved and the copy did not train along
    out = outputs["ppo"]
    assert out.kind == "adapter" and out.base == outputs["sft"].base
    saved = tmp_path / "run" / "ppo" / "model"
    assert (saved / "adapter_model.safetensors").exists() and not (saved / "ref").exists()


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_qlora_ppo_trains_only_adapter_and_value_head(tmp_path, monkeypatch, compute_dtype):
    """QLoRA from the base: 4-bit NF4 backbone, reference = the same backbone with the adapter disabled (KL exactly
    0 before the first update), and only the LoRA weights and the value head train; the quantized base is never
    touched and the output is a plain PEFT adapter beside the value head. With QLoRA's default bfloat16 compute the
    quantized layers compute in bf16, where cached decoding drifts from a full forward: by default the rollout's
    log-probs then come from a full forward too (recompute_logprobs), else the KL at pi = ref is not 0."""
    import bitsandbytes as bnb

    from alignlab.builtin import resolve_model_name
    from alignlab.rl.ppo import PPOTrainer

    seen = {}
    real_step = PPOTrainer.train_step

    def recording_step(self):
        if self.step == 0:
            model = self.unwrapped
            seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
            seen["quantized"] = [m.weight.detach().clone() for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        out = real_step(self)
        seen["after"] = [m.weight.detach() for m in self.unwrapped.modules() if isinstance(m, bnb.nn.Linear4bit)]
        return out

    monkeypatch.setattr(PPOTrainer, "train_step", recording_step)
    ppo = _ppo_stage(
        input="base",
        reward_fn="tests.helpers:length_reward",
        max_steps=2,
        rollout={"batch_size": 8, "max_new_tokens": 4, "temperature": 1.0},
        train={"epochs": 2, "minibatch_size": 8, "learning_rate": 1.0e-3},
    )
    raw = _recipe(tmp_path / "run", [ppo], peft="qlora")
    raw["peft"]["quantization"] = {"compute_dtype": compute_dtype}
    outputs = _run(raw)

    rows = _steps(tmp_path / "run" / "ppo")
    assert abs(rows[0]["kl"]) < 1e-6  # policy = reference (adapter disabled) before the first update
    if compute_dtype == "bfloat16":  # both log-probs from the same full forward (the zero adapter adds exact zeros)
        assert rows[0]["kl"] == 0.0  # off the bf16 sampling pass: -2.4e-7 here, 0.0089 on SmolLM2 (8 tokens)
    assert abs(rows[1]["kl"]) > 1e-4  # the adapter moved the policy
    assert seen["trainable"] and all("lora_" in n or n.startswith("value_head.") for n in seen["trainable"])
    assert {"value_head.weight", "value_head.bias"} <= seen["trainable"]
    assert len(seen["quantized"]) == 7 * 4  # q k v o gate up down in the 4 layers of the tiny model
    assert all(torch.equal(a, b) for a, b in zip(seen["quantized"], seen["after"]))  # 4-bit base untouched
    assert all(w.dtype == torch.uint8 for w in seen["after"])
    out = outputs["ppo"]
    assert out.kind == "adapter" and out.base == resolve_model_name("builtin:tiny-llama")
    saved = tmp_path / "run" / "ppo"
    assert (saved / "model" / "adapter_model.safetensors").exists() and (saved / "value_head.safetensors").exists()


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    from alignlab.rl.ppo import PPOTrainer

    def recipe(name):
        stage = _ppo_stage(
            input="base",
            reward_fn="tests.helpers:length_reward",
            max_steps=4,
            save_steps=2,
            rollout={"batch_size": 8, "max_new_tokens": 4, "temperature": 1.0},
            train={"epochs": 2, "minibatch_size": 4, "learning_rate": 1.0e-3},
            ppo={"kl_coef": 0.05, "kl_target": 1.0},
        )
        return _recipe(tmp_path / name, [stage])

    _run(recipe("straight"))

    # Cut off during step 3, after the step-2 checkpoint; leave a half-written checkpoint behind as a crash would.
    real_step = PPOTrainer.train_step

    def crashing_step(self):
        if self.step == 2:
            (self.ckpt_dir / "step-3").mkdir()  # no completion marker: must be ignored
            raise RuntimeError("simulated crash")
        return real_step(self)

    monkeypatch.setattr(PPOTrainer, "train_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(recipe("resumed"))
    monkeypatch.setattr(PPOTrainer, "train_step", real_step)
    _run(recipe("resumed"), resume=True)

    straight = _rows(tmp_path / "straight" / "ppo")
    resumed = _rows(tmp_path / "resumed" / "ppo")
    steps = [r for r in straight if not r.get("final")]
    assert [r["step"] for r in steps] == [r["step"] for r in resumed if not r.get("final")] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        for key in a:
            if key not in ("train_runtime",) and not key.endswith("step_time"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert steps[-1]["kl_coef"] != 0.05  # the adaptive controller moved, and was restored on resume

    from safetensors.torch import load_file

    for name in ("model/adapter_model.safetensors", "value_head.safetensors"):
        a = load_file(str(tmp_path / "straight" / "ppo" / name))
        b = load_file(str(tmp_path / "resumed" / "ppo" / name))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _random_policy(tiny_model_path):
    """A randomly initialised 2-layer Llama on the built-in tokenizer: it rarely samples EOS, so responses run to
    max_new_tokens, and its prompts (different lengths) are left-padded."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


PROMPTS = [
    [{"role": "user", "content": "What is 3+4?"}],
    [{"role": "user", "content": "What is 1234+5678, and why does it matter to anyone at all?"}],
    "plain text prompt",
]


def test_sampling_pass_gives_the_forward_logprobs_values_and_entropy(tiny_model_path):
    """The rollout reads the policy's log-probs, entropy (SamplingRecorder) and values (the value head on each
    decoding step's state) off generate(); they must be what a forward over prompt + response computes, token by
    token, including left-padded rows."""
    from alignlab.generation import generate
    from alignlab.logprobs import token_logprobs
    from alignlab.losses import entropy_from_logits
    from alignlab.rl.ppo import PolicyWithValueHead, SamplingRecorder

    policy, tokenizer = _random_policy(tiny_model_path)
    model = PolicyWithValueHead(policy, 64)
    torch.nn.init.normal_(model.value_head.weight, std=0.5)
    torch.nn.init.constant_(model.value_head.bias, 0.3)
    recorder = SamplingRecorder(temperature=0.7)
    with torch.no_grad(), model.recording_values() as step_values:
        ro = generate(policy, tokenizer, PROMPTS, max_new_tokens=10, temperature=0.7, row_seeds=[5, 6, 7],
                      observe=recorder)  # fmt: skip
        logprobs, entropy = recorder.finish(ro.completion_ids)
        values = torch.stack(step_values, dim=1)
        logits, forward_values = model(ro.input_ids, ro.attention_mask, ro.completion_ids.shape[1], 0.7)
    assert ro.completion_ids.shape == (3, 10) and ro.prompt_mask[:, 0].sum() < 3  # long responses, left padding
    mask = ro.completion_mask.bool()
    assert mask.sum() >= 20
    torch.testing.assert_close(logprobs[mask], token_logprobs(logits, ro.completion_ids)[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy[mask], entropy_from_logits(logits)[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(values[mask], forward_values[mask], rtol=0, atol=1e-5)
    assert values.std() > 0.1  # the head is not trivially constant


def test_generation_ignores_the_models_generation_config(tiny_model_path):
    """transformers fills generate()'s unset options from the model's generation_config: a shipped repetition
    penalty or n-gram ban would make the samples come from another distribution than the log-probs PPO and the
    evaluation compute. alignlab's generate() samples with its own options only."""
    from alignlab.generation import generate

    policy, tokenizer = _random_policy(tiny_model_path)
    kwargs = dict(max_new_tokens=12, temperature=1.0, row_seeds=[1, 2, 3])
    plain = generate(policy, tokenizer, PROMPTS, **kwargs).completion_ids
    policy.generation_config.repetition_penalty = 50.0
    policy.generation_config.no_repeat_ngram_size = 1
    policy.generation_config.suppress_tokens = plain[:, 0].tolist()
    assert torch.equal(generate(policy, tokenizer, PROMPTS, **kwargs).completion_ids, plain)
    assert policy.generation_config.repetition_penalty == 50.0  # the model's own config is left as it was

    # Those options would have changed the samples (plain generate() with the same per-row sampler).
    from alignlab.generation import RowSeededSampler, encode_prompts

    ids, mask = encode_prompts(tokenizer, PROMPTS)
    out = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                          logits_processor=[RowSeededSampler([1, 2, 3], 1.0, 1.0)])  # fmt: skip
    assert not torch.equal(out[:, ids.shape[1] :], plain)


# ---------------------------------------------------------------------------- one rollout, read off the trainer


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses another mixed_precision once it is set: clear it
    before and after a test that builds its own Accelerator, so neither it nor later tests see another's."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


BATCH_PROMPTS = [[{"role": "user", "content": f"What is {i}+{2 * i + 1}?" + " Say it" * i}] for i in range(8)]


def _bare_trainer(tmp_path, policy, tokenizer, reference, accelerator, rollout=None, **ppo):
    """A PPOTrainer on 8 chat prompts (different lengths: left padding), scored by response length, without a
    recipe or a stage around it."""
    from alignlab.rl.ppo import PolicyWithValueHead, PPOTrainer
    from alignlab.stages.specs import PPOSpec

    spec = PPOSpec(
        name="ppo",
        dataset={"path": "builtin:arith"},
        reward_fn="tests.helpers:length_reward",
        train={"max_steps": 1, "epochs": 1, "minibatch_size": 8, "learning_rate": 1e-3},
        rollout={"batch_size": 8, "max_new_tokens": 8, "temperature": 1.0, **(rollout or {})},
        ppo=ppo,
    )
    return PPOTrainer(
        accelerator=accelerator,
        model=PolicyWithValueHead(policy, policy.config.hidden_size),
        tokenizer=tokenizer,
        prompts=BATCH_PROMPTS,
        score_fn=lambda prompts, texts: torch.tensor(length_reward(prompts, texts)),
        reference=reference,
        spec=spec,
        seed=0,
        stage_dir=tmp_path / "ppo",
    )


def _reference_of(model):
    """The stage's reference callable for a frozen model: (input_ids, attention_mask, C) -> [B, C] log-probs."""
    from alignlab.logprobs import completion_logits, token_logprobs

    model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def reference(input_ids, attention_mask, n):
        return token_logprobs(completion_logits(model, input_ids, attention_mask, n, 1.0), input_ids[:, -n:])

    return reference


def test_kl_penalty_in_the_reward_is_k1_whatever_kl_estimator_logs(tmp_path, tiny_model_path, fresh_accelerator_state):
    """`ppo.kl_estimator: k3` picks the LOGGED kl; the reward's per-token penalty stays -kl_coef k1 (a detached k3
    reward does not pull pi toward ref: tests/test_losses_ppo.py::test_k3_reward_has_no_restoring_gradient).
    Reference: a randomly initialised 2-layer model, far from the policy. With a zero value head (V = 0), gamma =
    lam = 1 and no whitening, GAE's return at the first token is the response's total reward:
    returns[:, 0] = score - kl_coef sum_t k1_t."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    ref_model, tokenizer = _random_policy(tiny_model_path)
    reference = _reference_of(ref_model)
    trainer = _bare_trainer(
        tmp_path, policy, tokenizer, reference, Accelerator(cpu=True),
        kl_estimator="k3", kl_coef=0.5, gamma=1.0, lam=1.0, whiten_advantages=False,
    )  # fmt: skip
    batch, stats = trainer.make_rollout(BATCH_PROMPTS, row_seeds=list(range(8)))
    n = batch.response.shape[1]
    ref_logprobs = reference(batch.input_ids, batch.attention_mask, n)
    k1 = ((batch.logprobs - ref_logprobs) * batch.mask).sum(1)  # [B], per response
    logr = ref_logprobs - batch.logprobs
    k3 = ((torch.expm1(logr) - logr) * batch.mask).sum(1)
    scores = batch.returns[:, 0] + 0.5 * k1  # the score the reward added on the last token
    # The two estimates differ enough to tell which one the reward holds: 0.5 x 0.1 is 5,000 times the tolerance below.
    assert (k3 - k1).abs().min() > 0.1
    torch.testing.assert_close(batch.returns[:, 0], scores - 0.5 * k1, rtol=0, atol=1e-5)
    assert stats["score"].item() == pytest.approx(scores.mean().item(), abs=1e-5)
    assert stats["non_score_reward"].item() == pytest.approx(-0.5 * k1.mean().item(), rel=1e-5)
    assert stats["kl"].item() == pytest.approx(k3.mean().item(), rel=1e-5)  # logged: k3, as asked


@pytest.mark.parametrize("recompute", [None, True], ids=["default", "recompute-logprobs"])
def test_bf16_rollout_and_update_share_one_precision(tmp_path, tiny_model_path, fresh_accelerator_state, recompute):
    """Under accelerate's mixed_precision bf16 (the shipped ddp.yaml) the PPO epochs' forward runs under autocast:
    sampling, the recomputed log-probs and the reference pass must too, and by default (recompute_logprobs null)
    the log-probs come from a full forward, as in the epochs (cached bf16 decoding drifts from it). Policy =
    reference (a frozen copy), one epoch of one minibatch: the ratio of that first minibatch is exactly 1
    (approx_kl 0, clipfrac 0) and the KL 0.
    Measured on these 8 prompts with the built-in tiny model, before: default (log-probs off the fp32 sampling
    pass) |new - old| mean 0.0056, max 0.034 nats per token, approx_kl 4.1e-5; recompute_logprobs true (already
    under autocast) ratio 1 but KL -0.0012 per response at pi = ref (fp32 reference). After, an explicit
    recompute_logprobs false (bf16 cached decoding) still drifts: mean 0.0012, max 0.029, KL 0.0037."""
    import copy

    from accelerate import Accelerator

    from alignlab.logprobs import token_logprobs

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    policy, tokenizer = _random_policy(tiny_model_path)  # long answers whatever the base model says to these prompts
    reference = _reference_of(copy.deepcopy(policy))
    trainer = _bare_trainer(tmp_path, policy, tokenizer, reference, accelerator, {"recompute_logprobs": recompute})
    batch, stats = trainer.make_rollout(BATCH_PROMPTS, row_seeds=list(range(8)))
    assert batch.mask.sum() >= 30 and batch.input_ids.shape[1] > 30
    with torch.no_grad():  # the PPO epochs' forward (the prepared model: autocast under bf16), before any step
        logits, _ = trainer.model(batch.input_ids, batch.attention_mask, batch.response.shape[1], 1.0)
    new = token_logprobs(logits, batch.response)
    assert (new - batch.logprobs)[batch.mask.bool()].abs().max().item() < 1e-6
    assert abs(stats["kl"].item()) < 1e-6
    out = trainer.optimize(batch, torch.Generator().manual_seed(0))  # 1 epoch x 1 minibatch: the first one
    assert out["approx_kl"] < 1e-10 and out["clipfrac"] == 0.0
