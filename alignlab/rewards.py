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
import math
import traceback
from dataclasses import replace
from typing import TYPE_CHECKING

from alignlab.contract import StageFailed, StageOutput
from alignlab.data import prompt_text

if TYPE_CHECKING:
    import torch

    from alignlab.recipe import Recipe


class RewardFnError(StageFailed):
    """A reward function raised, or returned something other than one finite number per completion."""


def load_reward_fn(ref: str):
    """Import `module:function` (only ever called for a function the recipe names), or look up `builtin:TASK`.
    Every failure is a ValueError that says why: no such module, a module that fails to import (a syntax error, an
    import it lacks, an exception), or no such function."""
    if ref.startswith("builtin:"):
        from alignlab.builtin.rewards import builtin_reward_fn

        return builtin_reward_fn(ref)
    return import_function(ref)


def load_revise_fn(ref: str):
    """A generate stage's `revise_fn`: `module:function` or `builtin:TASK` (a task that has one: constraints),
    called as fn(prompts, completions) -> one revised completion, or None (keep it), per completion."""
    if ref.startswith("builtin:"):
        from alignlab.builtin.rewards import builtin_revise_fn

        return builtin_revise_fn(ref)
    return import_function(ref)


def revise_texts(fn, prompts: list, texts: list[str], name: str) -> list[str]:
    """`texts` with each replaced by its revision where `fn` gives one (a string). Raises RewardFnError, naming the
    function and the completion, when `fn` raises or returns anything but one string or None per completion."""
    name = f"revise_fn {name}"
    try:
        revised = fn(prompts, list(texts))
    except Exception as e:
        raise _call_failed(name, e, "revised", len(texts), prompts[0] if prompts else "", "revise") from e
    if not isinstance(revised, list | tuple) or len(revised) != len(texts):
        got = f"{len(revised)} values" if isinstance(revised, list | tuple) else _short(revised)
        raise RewardFnError(f"{name} returned {got} for {len(texts)} completions: return one per completion")
    for j, r in enumerate(revised):
        if r is not None and not isinstance(r, str):
            raise RewardFnError(
                f"{name} returned {_short(r)} ({type(r).__name__}) for completion {j} ({_short(texts[j])}): return "
                f"a string (the revised completion) or None (keep it) per completion"
            )
    return [t if r is None else r for t, r in zip(texts, revised)]


def import_function(ref: str):
    """Import `package.module:function`; a ValueError that says why it cannot be (see load_reward_fn)."""
    if ":" not in ref:
        raise ValueError(f"'{ref}' must look like package.module:function")
    mod_name, fn_name = ref.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        missing = getattr(e, "name", None)
        if missing and not (mod_name + ".").startswith(missing + "."):  # the module exists; one of its imports fails
            raise ValueError(
                f"importing module '{mod_name}' failed: it imports '{missing}', which is not installed ({e})"
            ) from e
        raise ValueError(f"cannot import module '{mod_name}' ({e}); is it on PYTHONPATH?") from e
    except SyntaxError as e:
        raise ValueError(
            f"module '{mod_name}' has a syntax error at {e.filename}:{e.lineno}: {e.msg}. Fix the module."
        ) from e
    except Exception as e:  # the module's own code raised while importing
        raise ValueError(f"importing module '{mod_name}' raised {_raised(e)}. Fix the module.") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"module '{mod_name}' has no function '{fn_name}'")
    return fn


def load_reward_report(ref: str):
    """The task report that goes with reward function `ref`, or None: built-in tasks may have one
    (`builtin:constraints` -> alignlab.builtin.constraints.constraint_report); the evaluation adds its numbers."""
    from alignlab.builtin.rewards import builtin_reward_report

    return builtin_reward_report(ref)


