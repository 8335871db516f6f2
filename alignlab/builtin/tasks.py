"""Built-in synthetic tasks with an exact, programmatic reward.

The quickstart needs a task where "alignment made the model better" is a number that means something, that a
~3M-parameter model learns in minutes on a laptop CPU, and that needs no download. The built-in task is `arith`:

    user:      What is 47+8?
    assistant: 55

Operands: `a` in [0, 99], `b` in [1, 9]. Half of the problems need a carry (`a % 10 + b >= 10`).

Splits (all rows are conversational, in the formats TRL expects):

- `sft`: prompt/completion demonstrations from a sloppy demonstrator, sloppy in two ways. Its numbers: on
  problems without a carry it is right 80% of the time (else off by one); on problems WITH a carry it forgets the
  carry 60% of the time (answers `a + b - 10`), is right 30% and off by one 10% (55% right overall). Its
  manners: 60% of the time it keeps talking after the number (". I hope this helps!", ...), which the reward
  halves. Both mistakes are the mode of what it does, so a model that imitates it well (greedy decoding picks the
  mode) keeps talking and gets carry problems wrong: SFT alone reaches only part of the reward.
- `preference`: prompt/chosen/rejected pairs ranked by the true reward: reward(chosen) > reward(rejected) for
  every row. Chosen answers stop after the number. Rejected answers are the demonstrator's mistakes: 30% the
  chosen answer followed by chatter; otherwise a wrong number (forgotten carry, off by one or two, off by ten) with
  chatter half of the time, or no number at all. About 60% of the pairs differ in manners (learnable by a tiny
  model in a few dozen steps), the rest only in arithmetic (hard for it), so preference optimisation fixes what
  SFT imitated, and held-out accuracy has room above what manners alone explain. `flip_rate` swaps chosen and
  rejected in exactly `round(flip_rate * n)` rows (label noise for robust-DPO experiments); which rows is given by
  `flipped_indices`, not by an extra column, so the rows stay a plain TRL preference dataset.
- `unpaired` (and `unpaired_eval`, on held-out prompts): the preference pairs as binary feedback for KTO, one row
  per answer: prompt/completion/label, label true for the chosen answer and false for the rejected one, both rows
  of a pair kept, in a seeded shuffled order (n rows from ceil(n / 2) pairs).
- `eval`: prompt + reference `answer` (a string), for reward-based evaluation.
- `sft_eval`: the eval prompts as prompt/completion rows with CORRECT completions (for eval loss / perplexity).
- `preference_eval`: preference pairs (as `preference`) on the eval prompts, for held-out pair accuracy.

Train and eval problems are disjoint by construction: each operand pair (a, b) is assigned to the eval side iff a
hash of "a+b" falls in 1 of 10 buckets (83 of the 900 pairs; `arith_stats()` computes the card's numbers),
independent of the seed. `sft` and `preference` only draw from the train side; `eval`, `sft_eval` and
`preference_eval` only from the eval side.

Reward (`arith_reward`, in [0, 1]), from the leading integer of the completion after stripping whitespace:

    no leading integer                       0.0
    exactly right                            1.0
    off by d >= 1                            max(0.1, 0.5 - 0.1 * d)   (d=1: 0.4, d=2: 0.3, d=3: 0.2, d>=4: 0.1)
    any text after the integer               the above times 0.5       (e.g. "55 apples" -> 0.5)

A second task, `constraints` (instructions with verifiable constraints, for real small instruct models), lives in
alignlab.builtin.constraints (its demonstration and preference splits in alignlab.builtin.constraint_demos) and is
registered here.

This module imports only the standard library.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alignlab.builtin import constraint_demos as _constraint_demos
from alignlab.builtin import constraints as _constraints
from alignlab.builtin import prose as _prose

__all__ = [
    "BUILTIN_TASKS",
    "Task",
    "arith_reward",
    "arith_stats",
    "flipped_indices",
    "generate_task",
    "get_task",
    "task_corpus",
    "write_task",
]

SPLITS = ("sft", "preference", "eval", "sft_eval", "preference_eval", "unpaired", "unpaired_eval")

# --------------------------------------------------------------------------------------------------------------
# arith: the problems
# --------------------------------------------------------------------------------------------------------------

ARITH_A_RANGE = (0, 99)  # inclusive
ARITH_B_RANGE = (1, 9)  # inclusive
ARITH_EVAL_BUCKETS = 10  # 1 bucket in 10 is held out for evaluation
ARITH_PROMPT = "What is {a}+{b}?"
_PROMPT_RE = re.compile(r"(-?\d+)\s*\+\s*(-?\d+)")
_LEADING_INT_RE = re.compile(r"[+-]?\d+")
ARITH_CHATTER_RATE = 0.6  # how often the demonstrator keeps talking after its answer
ARITH_CHATTER = (". I hope this helps!", ". That was easy.", ". Let me know if you need more.")


def _is_eval_pair(a: int, b: int) -> bool:
    # sha256 rather than hash(): str hashes are salted per process, and the split must be the same everywhere.
    digest = hashlib.sha256(f"{a}+{b}".encode()).digest()
    return digest[0] % ARITH_EVAL_BUCKETS == 0


def _arith_pairs(eval_side: bool) -> list[tuple[int, int]]:
    return [
        (a, b)
        for a in range(ARITH_A_RANGE[0], ARITH_A_RANGE[1] + 1)
        for b in range(ARITH_B_RANGE[0], ARITH_B_RANGE[1] + 1)
        if _is_eval_pair(a, b) == eval_side
    ]


def _has_carry(a: int, b: int) -> bool:
    return a % 10 + b >= 10


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def _assistant(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


def _off_by(truth: int, rng: random.Random, d: int) -> int:
    # Answers stay non-negative so that every wrong answer is still a plausible one.
    if truth - d < 0:
        return truth + d
    return truth + d if rng.random() < 0.5 else truth - d


def _demonstration(a: int, b: int, rng: random.Random) -> str:
    """The sloppy demonstrator of the `sft` split (see the module docstring for the rates)."""
    truth = a + b
    u = rng.random()
    if _has_carry(a, b):
        if u < 0.3:
            answer = truth
        elif u < 0.9:
            answer = truth - 10  # forgot the carry
        else:
            answer = _off_by(truth, rng, 1)
    else:
        answer = truth if u < 0.8 else _off_by(truth, rng, 1)
    return _maybe_chatter(str(answer), rng, ARITH_CHATTER_RATE)


def _maybe_chatter(answer: str, rng: random.Random, rate: float) -> str:
    # Every chatter starts with ".", so a model that imitates the demonstrator keeps talking after the number
    # (greedy decoding picks "." over the end of the turn), which the reward halves.
    return answer + rng.choice(ARITH_CHATTER) if rng.random() < rate else answer


def _preference_pair(a: int, b: int, rng: random.Random) -> tuple[str, str]:
    """(chosen, rejected) answer texts, with reward(chosen) > reward(rejected)."""
    truth = a + b
    # Chosen: right 85% of the time, else off by one, and it stops after the number; rejected is strictly worse.
    chosen = str(truth if rng.random() < 0.85 else _off_by(truth, rng, 1))
    while True:
        u = rng.random()
        if u < 0.3:
            rejected = chosen + rng.choice(ARITH_CHATTER)  # the same answer, but it did not stop
        else:
            u = rng.random()
            if _has_carry(a, b) and u < 0.6:
                rejected = str(truth - 10)  # the demonstrator's typical mistake
            elif u < 0.75:
                rejected = str(_off_by(truth, rng, rng.choice((1, 2))))
            elif u < 0.9:
                rejected = str(truth + 10)
            else:
                rejected = rng.choice(("?", "I don't know.", "many"))
            if rejected[0].isdigit():
                rejected = _maybe_chatter(rejected, rng, 0.5)
        if _arith_score(truth, rejected) < _arith_score(truth, chosen):
            return chosen, rejected


def _arith_rows(split: str, n: int, seed: int) -> list[dict]:
    if split in ("unpaired", "unpaired_eval"):
        return _arith_unpaired(split.replace("unpaired", "preference"), n, seed)
    rng = random.Random(f"arith/{split}/{seed}")
    if split in ("eval", "sft_eval", "preference_eval"):
        pool = _arith_pairs(eval_side=True)
        # Without replacement while the pool lasts, so a small eval set has no duplicates.
        pairs = []
        while len(pairs) < n:
            pairs += rng.sample(pool, min(len(pool), n - len(pairs)))
    else:
        pool = _arith_pairs(eval_side=False)
        pairs = [rng.choice(pool) for _ in range(n)]

    rows = []
    for a, b in pairs:
        prompt = _user(ARITH_PROMPT.format(a=a, b=b))
        if split == "sft":
            rows.append({"prompt": prompt, "completion": _assistant(_demonstration(a, b, rng))})
        elif split in ("preference", "preference_eval"):  # preference_eval: held-out prompts
            chosen, rejected = _preference_pair(a, b, rng)
            rows.append({"prompt": prompt, "chosen": _assistant(chosen), "rejected": _assistant(rejected)})
        elif split == "eval":
            rows.append({"prompt": prompt, "answer": str(a + b)})
        else:  # sft_eval
            rows.append({"prompt": prompt, "completion": _assistant(str(a + b))})
    return rows


def _arith_unpaired(pair_split: str, n: int, seed: int) -> list[dict]:
    """n unpaired feedback rows from the pairs of `pair_split`: chosen -> label True, rejected -> label False."""
    rows = []
    for pair in _arith_rows(pair_split, (n + 1) // 2, seed):
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    # Shuffled, so that a batch is not an alternation of one prompt's good and bad answer (KTO's KL estimate pairs
    # each prompt with its batch neighbour's answer, which should be an answer to another prompt).
    random.Random(f"arith/{pair_split}/unpaired/{seed}").shuffle(rows)
    return rows[:n]


# --------------------------------------------------------------------------------------------------------------
# arith: the reward
# --------------------------------------------------------------------------------------------------------------


def _arith_score(truth: int, completion: str) -> float:
    text = completion.strip()
    match = _LEADING_INT_RE.match(text)
    if match is None:
        return 0.0
    d = abs(int(match.group()) - truth)
    score = 1.0 if d == 0 else max(0.1, 0.5 - 0.1 * d)
    if text[match.end() :].strip():
        score *= 0.5  # trailing text: the model did not stop after its answer
    return round(score, 6)  # 0.5 - 0.1 * 3 is 0.19999999999999998 in floats


def _prompt_text(prompt: str | list[dict[str, str]]) -> str:
    # TRL hands conversational prompts over as message lists; accept those too (last user message).
    if isinstance(prompt, str):
        return prompt
    user_turns = [m["content"] for m in prompt if m.get("role") == "user"]
    if not user_turns:
        raise ValueError(f"arith_reward: prompt has no user message: {prompt!r}")
    return user_turns[-1]


def arith_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """Exact reward of the `arith` task, in [0, 1] (table in the module docstring).

    prompts: the user prompt text ("What is 47+8?") or a conversational prompt (list of messages); the operands
        are parsed from it, so the reward needs no hidden state.
    completions: the generated assistant text, special tokens already stripped; may also be a list of messages.
    kwargs: ignored (TRL passes extra dataset columns).
    """
    del kwargs
    if len(prompts) != len(completions):
        raise ValueError(f"arith_reward: {len(prompts)} prompts but {len(completions)} completions")
    rewards = []
    for prompt, completion in zip(prompts, completions):
        text = _prompt_text(prompt)
        match = _PROMPT_RE.search(text)
        if match is None:
            raise ValueError(f"arith_reward: cannot find 'a+b' in prompt {text!r}; is this an arith prompt?")
        truth = int(match.group(1)) + int(match.group(2))
        if not isinstance(completion, str):
            completion = completion[-1]["content"]
        rewards.append(_arith_score(truth, completion))
    return rewards


def arith_stats(n: int = 20_000, seed: int = 0) -> dict:
    """The numbers data_cards/arith.md quotes, computed from the code (scripts/gen_docs.py writes them into the
    card; tests/test_docs.py checks it). Counts are exact; rates are over `n` rows of a split at `seed`, next to
    the rate the demonstrator's probabilities give (`*_expected`)."""
    train, held_out = _arith_pairs(eval_side=False), _arith_pairs(eval_side=True)
    carry = sum(_has_carry(a, b) for a, b in train) / len(train)
    sft = _arith_rows("sft", n, seed)
    answers = [_assistant_text(r["completion"]) for r in sft]
    truths = [int(x) + int(y) for x, y in (_PROMPT_RE.search(_prompt_text(r["prompt"])).groups() for r in sft)]
    rewards = arith_reward([r["prompt"] for r in sft], answers)
    leading = [_LEADING_INT_RE.match(a) for a in answers]
    pairs = _arith_rows("preference", n, seed)
    chosen = [_assistant_text(r["chosen"]) for r in pairs]
    rejected = [_assistant_text(r["rejected"]) for r in pairs]
    return {
        "pairs": len(train) + len(held_out),
        "eval_pairs": len(held_out),
        "train_pairs": len(train),
        "eval_buckets": ARITH_EVAL_BUCKETS,
        "train_carry_share": carry,
        "rows": n,
        "seed": seed,
        "sft_right": sum(int(m.group()) == t for m, t in zip(leading, truths)) / n,
        "sft_right_expected": (1 - carry) * 0.8 + carry * 0.3,
        "sft_chatter": sum(bool(a[m.end() :].strip()) for a, m in zip(answers, leading)) / n,
        "sft_chatter_expected": ARITH_CHATTER_RATE,
        "sft_mean_reward": sum(rewards) / n,
        "sft_full_reward": sum(r == 1.0 for r in rewards) / n,
        # The rejected answer is the chosen one plus chatter: the pair differs in manners only.
        "pairs_manners_only": sum(r.startswith(c) and r != c for c, r in zip(chosen, rejected)) / n,
        # The rejected answer keeps talking after a number (with a wrong number or the right one).
        "pairs_rejected_chatters": sum(_chatters(r) for r in rejected) / n,
    }


