"""Data builders shared by the stages: one call gives a stage its train and eval datasets."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from alignlab.data.formats import (
    CANONICAL_COLUMNS,
    DataError,
    canonicalize,
    flip_labels,
    load_raw,
    prompt_text,
    resolve_source,
    row_place,
)
from alignlab.stages.registry import stage_record

if TYPE_CHECKING:
    from datasets import Dataset

    from alignlab.recipe import DatasetSpec, Recipe

__all__ = [
    "CANONICAL_COLUMNS",
    "DataError",
    "build_datasets",
    "check_dataset",
    "data_taken",
    "flip_labels",
    "prompt_text",
]

_taken: tuple[object, list[dict]] | None = None  # (the stage spec, what its build_datasets calls gave): data_taken


@contextlib.contextmanager
def data_taken(stage_spec) -> Iterator[list[dict]]:
    """While the body runs stage `stage_spec`, collect what each `build_datasets` call gives it: one entry per
    dataset, {key (the stage's key holding it: dataset, preference_dataset, ...), path, split, source (local,
    builtin, hub, stage: builtin and stage data are generated), rows, eval_rows, flipped (labels flipped)}. The
    pipeline keeps the list in the stage's record, so a model card can say what the model was trained on."""
    global _taken
    outer, _taken = _taken, (stage_spec, [])
    try:
        yield _taken[1]
    finally:
        _taken = outer


def _note_taken(spec: DatasetSpec, recipe: Recipe | None, train: Dataset, eval_ds: Dataset | None, flipped: int):
    if _taken is None:
        return
    stage_spec, taken = _taken
    keys = [k for k in stage_record(stage_spec.type).datasets if getattr(stage_spec, k, None) is not None]
    key = next((k for k in keys if getattr(stage_spec, k) is spec), None)
    key = key or next((k for k in keys if getattr(stage_spec, k) == spec), None)
    entry = {
        "key": key,
        "path": spec.path,
        "split": spec.split,
        "source": resolve_source(spec.path, recipe).kind,
        "rows": len(train),
        "eval_rows": None if eval_ds is None else len(eval_ds),
        "flipped": flipped,
    }
    if entry not in taken:
        taken.append(entry)


def build_datasets(
    spec: DatasetSpec, recipe: Recipe | None, stage_type: str, chat: bool, *, with_eval: bool = True
) -> tuple[Dataset, Dataset | None]:
    """Train and (optional) eval datasets in canonical columns for a stage of `stage_type`.

    Eval data: `eval_path`/`eval_split` when given, builtin tasks' held-out split, else `eval_fraction` of the
    training rows (seeded). Label flips (`flip_rate`) touch the training rows only.
    """
    seed = spec.seed if spec.seed is not None else (recipe.seed if recipe else 0)
    where = _where(spec, recipe)
    train = canonicalize(load_raw(spec, recipe), spec, stage_type, where, chat)
    eval_ds = None
    eval_where = _eval_where(spec, recipe)
    if with_eval:
        if spec.eval_path or spec.eval_split or resolve_source(spec.path, recipe).kind == "builtin":
            eval_ds = canonicalize(load_raw(spec, recipe, held_out=True), spec, stage_type, eval_where, chat)
        elif spec.eval_fraction > 0:
            parts = train.train_test_split(test_size=spec.eval_fraction, seed=seed)
            train, eval_ds = parts["train"], parts["test"]
    if spec.max_samples:
        train = train.select(range(min(spec.max_samples, len(train))))
    if eval_ds is not None and spec.eval_max_samples:
        eval_ds = eval_ds.select(range(min(spec.eval_max_samples, len(eval_ds))))
    flipped: list[int] = []
    if spec.flip_rate > 0:
        if "chosen" not in train.column_names:
            raise DataError(f"{where}: flip_rate applies to preference data (chosen/rejected), not to this dataset")
        weights = near_tie_weights(train, spec, recipe, where) if spec.flip_mode == "near_tie" else None
        train, flipped = flip_labels(train, spec.flip_rate, seed, weights)
    _note_taken(spec, recipe, train, eval_ds, len(flipped))
    if _reads_pairs_as_feedback(train, stage_type, where):
        train = unpair(train, seed)
    if eval_ds is not None and _reads_pairs_as_feedback(eval_ds, stage_type, eval_where):
        eval_ds = unpair(eval_ds, seed)
    return train, eval_ds


