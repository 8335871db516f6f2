"""Tests of the built-ins: the tiny model (build, cache, determinism, tokenizer, chat template) and the tasks."""

from __future__ import annotations

import hashlib
import json

import pytest

from alignlab.builtin import tasks as task_module
from alignlab.builtin.models import builtin_model_path, resolve_model_name
from alignlab.builtin.tasks import (
    BUILTIN_TASKS,
    arith_reward,
    flipped_indices,
    generate_task,
    write_task,
)
from alignlab.builtin.tiny_model import (
    BOS,
    BUILTIN_MODELS,
    EOS,
    IM_START,
    MARKER_FILE,
    PAD,
)

# --------------------------------------------------------------------------------------------------------------
# Tiny model
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tiny_model_path):
    from pathlib import Path

    return Path(tiny_model_path)  # the session's one build (conftest), so the suite pretrains it once


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_builtin_model_loads_and_matches_its_tokenizer(model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    assert model_dir.name == "tiny-llama-v2" and model_dir.parent.name == "builtin"
    assert (model_dir / "model.safetensors").exists() and (model_dir / MARKER_FILE).exists()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert 2_000_000 <= n_params <= 4_000_000, n_params
    assert model.config.max_position_embeddings == 512
    assert model.config.vocab_size == len(tokenizer)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    assert ids == {"bos": 1, "eos": 2, "pad": 0}
    for cfg in (model.config, model.generation_config):
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS, EOS, PAD)
    assert tokenizer.convert_tokens_to_ids(IM_START) == 3
    assert tokenizer.model_max_length == 512 and tokenizer.padding_side == "right"


def test_builtin_model_is_cached_and_deterministic(model_dir, tmp_path, monkeypatch):
    import dataclasses

    import torch

    from alignlab.builtin import tiny_model

    # Second call with the same cache returns the same directory without rebuilding.
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert builtin_model_path("tiny-llama", cache_dir=model_dir.parent.parent) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    # Two fresh builds (here through $ALIGNLAB_CACHE) give bit-identical files, pretraining included (a short
    # pretraining keeps this test fast; the code path is the same). Building leaves the global RNG alone.
    short = dataclasses.replace(tiny_model.BUILTIN_MODELS["tiny-llama"], pretrain_steps=5)
    monkeypatch.setitem(tiny_model.BUILTIN_MODELS, "tiny-llama", short)
    builds = []
    for sub in ("a", "b"):
        monkeypatch.setenv("ALIGNLAB_CACHE", str(tmp_path / sub))
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        builds.append(builtin_model_path("tiny-llama"))
        assert torch.equal(torch.rand(3), expected)
    assert builds[0] == tmp_path / "a" / "builtin" / "tiny-llama-v2"
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert _sha256(builds[0] / name) == _sha256(builds[1] / name), name
    # No temporary directories are left beside it (only the build's lock file, alignlab.cache.build_once).
    assert sorted(p.name for p in builds[1].parent.iterdir()) == [".tiny-llama-v2.lock", "tiny-llama-v2"]


def test_builtin_model_path_replaces_an_unmarked_directory(tmp_path, monkeypatch):
    # A directory without the marker (e.g. written by something else) is replaced, never built on top of.
    calls = []

    def fake_build(name, out_dir):
        calls.append(name)
        (out_dir / "model.safetensors").write_text("fake")

    monkeypatch.setattr("alignlab.builtin.tiny_model.build_builtin_model", fake_build)
    stale = tmp_path / "builtin" / "tiny-llama-v2"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("half-written")
    path = builtin_model_path("tiny-llama", cache_dir=tmp_path)
    assert path == stale and calls == ["tiny-llama"]
    assert sorted(p.name for p in path.iterdir()) == sorted([MARKER_FILE, "model.safetensors"])
    assert sorted(p.name for p in path.parent.iterdir()) == [".tiny-llama-v2.lock", "tiny-llama-v2"]