def reward_fn_scores(
    fn, prompts: list, completions: list[str], name: str | None = None, allow_nonfinite: bool = False
) -> list[float]:
    """`fn` on completions, called with the prompts' user texts: one float per completion. Raises RewardFnError,
    naming the function and the completion, when it raises or returns anything but one finite number per
    completion (a NaN or a None would reach the loss as NaN). `allow_nonfinite`: nan / inf pass through, for a
    training loop whose own guard stops at them with the step and the last good checkpoint (PPO, GRPO)."""
    name = name or f"reward_fn {getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', fn)}"
    texts = [prompt_text(p) for p in prompts]
    completions = list(completions)
    try:
        values = fn(texts, list(completions))
    except Exception as e:
        raise _call_failed(name, e, "called", len(completions), texts[0] if texts else "", "score") from e
    try:  # a list, a tuple, a numpy array or a tensor: one number per completion
        listed = None if isinstance(values, str | bytes | dict) else list(values)
    except Exception:  # not a sequence: None, a number, a 0-d array
        listed = None
    if listed is None:
        raise RewardFnError(
            f"{name} returned {_short(values)} ({type(values).__name__}); it must return a list of floats, one per "
            f"completion"
        )
    values = listed
    if len(values) != len(completions):
        raise RewardFnError(
            f"{name} returned {len(values)} scores for {len(completions)} completions; it must return one per "
            f"completion"
        )
    scores = []
    for j, v in enumerate(values):
        try:  # a number, a numpy scalar, a one-element tensor, text such as "0.5"; a tensor on another device too
            score = float(v.detach().cpu() if hasattr(v, "detach") else v)
        except Exception:  # TypeError, ValueError, a tensor of several elements (RuntimeError), a __float__ raising
            score = None
        if score is None or not (math.isfinite(score) or allow_nonfinite):
            raise RewardFnError(
                f"{name} returned {_short(v)} for completion {j} ({_short(completions[j])} after prompt "
                f"{_short(texts[j])}); scores must be finite numbers. Return e.g. 0.0 for a completion it cannot score."
            )
        scores.append(score)
    return scores


def check_reward_fn(ref: str, dataset, recipe: Recipe, stage_type: str) -> None:
    """Load the reward function `ref` and call it once on the first two prompts of the stage's dataset, each with an
    empty and a short completion, so that a function that raises or returns the wrong thing fails at validation
    instead of after the stages before it have trained. Raises ValueError."""
    fn = load_reward_fn(ref)
    prompts = _trial_prompts(dataset, recipe, stage_type)
    try:
        if prompts:
            reward_fn_scores(fn, [p for p in prompts for _ in range(2)], ["", "42"] * len(prompts), name=ref)
    except RewardFnError as e:
        raise ValueError(f"tried on the first prompts of the dataset: {e}") from e


def check_revise_fn(ref: str, dataset, recipe: Recipe, stage_type: str) -> None:
    """A generate stage's `revise_fn`, loaded and tried as check_reward_fn tries a reward function (an empty and a
    short completion to each of the first two prompts), so that one that raises or returns the wrong thing fails
    at validation, not after the samples were drawn. Raises ValueError."""
    fn = load_revise_fn(ref)
    prompts = _trial_prompts(dataset, recipe, stage_type)
    try:
        if prompts:
            revise_texts(fn, [p for p in prompts for _ in range(2)], ["", "42"] * len(prompts), ref)
    except RewardFnError as e:
        raise ValueError(f"tried on the first prompts of the dataset: {e}") from e


def _trial_prompts(dataset, recipe: Recipe, stage_type: str) -> list | None:
    """The first two prompts of a stage's dataset to try a function on; None for hub data (not read offline) or data
    that cannot be read (the dataset's own check reports that)."""
    from alignlab.data import DataError, first_prompts

    try:
        return first_prompts(dataset, recipe, stage_type, 2)
    except DataError:
        return None


def _call_failed(name: str, e: Exception, did: str, n: int, first_prompt, verb: str) -> RewardFnError:
    """The error for a reward or revise function that raised: it cannot take (prompts, completions) at all (the call
    itself failed), or its own code raised on these completions (named by the place in the user's code)."""
    if len(traceback.extract_tb(e.__traceback__)) == 1:  # the call itself failed: not a (prompts, completions) fn
        returns = "list[float]" if verb == "score" else "list[str | None]"
        return RewardFnError(
            f"{name} cannot be called as fn(prompts: list[str], completions: list[str]) -> {returns}: "
            f"{type(e).__name__}: {e}"
        )
    return RewardFnError(
        f"{name} raised {_raised(e)} when {did} on {n} completions (first prompt {_short(first_prompt)}). A "
        f"{'reward' if verb == 'score' else 'revise'} function must {verb} any completion, even an empty or "
        f"malformed one."
    )


def _raised(e: BaseException) -> str:
    """'ValueError: message (at file.py:12)', the place being the last frame of the traceback (the user's code)."""
    frames = traceback.extract_tb(e.__traceback__)
    at = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    try:
        message = str(e)
    except Exception:  # an exception class whose message itself fails
        message = "(its message cannot be read)"
    return f"{type(e).__name__}: {message}{at}"


def _short(value, n: int = 60) -> str:
    try:
        text = repr(value)
    except Exception:  # a user's object whose repr fails
        text = f"<{type(value).__name__}>"
    return text if len(text) <= n else text[: n - 3] + "..."


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
        reward_fn_scores(fn, prompts, completions, name=f"reward_fn {ref}", allow_nonfinite=True), dtype=torch.float32
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
