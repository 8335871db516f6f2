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


def _stage_key(spec: DatasetSpec) -> str | None:
    """The key of the running stage that holds dataset `spec` (dataset, preference_dataset, ...)."""
    stage_spec = _taken[0]
    keys = [k for k in stage_record(stage_spec.type).datasets if getattr(stage_spec, k, None) is not None]
    key = next((k for k in keys if getattr(stage_spec, k) is spec), None)
    return key or next((k for k in keys if getattr(stage_spec, k) == spec), None)


def _entry(spec: DatasetSpec, recipe: Recipe | None, key: str | None, rows: int, eval_ds, flipped: int) -> dict:
    return {
        "key": key,
        "path": spec.path,
        "split": spec.split,
        "source": resolve_source(spec.path, recipe).kind,
        "rows": rows,
        "eval_rows": None if eval_ds is None else len(eval_ds),
        "flipped": flipped,
    }


def _note_taken(entries: list[dict]) -> None:
    if _taken is not None:
        _taken[1].extend(e for e in entries if e not in _taken[1])


def build_datasets(
    spec: DatasetSpec, recipe: Recipe | None, stage_type: str, chat: bool, *, with_eval: bool = True
) -> tuple[Dataset, Dataset | None]:
    """Train and (optional) eval datasets in canonical columns for a stage of `stage_type`.

    Eval data: `eval_path`/`eval_split` when given, builtin tasks' held-out split, else `eval_fraction` of the
    training rows (seeded). Label flips (`flip_rate`) touch the training rows only. A mixture (`mix`): each source
    built so on its own, then rows drawn from each in proportion to its weight (alignlab.data.mixture).
    """
    if spec.mix is not None:
        return _build_mixture(spec, recipe, stage_type, chat, with_eval)
    train, eval_ds, flipped, _ = _build_source(spec, recipe, stage_type, chat, with_eval)
    if _taken is not None:
        _note_taken([_entry(spec, recipe, _stage_key(spec), len(train), eval_ds, len(flipped))])
    return train, eval_ds


def _build_mixture(spec: DatasetSpec, recipe: Recipe | None, stage_type: str, chat: bool, with_eval: bool):
    """Each source on its own (its columns, format, flips, held-out rows), then `mixture_counts` rows of each, picked
    by `pick_rows` (seeded per source), together in one seeded order. Held-out rows: every source's, together."""
    from datasets import concatenate_datasets

    from alignlab.data.mixture import mixture_counts, pick_rows

    seed = spec.seed if spec.seed is not None else (recipe.seed if recipe else 0)
    built = [_build_source(source, recipe, stage_type, chat, with_eval) for source in spec.mix]
    _same_columns(
        {f"mix[{i}] ({_where(s, recipe)})": sorted(b[0].column_names) for i, (s, b) in enumerate(zip(spec.mix, built))}
    )
    counts = mixture_counts([len(b[0]) for b in built], [s.weight for s in spec.mix], spec.size)
    picked, entries = [], []
    key = _stage_key(spec) if _taken is not None else None
    names = [f"mix[{i}] ({_where(s, recipe)})" for i, s in enumerate(spec.mix)]
    trains = _aligned([b[0] for b in built], names)
    for i, ((_, eval_ds, flipped, unpaired), train, source, n) in enumerate(zip(built, trains, spec.mix, counts)):
        rows = pick_rows(len(train), n, seed + i)
        picked.append(train.select(rows))
        flips = len(flipped) if unpaired else len([r for r in rows if r in set(flipped)])  # unpaired: its pairs
        entry = _entry(source, recipe, f"{key or 'dataset'}.mix[{i}]", n, eval_ds, flips)
        entries.append({**entry, "available": len(train), "weight": source.weight})
    train = concatenate_datasets(picked).shuffle(seed=seed).flatten_indices()
    held_out = [(b[1], name) for b, name in zip(built, names) if b[1] is not None]
    eval_ds = concatenate_datasets(_aligned(*map(list, zip(*held_out)))) if held_out else None
    if eval_ds is not None and spec.eval_max_samples:
        eval_ds = eval_ds.shuffle(seed=seed).select(range(min(spec.eval_max_samples, len(eval_ds))))
    _note_taken(entries)
    return train, eval_ds