def _reads_pairs_as_feedback(ds: Dataset, stage_type: str, where: str) -> bool:
    """Whether `ds` holds preference pairs for a stage that reads unpaired feedback (kto). Such pairs need their
    prompt: a `prompt` column, or chat pairs whose conversations hold it (the turns chosen and rejected share)."""
    if "unpaired" not in stage_record(stage_type).formats or "chosen" not in ds.column_names:
        return False
    if "prompt" not in ds.column_names and not _prompt_inside(ds[0]["chosen"]):
        raise DataError(
            f"{where}: a {stage_type} stage reads preference pairs as feedback on answers to a prompt, so it "
            f"needs a 'prompt' column beside chosen/rejected (map yours with dataset.columns: {{prompt: ...}}), or "
            f"chosen/rejected as whole conversations that start with the prompt's turns"
        )
    return True


def _prompt_inside(chosen) -> bool:
    return isinstance(chosen, list) and bool(chosen) and chosen[0].get("role") != "assistant"


def unpair(pairs: Dataset, seed: int) -> Dataset:
    """Preference pairs as binary feedback for a stage that reads unpaired rows (kto): each pair gives its chosen
    answer labelled desirable and its rejected one undesirable (TRL's unpair_preference_dataset), shuffled with
    `seed`: TRL's KTOTrainer reads its rows in order (sequential sampling, which its KL estimate needs), the same
    order every epoch, and unpaired rows come chosen block first. Label flips (applied to the pairs before) swap
    which of the two is desirable. Chat pairs without a prompt column have it split off first (TRL's
    extract_prompt: the turns chosen and rejected share)."""
    from trl.data_utils import extract_prompt, unpair_preference_dataset

    if "prompt" not in pairs.column_names:
        pairs = pairs.map(extract_prompt, desc="split off the prompt")
    return unpair_preference_dataset(pairs.select_columns(["prompt", "chosen", "rejected"])).shuffle(seed=seed)


NEAR_TIE_SCALE = 0.1  # in reward units: builtin task rewards lie in [0, 1]


def near_tie_weights(ds: Dataset, spec: DatasetSpec, recipe: Recipe | None, where: str) -> list[float]:
    """[n] weights exp(-d_i / NEAR_TIE_SCALE) for `flip_mode: near_tie`, d_i = the pair's true reward margin
    r(chosen) - r(rejected) >= 0: the `margin` column when the data has one, else the builtin task's reward.
    A pair with d = 0.1 is e (2.7) times as likely to be flipped as one with d = 0.2: annotators confuse pairs of
    nearly equal quality more often (label noise that a scorer partly cannot see; docs/robustness.md, "Auditing
    preference labels")."""
    import math

    if "margin" in ds.column_names:
        margins = [float(m) for m in ds["margin"]]
    else:
        src = resolve_source(spec.path, recipe)
        task = None
        if src.kind == "builtin":
            from alignlab.builtin.tasks import get_task

            task = get_task(src.location)
        if task is None or task.reward is None:
            raise DataError(
                f"{where}: flip_mode near_tie flips pairs more often the closer their true rewards, so it needs each "
                f"pair's true reward margin: a `margin` column (columns: {{margin: YOUR_COLUMN}}), or a builtin task "
                f"with a reward (builtin:arith, builtin:constraints). Use flip_mode: uniform for this dataset."
            )
        prompts = ds["prompt"]
        margins = [c - r for c, r in zip(task.reward(prompts, ds["chosen"]), task.reward(prompts, ds["rejected"]))]
    return [math.exp(-max(m, 0.0) / NEAR_TIE_SCALE) for m in margins]


def check_dataset(
    spec: DatasetSpec,
    recipe: Recipe | None,
    stage_type: str,
    tokenizer=None,
    max_length: int | None = None,
    formats: tuple[str, ...] | None = None,
    assistant_masks: bool = False,
) -> str | None:
    """Check a dataset without any model: source exists, columns fit the stage, rows well formed; given the
    stage's tokenizer, also that chat data has a template and that prompts fit `max_length` (train.max_length),
    and with `assistant_masks` (SFT loss on assistant turns) that the assistant tokens of `messages` rows can be
    found (alignlab.data.chat). Returns a note for what cannot be checked offline (hub ids), None when fully
    checked; raises DataError."""
    src = resolve_source(spec.path, recipe)
    if src.kind == "hub":
        return f"dataset '{spec.path}' is a hub id: not checked offline"
    if src.kind == "stage":  # written during the run: its stage and format are checked with the chain
        return None  # (alignlab.stages.registry.check_chain), its rows when the stage reads them
    where = _where(spec, recipe)
    ds = canonicalize(load_raw(spec, recipe), spec, stage_type, where, chat=False, formats=formats)
    if spec.flip_rate > 0 and "chosen" not in ds.column_names:
        raise DataError(f"{where}: flip_rate applies to preference data (chosen/rejected), not to this dataset")
    if spec.flip_rate > 0 and spec.flip_mode == "near_tie":
        near_tie_weights(ds, spec, recipe, where)  # a true reward margin for every pair, or the error that says so
    _reads_pairs_as_feedback(ds, stage_type, where)  # pairs for a kto stage: their prompt, or the error
    if tokenizer is not None:
        check_chat_template(ds, tokenizer, where)
        if assistant_masks:
            from alignlab.data.chat import check_chat_masks

            check_chat_masks(ds, tokenizer, where)
        if max_length:
            check_prompt_lengths(ds, tokenizer, max_length, where)
    if spec.eval_path:
        if resolve_source(spec.eval_path, recipe).kind == "hub":
            return f"eval dataset '{spec.eval_path}' is a hub id: not checked offline"
        eval_where = _eval_where(spec, recipe)
        held_out = canonicalize(load_raw(spec, recipe, held_out=True), spec, stage_type, eval_where, False, formats)
        _reads_pairs_as_feedback(held_out, stage_type, eval_where)
    return None