def test_resolve_model_name(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(
        "alignlab.builtin.tiny_model.build_builtin_model", lambda name, out_dir: (out_dir / "x").write_text("")
    )
    assert resolve_model_name("builtin:tiny-llama") == str(tmp_path / "builtin" / "tiny-llama-v2")
    assert resolve_model_name("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert resolve_model_name("/some/local/dir") == "/some/local/dir"
    with pytest.raises(ValueError, match="known builtin models: tiny-llama"):
        resolve_model_name("builtin:huge-llama")
    assert set(BUILTIN_MODELS) >= {"tiny-llama"}


# --------------------------------------------------------------------------------------------------------------
# Tokenizer and chat template
# --------------------------------------------------------------------------------------------------------------


def test_digits_are_single_tokens_and_text_round_trips(tokenizer):
    tokens = tokenizer.tokenize("What is 47+8? 1234567890")
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digit_tokens == list("4781234567890")
    for text in ["What is 47+8?", "Hello, world!\n  two spaces\ttab", "naïve café ☕ 日本", "", "  x  "]:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    # The tokenizer adds no special tokens of its own: the chat template writes the bos.
    assert tokenizer("hi")["input_ids"] == tokenizer.encode("hi", add_special_tokens=False)
    # Task strings tokenize compactly (the corpus includes them).
    assert len(tokenizer.tokenize("What is ")) <= 3


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 47+8?"},
    {"role": "assistant", "content": "55"},
    {"role": "user", "content": "And 12+9?"},
    {"role": "assistant", "content": "Sure: 21"},
]


def test_chat_template_text(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 47+8?<|im_end|>\n<|im_start|>assistant\n"
    )
    full = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert full == text + "55<|im_end|>\n"


def test_chat_template_tokens_and_assistant_mask(tokenizer):
    out = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.eos_token_id) == len(CONVERSATION)  # one <|im_end|> per message
    assert ids.count(tokenizer.pad_token_id) == 0
    # The mask covers exactly each assistant content and its <|im_end|> (not the "\n" after it).
    masked = [i for i, m in zip(ids, mask) if m]
    expected = []
    for content in ("55", "Sure: 21"):
        expected += tokenizer.encode(content, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert masked == expected
    spans = [i for i in range(1, len(mask)) if mask[i] != mask[i - 1]]
    assert len(spans) == 4  # two contiguous assistant spans
    # The prompt (with generation prompt) is a prefix of the full conversation: TRL relies on it.
    prompt = tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=True, add_generation_prompt=True)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    assert ids[: len(prompt)] == prompt
    assert tokenizer.decode(ids[len(prompt) :]) == "Sure: 21<|im_end|>\n"


# --------------------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------------------


def _prompts(rows):
    return {r["prompt"][0]["content"] for r in rows}


def test_task_rows_have_trl_formats():
    sft = generate_task("arith", "sft", 5)
    assert set(sft[0]) == {"prompt", "completion"}
    assert sft[0]["prompt"][0]["role"] == "user" and sft[0]["completion"][0]["role"] == "assistant"
    pref = generate_task("arith", "preference", 5)
    assert set(pref[0]) == {"prompt", "chosen", "rejected"}
    assert pref[0]["chosen"][0]["role"] == "assistant" and pref[0]["rejected"][0]["role"] == "assistant"
    ev = generate_task("arith", "eval", 5)
    assert set(ev[0]) == {"prompt", "answer"} and isinstance(ev[0]["answer"], str)
    sft_eval = generate_task("arith", "sft_eval", 5)
    for row in sft_eval:
        assert arith_reward([row["prompt"][0]["content"]], [row["completion"][0]["content"]]) == [1.0]
    assert "arith" in BUILTIN_TASKS
    with pytest.raises(ValueError, match="known tasks: arith"):
        generate_task("chess", "sft", 1)
    with pytest.raises(ValueError, match="known splits"):
        generate_task("arith", "test", 1)