def _assistant_text(messages: list[dict[str, str]]) -> str:
    return messages[-1]["content"]


def _chatters(text: str) -> bool:
    match = _LEADING_INT_RE.match(text.strip())
    return match is not None and bool(text.strip()[match.end() :].strip())


def _arith_corpus(rng: random.Random, n: int) -> list[str]:
    """Task strings for the tokenizer corpus: prompts and answers, so that they tokenize compactly."""
    pairs = _arith_pairs(eval_side=False) + _arith_pairs(eval_side=True)
    lines = []
    for _ in range(n):
        a, b = rng.choice(pairs)
        lines.append(f"{ARITH_PROMPT.format(a=a, b=b)}\n{a + b}")
    return lines


# --------------------------------------------------------------------------------------------------------------
# Registry and public API
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A built-in task: how to generate its splits and how to score completions.

    rows(split, n, seed) -> rows without label noise; reward_path is what a recipe writes to use the reward
    (`builtin:NAME` works too); splits: the splits `rows` knows; report(prompts, completions) -> a dict of the
    task's own evaluation numbers (strict_accuracy, instruction_accuracy, per_kind), for tasks that have one.
    """

    name: str
    description: str
    rows: Callable[[str, int, int], list[dict]]
    reward: Callable[..., list[float]] | None  # None: a dataset to measure on, with no reward (builtin:prose)
    reward_path: str | None
    corpus: Callable[[random.Random, int], list[str]]
    splits: tuple[str, ...] = SPLITS
    report: Callable[[list, list], dict] | None = None


BUILTIN_TASKS: dict[str, Task] = {
    "arith": Task(
        name="arith",
        description="a+b with a in [0, 99], b in [1, 9]; sloppy demonstrations that often forget the carry",
        rows=_arith_rows,
        reward=arith_reward,
        reward_path="alignlab.builtin.tasks:arith_reward",
        corpus=_arith_corpus,
    ),
    "constraints": Task(
        name="constraints",
        description="short requests with 1-3 verifiable constraints (IFEval-style); reward = fraction satisfied",
        rows=_constraint_demos.rows,
        reward=_constraints.constraints_reward,
        reward_path="alignlab.builtin.constraints:constraints_reward",
        corpus=_constraints._corpus,
        splits=_constraint_demos.SPLITS,
        report=_constraints.constraint_report,
    ),
    "prose": Task(
        name="prose",
        description="a fixed held-out English text (24 paragraphs) for NLL per token: capability loss",
        rows=_prose.prose_rows,
        reward=None,
        reward_path=None,
        corpus=_prose._corpus,
        splits=_prose.PROSE_SPLITS,
    ),
}


def get_task(name: str) -> Task:
    if name not in BUILTIN_TASKS:
        raise ValueError(f"unknown builtin task {name!r}; known tasks: {', '.join(sorted(BUILTIN_TASKS))}")
    return BUILTIN_TASKS[name]


def flipped_indices(n: int, seed: int = 0, flip_rate: float = 0.0) -> list[int]:
    """Sorted indices of the preference rows whose chosen/rejected `generate_task` swaps: round(flip_rate * n)."""
    if not 0.0 <= flip_rate <= 1.0:
        raise ValueError(f"flip_rate must be in [0, 1], got {flip_rate}")
    rng = random.Random(f"flip/{seed}")  # separate stream: the pairs themselves do not depend on flip_rate
    return sorted(rng.sample(range(n), round(flip_rate * n)))


def generate_task(name: str, split: str, n: int, seed: int = 0, flip_rate: float = 0.0) -> list[dict]:
    """n rows of `split` of builtin task `name`, deterministic in (name, split, n, seed, flip_rate).

    flip_rate applies to split "preference" only (see `flipped_indices`).
    """
    task = get_task(name)
    if split not in task.splits:
        raise ValueError(f"unknown split {split!r} for task {name!r}; known splits: {', '.join(task.splits)}")
    if flip_rate and split != "preference":
        raise ValueError(f"flip_rate applies to the 'preference' split only, not {split!r}")
    rows = task.rows(split, n, seed)
    for i in flipped_indices(n, seed, flip_rate) if flip_rate else []:
        rows[i]["chosen"], rows[i]["rejected"] = rows[i]["rejected"], rows[i]["chosen"]
    return rows


def write_task(name: str, split: str, path: str | Path, n: int, seed: int = 0, flip_rate: float = 0.0) -> Path:
    """Write `generate_task(...)` to `path` as JSON lines; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in generate_task(name, split, n, seed, flip_rate):
            f.write(json.dumps(row) + "\n")
    return path


def task_corpus(seed: int = 0, n_per_task: int = 2000) -> list[str]:
    """Strings from every builtin task, for training the builtin tokenizer."""
    rng = random.Random(f"corpus/{seed}")
    return [line for name in sorted(BUILTIN_TASKS) for line in BUILTIN_TASKS[name].corpus(rng, n_per_task)]
