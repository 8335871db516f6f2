"""Built-in reward functions by name: a recipe may write `reward_fn: builtin:arith` or `reward_fn: builtin:constraints`
instead of the `module:function` path (which keeps working). `load_reward_fn` (alignlab.validate) looks names up
here, so the PPO stage, the eval stage and recipe validation all accept them.

Each is the exact reward of the built-in task of the same name (alignlab.builtin.tasks.BUILTIN_TASKS), called as
`fn(prompts: list[str], completions: list[str]) -> list[float]`.
"""

from __future__ import annotations

from collections.abc import Callable

from alignlab.builtin.tasks import BUILTIN_TASKS

BUILTIN_PREFIX = "builtin:"
BUILTIN_REWARDS: dict[str, Callable[..., list[float]]] = {n: t.reward for n, t in BUILTIN_TASKS.items() if t.reward}


def builtin_reward_fn(ref: str) -> Callable[..., list[float]]:
    """The reward function named `builtin:NAME`; a ValueError naming the known ones otherwise."""
    name = ref[len(BUILTIN_PREFIX) :] if ref.startswith(BUILTIN_PREFIX) else ref
    if name not in BUILTIN_REWARDS:
        known = ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_REWARDS))
        raise ValueError(f"unknown built-in reward function '{ref}'; known: {known} (or write package.module:function)")
    return BUILTIN_REWARDS[name]


def builtin_reward_report(ref: str) -> Callable[..., dict] | None:
    """The evaluation report of the built-in task behind reward `builtin:NAME` (or its module:function path), if it
    has one (builtin:constraints: strict and per-kind accuracy); None otherwise."""
    for name, task in BUILTIN_TASKS.items():
        if ref in (BUILTIN_PREFIX + name, task.reward_path):
            return task.report
    return None


def builtin_revise_fn(ref: str) -> Callable[..., list]:
    """The revise function (a generate stage's `revise_fn`) of built-in task `builtin:NAME`; a ValueError naming
    the tasks that have one otherwise."""
    from alignlab.builtin.constraint_demos import revise

    revisers = {"constraints": revise}
    name = ref[len(BUILTIN_PREFIX) :] if ref.startswith(BUILTIN_PREFIX) else ref
    if name not in revisers:
        known = ", ".join(BUILTIN_PREFIX + n for n in sorted(revisers))
        raise ValueError(f"no built-in revise function '{ref}'; known: {known} (or write package.module:function)")
    return revisers[name]