def _aligned(parts: list[Dataset], names: list[str]) -> list[Dataset]:
    """The sources' rows with one set of column types, so they concatenate: when some hold chat messages and others
    plain strings, the strings wrapped as messages too (as a stage whose tokenizer has a chat template reads them);
    values of other kinds an error naming the sources."""
    if all(p.features == parts[0].features for p in parts):
        return parts
    from alignlab.data.formats import _to_chat

    parts = [p.map(_to_chat, desc="chat format") for p in parts]
    try:
        return [p.cast(parts[0].features) for p in parts]
    except (TypeError, ValueError):
        kinds = "; ".join(f"{n}: {', '.join(f'{c} {t}' for c, t in p.features.items())}" for n, p in zip(names, parts))
        raise DataError(
            f"the sources of a mixture hold values of different kinds in the same columns ({kinds}); give each "
            f"source the same format (e.g. chat messages in all, or plain strings in all)"
        ) from None


def _build_source(spec: DatasetSpec, recipe: Recipe | None, stage_type: str, chat: bool, with_eval: bool):
    """One source's train and eval datasets, the rows whose labels were flipped, and whether its pairs were split
    into unpaired feedback (kto: the flipped rows then count pairs, not rows)."""
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
    unpaired = _reads_pairs_as_feedback(train, stage_type, where)
    if unpaired:
        train = unpair(train, seed)
    if eval_ds is not None and _reads_pairs_as_feedback(eval_ds, stage_type, eval_where):
        eval_ds = unpair(eval_ds, seed)
    return train, eval_ds, flipped, unpaired


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
    checked; raises DataError. A mixture: each source so, and the sources read give the same columns."""
    if spec.mix is None:
        return _check_source(spec, recipe, stage_type, tokenizer, max_length, formats, assistant_masks)[0]
    notes, columns = [], {}
    for i, source in enumerate(spec.mix):
        try:
            note, cols = _check_source(source, recipe, stage_type, tokenizer, max_length, formats, assistant_masks)
        except DataError as e:
            raise DataError(f"mix[{i}]: {e}") from None
        notes += [f"mix[{i}]: {note}"] if note else []
        if cols is not None:
            columns[f"mix[{i}] ({_where(source, recipe)})"] = cols
    _same_columns(columns)
    return "; ".join(notes) or None


def _same_columns(columns: dict[str, list[str]]) -> None:
    """The sources of a mixture (named -> canonical columns) give the same columns, or the error naming them."""
    if len({tuple(c) for c in columns.values()}) > 1:
        found = "; ".join(f"{k}: {', '.join(c)}" for k, c in columns.items())
        raise DataError(
            f"the sources of a mixture must give the same columns, and these do not ({found}). Map each source's "
            f"columns (mix: [{{path: ..., columns: {{...}}}}]) so they all read as one format."
        )


def _check_source(spec, recipe, stage_type, tokenizer, max_length, formats, assistant_masks):
    """check_dataset of one source: (its note, its canonical columns; None for data not read here)."""
    src = resolve_source(spec.path, recipe)
    if src.kind == "hub":
        return f"dataset '{spec.path}' is a hub id: not checked offline", None
    if src.kind == "stage":  # written during the run: its stage and format are checked with the chain
        return None, None  # (alignlab.stages.registry.check_chain), its rows when the stage reads them
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
    columns = sorted(ds.column_names)
    if spec.eval_path:
        if resolve_source(spec.eval_path, recipe).kind == "hub":
            return f"eval dataset '{spec.eval_path}' is a hub id: not checked offline", columns
        eval_where = _eval_where(spec, recipe)
        held_out = canonicalize(load_raw(spec, recipe, held_out=True), spec, stage_type, eval_where, False, formats)
        _reads_pairs_as_feedback(held_out, stage_type, eval_where)
    return None, columns


def first_prompts(spec: DatasetSpec, recipe: Recipe | None, stage_type: str, n: int) -> list | None:
    """The first `n` prompts of a stage's prompt dataset (to try a reward function on; a mixture's: its first
    source's); None for hub data."""
    spec = spec.named_sources("dataset")[0][1]
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