def first_prompts(spec: DatasetSpec, recipe: Recipe | None, stage_type: str, n: int) -> list | None:
    """The first `n` prompts of a stage's prompt dataset (to try a reward function on); None for hub data."""
    if resolve_source(spec.path, recipe).kind == "hub":
        return None
    ds = canonicalize(load_raw(spec, recipe), spec, stage_type, _where(spec, recipe), chat=False, formats=("prompt",))
    return ds.select(range(min(n, len(ds))))["prompt"]


def check_chat_template(ds: Dataset, tokenizer, where: str) -> None:
    """Chat messages can only be turned into tokens by a chat template. (Arrow columns have one type, so the
    first row tells whether a column holds messages.)"""
    if tokenizer.chat_template is not None:
        return
    row = ds[0]
    col = next(
        (c for c in ("messages", "prompt", "completion", "chosen", "rejected") if isinstance(row.get(c), list)), None
    )
    if col is not None:
        raise DataError(
            f"{where}: column '{col}' holds chat messages, but the tokenizer ({tokenizer.name_or_path}) has no chat "
            f"template to render them. Set model.chat_template: path/to/template.jinja, use a tokenizer that has "
            f"one (model.tokenizer), or give plain-string prompt/completion columns."
        )


def check_prompt_lengths(ds: Dataset, tokenizer, max_length: int, where: str) -> None:
    """A prompt of max_length tokens or more leaves nothing of its completion after truncation: the row trains
    on nothing (SFT) or compares two truncated prompts (DPO, reward). Counted as the stage will tokenise it."""
    if "prompt" in ds.column_names:
        prompts = ds["prompt"]
    elif "messages" in ds.column_names:
        prompts = [_before_last_reply(m) for m in ds["messages"]]
    else:
        return  # plain text, or an implicit prompt inside chosen/rejected
    lengths = _token_counts(prompts, tokenizer)
    long = [i for i, n in enumerate(lengths) if n >= max_length]
    if long:
        rows = ", ".join(row_place(where, i) for i in long[:5]) + (", ..." if len(long) > 5 else "")
        raise DataError(
            f"{where}: {len(long)} prompt(s) have at least train.max_length = {max_length} tokens ({rows}; "
            f"{row_place(where, long[0])}: {lengths[long[0]]} tokens), so truncation leaves none of their "
            f"completion. Raise train.max_length above {max(lengths[i] for i in long)}, or shorten or drop those rows."
        )


def _token_counts(prompts: list, tokenizer) -> list[int]:
    """Tokens of each prompt as the stage feeds it: through the chat template when there is one. Rendering every
    row through Jinja is slow, so a plain-string prompt counts its own tokens plus those of the template around an
    empty user turn (exact to a token at the seams); chat-message prompts are rendered one by one."""
    if tokenizer.chat_template is None:
        texts = [p if isinstance(p, str) else "\n".join(m["content"] for m in p) for p in prompts]
        return [len(ids) for ids in tokenizer(texts)["input_ids"]]

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) if messages else ""

    frame = len(tokenizer(render([{"role": "user", "content": ""}]), add_special_tokens=False)["input_ids"])
    texts = [p if isinstance(p, str) else render(p) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(t) + (frame if isinstance(p, str) else 0) for p, t in zip(prompts, ids)]


def _before_last_reply(messages: list[dict]) -> list[dict]:
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    return messages[:last]


def _where(spec: DatasetSpec, recipe: Recipe | None) -> str:
    return _where_of(spec.path, recipe)


def _eval_where(spec: DatasetSpec, recipe: Recipe | None) -> str:
    """How errors name the held-out data: its eval_path, else the main dataset, marked (eval)."""
    return _where_of(spec.eval_path or spec.path, recipe) + " (eval)"


def _where_of(path: str, recipe: Recipe | None) -> str:
    src = resolve_source(path, recipe)
    return src.location if src.kind == "local" else path
