"""Reward scoring, in one place for every stage that scores completions (PPO's rollouts, evaluation):
a Python reward function (`reward_fn: module:function`) or a reward model (a sequence-classification model
trained by the reward stage, or a directory).

A reward function is called as fn(prompt texts, completions) -> one float per completion, with each prompt's
last user message (alignlab.data.prompt_text). A reward model scores prompt + completion tokenised as TRL's
RewardTrainer tokenised its training pairs (the chat template over prompt + assistant turn; plain text + EOS
otherwise), read on the last non-padding token.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from typing import TYPE_CHECKING

from alignlab.contract import StageOutput
from alignlab.data import prompt_text

if TYPE_CHECKING:
    import torch

    from alignlab.recipe import Recipe


def load_reward_fn(ref: str):
    """Import `module:function` (only ever called for a function the recipe names), or look up `builtin:TASK`."""
    if ref.startswith("builtin:"):
        from alignlab.builtin.rewards import builtin_reward_fn

        return builtin_reward_fn(ref)
    if ":" not in ref:
        raise ValueError(f"'{ref}' must look like package.module:function")
    mod_name, fn_name = ref.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import module '{mod_name}' ({e}); is it on PYTHONPATH?") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"module '{mod_name}' has no function '{fn_name}'")
    return fn


def load_reward_report(ref: str):
    """The task report that goes with reward function `ref`, or None: built-in tasks may have one
    (`builtin:constraints` -> alignlab.builtin.constraints.constraint_report); the evaluation adds its numbers."""
    from alignlab.builtin.rewards import builtin_reward_report

    return builtin_reward_report(ref)


def reward_fn_scores(fn, prompts: list, completions: list[str], name: str = "reward_fn") -> list[float]:
    """`fn` on completions, called with the prompts' user texts: one float per completion."""
    values = fn([prompt_text(p) for p in prompts], list(completions))
    if len(values) != len(completions):
        raise ValueError(f"{name} returned {len(values)} scores for {len(completions)} completions")
    return [float(v) for v in values]


def reward_model_ids(tokenizer, prompt, completion) -> list[int]:
    """A conversation tokenised as TRL's RewardTrainer tokenises its pairs: the chat template over prompt +
    assistant turn; plain text + EOS otherwise. An empty prompt with a chat completion is an implicit prompt (the
    conversation is all in `completion`)."""
    if isinstance(completion, str) and isinstance(prompt, list):
        completion = [{"role": "assistant", "content": completion}]
    if isinstance(completion, list) and tokenizer.chat_template is not None:
        messages = (prompt or []) + completion
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    text = (prompt_text(prompt) if prompt else "") + prompt_text(completion) + tokenizer.eos_token
    return tokenizer(text)["input_ids"]


def reward_model_scores(model, tokenizer, prompts: list, completions: list, batch_size: int) -> torch.Tensor:
    """[N] float32 scores of a sequence-classification reward model, read on each conversation's last
    non-padding token (right padding: positions from 0 without position_ids)."""
    import torch

    rows = [reward_model_ids(tokenizer, p, c) for p, c in zip(prompts, completions)]
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    scores = []
    try:
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                enc = tokenizer.pad({"input_ids": rows[i : i + batch_size]}, return_tensors="pt").to(device)
                scores.append(model(**enc, use_cache=False).logits[:, 0].float().cpu())
    finally:
        tokenizer.padding_side = side
    return torch.cat(scores)


def reward_model_scorer(model, tokenizer, batch_size: int):
    """(prompts, completions) -> [N] scores of a reward model (PPO's score function)."""
    return lambda prompts, completions: reward_model_scores(model, tokenizer, prompts, completions, batch_size)


def reward_fn_scorer(ref: str):
    """(prompts, completions) -> [N] float32 scores of the reward function `module:function` (PPO's score function)."""
    import torch

    fn = load_reward_fn(ref)
    return lambda prompts, completions: torch.tensor(
        reward_fn_scores(fn, prompts, completions, name=f"reward_fn {ref}"), dtype=torch.float32
    )


def load_reward_model(recipe: Recipe, source: StageOutput | str, *, quantize: bool | None = None):
    """A reward model and its tokenizer from a reward stage's output or a directory (full weights saved with
    AutoModelForSequenceClassification, or a PEFT adapter whose adapter_config.json names its base), frozen, on this
    process's device. Returns (model, tokenizer); the model is a PeftModel when the source is an adapter. `quantize`
    None follows the recipe's QLoRA setting for the base weights."""
    from alignlab.contract import checkpoint_output
    from alignlab.models import load_frozen_model, load_tokenizer, output_tokenizer_dir

    if isinstance(source, StageOutput):
        tokenizer = load_tokenizer(recipe, output_tokenizer_dir(recipe, source))  # saved beside its weights
    else:  # a reward model from elsewhere: its own tokenizer, not the recipe's
        from transformers import AutoTokenizer

        path = str(recipe.resolve_path(source))
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        source = checkpoint_output(path)
    model = load_frozen_model(recipe, replace(source, head="sequence_classification"), quantize=quantize)
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id  # the score is read on the last non-pad token
    return model, tokenizer