def test_task_generation_is_deterministic_per_seed():
    for split in ("sft", "preference", "eval"):
        assert generate_task("arith", split, 50, seed=1) == generate_task("arith", split, 50, seed=1)
        assert generate_task("arith", split, 50, seed=1) != generate_task("arith", split, 50, seed=2)


def test_train_and_eval_prompts_are_disjoint():
    train = _prompts(generate_task("arith", "sft", 3000)) | _prompts(generate_task("arith", "preference", 3000))
    evals = _prompts(generate_task("arith", "eval", 500, seed=3)) | _prompts(generate_task("arith", "sft_eval", 500))
    assert not train & evals
    assert len(evals) == len(task_module._arith_pairs(eval_side=True)) > 50
    # A small eval set has no duplicate prompts.
    assert len(_prompts(generate_task("arith", "eval", 50))) == 50


def test_sft_demonstrations_are_mixed_quality():
    rows = generate_task("arith", "sft", 4000)
    rewards = arith_reward([r["prompt"][0]["content"] for r in rows], [r["completion"][0]["content"] for r in rows])
    right = sum(r in (1.0, 0.5) for r in rewards) / len(rows)  # the right number, with or without chatter
    chatty = sum(not r["completion"][0]["content"].isdigit() for r in rows) / len(rows)
    assert 0.5 <= right <= 0.65, right  # documented: about 57%
    assert 0.55 <= chatty <= 0.65, chatty  # documented: 60%
    assert 0.4 <= sum(rewards) / len(rows) <= 0.5  # imitating the demonstrator exactly earns under half the reward


def test_preference_chosen_beats_rejected_and_flips_are_exact():
    n = 1000
    clean = generate_task("arith", "preference", n, seed=7)
    prompts = [r["prompt"][0]["content"] for r in clean]
    chosen = arith_reward(prompts, [r["chosen"][0]["content"] for r in clean])
    rejected = arith_reward(prompts, [r["rejected"][0]["content"] for r in clean])
    assert all(c > r for c, r in zip(chosen, rejected))

    noisy = generate_task("arith", "preference", n, seed=7, flip_rate=0.4)
    flipped = [i for i in range(n) if noisy[i] != clean[i]]
    assert flipped == flipped_indices(n, seed=7, flip_rate=0.4)
    assert len(flipped) == 400
    for i in flipped:  # flipping swaps the pair and changes nothing else
        assert noisy[i]["chosen"] == clean[i]["rejected"] and noisy[i]["rejected"] == clean[i]["chosen"]
    with pytest.raises(ValueError, match="preference"):
        generate_task("arith", "sft", 10, flip_rate=0.1)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("55", 1.0),
        ("  55 \n", 1.0),  # surrounding whitespace is fine
        ("56", 0.4),  # off by 1
        ("53", 0.3),  # off by 2
        ("52", 0.2),  # off by 3
        ("45", 0.1),  # off by 10 (forgot the carry)
        ("-3", 0.1),
        ("55 apples", 0.5),  # right, but did not stop
        ("56\nWhat is", 0.2),  # off by 1 and did not stop
        ("The answer is 55", 0.0),  # must start with the number
        ("", 0.0),
        ("???", 0.0),
    ],
)
def test_arith_reward_values(completion, expected):
    assert arith_reward(["What is 47+8?"], [completion]) == [pytest.approx(expected)]


def test_arith_reward_accepts_conversational_inputs_and_checks_prompts():
    prompt = [{"role": "system", "content": "x"}, {"role": "user", "content": "What is 3+4?"}]
    assert arith_reward([prompt], [[{"role": "assistant", "content": "7"}]], answer=["7"]) == [1.0]
    with pytest.raises(ValueError, match="cannot find"):
        arith_reward(["Hello"], ["7"])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        arith_reward(["What is 1+1?", "What is 1+2?"], ["2"])


def test_write_task_writes_jsonl(tmp_path):
    path = write_task("arith", "preference", tmp_path / "sub" / "pref.jsonl", n=20, seed=3, flip_rate=0.5)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == generate_task("arith", "preference", 20, seed=3, flip_rate=0.5)
