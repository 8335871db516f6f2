"""Demonstrations and preference pairs for `builtin:constraints`, written by code and checked by the task's checker.

A demonstration answers a prompt's request about its topic in short plain sentences (`_SENTENCES`), laid out so
that every constraint of the prompt holds: the start phrase opens it, the end phrase closes it, a sentence brings
the keyword or the rare letter, the words and letters to avoid are left out, and the form (bullets, JSON object,
title, paragraphs, postscript, case) is applied last. The sentences come in one fixed order (a script: greedy
answers of a model trained on randomly picked sentences loop), so a layout is how many of them, which opener and
separators; it is searched, not derived: `_compose` draws a candidate with a seeded `random.Random`, and
`check_constraint` keeps the first one that satisfies every constraint. A prompt where 400 draws fail gets no
demonstration (16 of the first 2,000 train prompts: mostly a long answer in one sentence, e.g. at least 30 words in
exactly 1 sentence; 5 of the 480 eval prompts).

Splits (rows of `constraints_rows(split, n, seed)`, all with the prompt columns of the train / eval splits):
- `sft`: prompt + `completion` (an assistant message), from train prompts (train topics and combinations);
  `sft_eval` the same from eval prompts.
- `preference`: prompt + `chosen` (a demonstration, reward 1) + `rejected` (a near miss: the same kind of answer
  satisfying every constraint but one, reward (k - 1) / k for k constraints; prompts where no layout misses exactly
  one are skipped: 172 of the first 2,000), from train prompts; `preference_eval` from eval prompts. The pair differs in the one
  instruction, not in style: against plain prose as the rejected side, DPO learns "not prose" (SmolLM2 then
  strews titles, bullets and dividers over every answer).

What the demonstrations are not: good prose. They are short, generic and sometimes stilted ("The word
"journey" fits here."); they teach the formats and the instructions, not the topic. SFT on them moves the model
toward this style, which the KL to the base model shows.

This module imports only the standard library.
"""

from __future__ import annotations

import json
import random
import re

from alignlab.builtin.constraints import (
    CONSTRAINTS_SPLITS,
    EVAL_SIZE,
    REQUESTS,
    _texts,
    check_constraint,
    constraints_rows,
    has_word,
    parse_constraints,
)

DEMO_SPLITS = ("sft", "sft_eval", "preference", "preference_eval")
SPLITS = CONSTRAINTS_SPLITS + DEMO_SPLITS

# Topic sentences, {t} the topic (a lowercase noun phrase, used as an object so that no verb has to agree with
# it). No commas; varied so that every avoided word and letter leaves several sentences (tested).
_SENTENCES = (
    "People often talk about {t}.",
    "Learning more on {t} is a real pleasure.",
    "There is always something new to notice in {t}.",
    "Most of us meet {t} without a second thought.",
    "A closer look at {t} rewards curious minds.",
    "Stories on {t} travel from one generation to the next.",
    "Children and adults alike enjoy {t}.",
    "You can learn a lot from {t}.",
    "Small details of {t} make a big difference.",
    "Many old books mention {t}.",
    "Try to spend a moment with {t} this week.",
    "Good habits around {t} help us every day.",
    "Nobody needs to be an expert to love {t}.",
    "Our world would feel smaller without {t}.",
    "Talk with a friend on {t} sometime.",
    "Simple questions on {t} lead to good answers.",
    "Look around and notice {t} in unexpected places.",
    "Thinking on {t} brings a calm mood.",
    "Much remains to discover in {t}.",
    "I find {t} more interesting each time.",
    "Start small when it comes to {t}.",
    "Each season shows {t} in a new light.",
    "Patience helps a lot with {t}.",
    "Notice how {t} can brighten a dull moment.",
    "Share what you learn on {t}.",
    "Anyone can enjoy {t} at home.",
    "Attention to {t} makes a difference.",
    "Write down one note on {t} tonight.",
    "Ask an older relative what {t} meant to them.",
    "Read a little on {t} and then see it for yourself.",
    "Learning on {t} costs little and teaches much.",
    "Some artists paint {t} again and again.",
    "Scientists still study {t} closely.",
    "Curious minds return to {t} often.",
    "Consider {t} a small adventure.",
    "Admire {t} and smile.",
    "Time spent on {t} is time well spent.",
    "Stories, songs and poems celebrate {t}.",  # has commas: used only when commas are allowed
    "Kind words on {t} cost nothing.",
    "Listen to others describe {t}.",
)

# Sentences that bring a keyword ({w}) into the answer.
_KEYWORD_SENTENCES = (
    "The word {w} comes to mind.",
    "One word sums it up: {w}.",
    "I would add a single word: {w}.",
    "My word for this is {w}.",
    "Remember this word: {w}.",
)

# Sentences holding a rare letter at least 3 times (z q x j k v w y).
_LETTER_SENTENCES = {
    "z": ("Puzzles amaze and dazzle.", "A lazy breeze drizzles on a zigzag maze."),
    "q": ("A quick quiz is quite a quest.", "Quiet queues require quick questions."),
    "x": ("Relax and explore the next box.", "Six extra examples exist."),
    "j": ("Enjoy a jar of jam with joy.", "Jolly jugglers join a jam.", "Jam jars join a jug."),
    "k": ("Keep looking and keep asking.", "Kind folks like to know more."),
    "v": ("Vivid views give lovely vibes.", "Visit and savour every view."),
    "w": ("We wander with wide wonder.", "Walk west with a wise owl."),
    "y": ("Yellow rays may play by day.", "Every day my story grows."),
}

# How a start phrase opens the answer (its first sentence, or a lead into the first).
_OPENERS = {
    "Sure thing": ("Sure thing!", "Sure thing:"),
    "Here is": ("Here is a short note on {t}.", "Here is my answer.", "Here is what I think."),
    "Of course": ("Of course!", "Of course:"),
    "In short": ("In short:",),
    "Did you know": ("Did you know that {t} can surprise us?", "Did you know?"),
    "Good question": ("Good question!", "Good question:"),
    "Let me explain": ("Let me explain.", "Let me explain:"),
    "Once upon a time": ("Once upon a time I learned about {t}.", "Once upon a time there was {t}."),
    "Dear friend": ("Dear friend!", "Dear friend:"),
    "Fun fact": ("Fun fact:",),
}


def _banned(text: str, letters: list[str], words: list[str], commas: bool) -> bool:
    low = text.lower()
    return any(c in low for c in letters) or any(has_word(text, w) for w in words) or ("," in text and not commas)


def _title(topic: str) -> str:
    return "<<" + " ".join(w[:1].upper() + w[1:] for w in topic.split()) + ">>"


# Postscripts for a revised answer whose own sentences are all in its body (a P.S. that repeats one of them teaches
# the model to copy its sentences, which greedy decoding turns into loops).
_POSTSCRIPTS = (
    "I hope this helps.",
    "Thanks for reading.",
    "Let me know if you want more.",
    "Feel free to ask a follow-up question.",
    "Happy to say more on this.",
)


def _postscript(pool: list[str], body: list[str], rng: random.Random, script: bool, ok) -> str:
    """The sentence after "P.S.": for the script, any of its sentences (the demonstrations as first made); for a
    model's own sentences, one the body does not already say, else a short closing line without a banned word."""
    if script:
        return rng.choice(pool)
    unused = [s for s in pool if s not in body]
    return rng.choice(unused or [s for s in _POSTSCRIPTS if ok(s)] or list(_POSTSCRIPTS))


def _compose(cs: list[dict], topic: str, rng: random.Random, sentences: list[str] | None = None) -> str:
    """One candidate answer for constraints `cs` (random layout; the caller checks it). `sentences`: the body's
    sentences in their order (default: the script, `_SENTENCES`)."""
    by = {c["kind"]: c for c in cs}
    letters = [c["letter"] for c in cs if c["kind"] == "avoid_letter"]
    words = [c["word"] for c in cs if c["kind"] == "exclude_word"]
    commas = "no_commas" not in by and "json_keys" not in by

    def ok(s: str) -> bool:
        return not _banned(s, letters, words, commas)

    pool = [s.format(t=topic) for s in _SENTENCES] if sentences is None else list(sentences)
    pool = [s[0].upper() + s[1:] for s in pool if ok(s)]
    if not pool:  # given sentences, none without a banned word or letter: no candidate (the script always has some)
        return ""
    extras = []
    if "include_keyword" in by:
        extras.append(rng.choice([s for s in _KEYWORD_SENTENCES if ok(s.format(w=""))] or _KEYWORD_SENTENCES))
        extras[-1] = extras[-1].format(w=by["include_keyword"]["word"])
    if "include_letter" in by:
        options = [s for s in _LETTER_SENTENCES[by["include_letter"]["letter"]] if ok(s)]
        extras.append(rng.choice(options or list(_LETTER_SENTENCES[by["include_letter"]["letter"]])))
    # The sentences in their fixed order (only how many is drawn): a model trained on demonstrations that pick
    # sentences at random learns a wide distribution over them, and its greedy answers loop ("Good habits help a
    # lot. Good habits help a lot. ..."); a fixed script is predictable, and ends.
    n_body = rng.randint(0 if extras else 1, 4)
    if "bullets" in by or "paragraphs" in by:
        n_body = max(n_body, by.get("bullets", by.get("paragraphs", {})).get("n", 1) - len(extras))
    body = pool[:n_body] + extras

    if "json_keys" in by:
        keys = by["json_keys"]["keys"]
        if len(keys) == 1:
            obj = {keys[0]: " ".join(body)}
        else:
            obj = {keys[0]: _title(topic)[2:-2], keys[1]: " ".join(body)}
        text = json.dumps(obj)
    elif "bullets" in by:
        n = by["bullets"]["n"]
        items = body[: n - 1] + [" ".join(body[n - 1 :])]
        text = "\n".join(f"* {s}" for s in items)
    elif "paragraphs" in by:
        n = by["paragraphs"]["n"]
        size = len(body) // n
        groups = [body[i * size : (i + 1) * size] for i in range(n - 1)] + [body[(n - 1) * size :]]
        text = "\n\n***\n\n".join(" ".join(g) for g in groups)
    else:
        text = " ".join(body)
    if "title" in by:
        text = _title(topic) + "\n\n" + text
    if "start_phrase" in by:
        phrase = by["start_phrase"]["phrase"]
        openers = [o.format(t=topic) for o in _OPENERS[phrase]]
        opener = rng.choice([o for o in openers if ok(o)] or openers)
        text = opener + ("\n\n" if "\n" in text or rng.random() < 0.3 else " ") + text
    if "postscript" in by:
        text += "\n\nP.S. " + _postscript(pool, body, rng, sentences is None, ok)
    if "end_phrase" in by:
        text += ("\n\n" if "\n" in text else " ") + by["end_phrase"]["phrase"]
    if "lowercase" in by:
        text = text.lower()
    if "uppercase" in by:
        text = text.upper()
    return text


def demonstrate(row: dict, seed: int = 0, attempts: int = 400, sentences: list[str] | None = None) -> str | None:
    """A response to `row` (a builtin:constraints row) that satisfies all its constraints, or None if `attempts`
    random layouts all fail. Deterministic in (the row's prompt, seed). `sentences`: the body's sentences (e.g. a
    model's own answer, split), in place of the script."""
    cs = json.loads(row["constraints"])
    rng = random.Random(f"constraints/demo/{seed}/{row['prompt'][0]['content']}")
    for _ in range(attempts):
        text = _compose(cs, row["topic"], rng, sentences)
        if all(check_constraint(text, c) for c in cs):
            return text
    return None


def near_miss(row: dict, seed: int = 0, attempts: int = 400, sentences: list[str] | None = None) -> str | None:
    """A response to `row` in the demonstrations' style that satisfies every constraint but one (a preference
    pair's rejected side): the pair then differs in that one instruction, not in style. The constraint to miss is
    drawn (seeded) among those a layout search can miss; None when none can be. `sentences`: as in demonstrate."""
    cs = json.loads(row["constraints"])
    rng = random.Random(f"constraints/miss/{seed}/{row['prompt'][0]['content']}")
    for i in rng.sample(range(len(cs)), len(cs)):
        others = cs[:i] + cs[i + 1 :]
        for _ in range(attempts // len(cs)):
            text = _compose(others, row["topic"], rng, sentences)
            if not check_constraint(text, cs[i]) and all(check_constraint(text, c) for c in others):
                return text
    return None


def rows(split: str, n: int, seed: int) -> list[dict]:
    """n rows of `split`: the task's own `train` / `eval` prompts, or a demonstration split (module docstring).
    Demonstration rows follow the order of the `train` prompts (`sft`, `preference`) or of the fixed `eval` list
    (`*_eval`, repeated from its start past its end, as the `eval` split is), skipping prompts without one."""
    if split in CONSTRAINTS_SPLITS:
        return constraints_rows(split, n, seed)
    if split not in DEMO_SPLITS:
        raise ValueError(f"unknown split {split!r} for task 'constraints'; known splits: {', '.join(SPLITS)}")
    if split.endswith("_eval"):
        made = _demo_rows(split, constraints_rows("eval", EVAL_SIZE, seed), seed)
        return [made[i % len(made)] for i in range(n)]
    want = n
    while True:  # train rows of a larger n start with those of a smaller one
        made = _demo_rows(split, constraints_rows("train", want, seed), seed)
        if len(made) >= n:
            return made[:n]
        want *= 2


def _demo_rows(split: str, prompts: list[dict], seed: int) -> list[dict]:
    out = []
    for row in prompts:
        demo = demonstrate(row, seed)
        if demo is None:
            continue
        if split.startswith("sft"):
            out.append({**row, "completion": [{"role": "assistant", "content": demo}]})
            continue
        miss = near_miss(row, seed)
        if miss is None:
            continue
        chosen, rejected = ([{"role": "assistant", "content": t}] for t in (demo, miss))
        out.append({**row, "chosen": chosen, "rejected": rejected})
    return out


# --------------------------------------------------------------------------------------------------------------
# Revising a model's own answer (`revise_fn: builtin:constraints` of a generate stage)
# --------------------------------------------------------------------------------------------------------------

_REQUEST_RES = tuple(
    re.compile("^" + re.escape(r).replace(re.escape("{topic}"), "(?P<topic>.+?)") + r"(?:\s|$)") for r in REQUESTS
)
_SENTENCE_RE = re.compile(r"[^.!?\n]*[A-Za-z][^.!?\n]*[.!?]")
MAX_REVISED_SENTENCES = 6


def answer_sentences(text: str) -> list[str]:
    """The whole sentences of a model's answer, in order (a fragment cut off by the token limit is dropped), of 3 to
    40 words, each once (a sentence the model repeated, compared without case, is kept where it first came), at most
    MAX_REVISED_SENTENCES."""
    sentences = [s.strip() for s in _SENTENCE_RE.findall(text)]
    kept: dict[str, str] = {}
    for s in sentences:
        if 3 <= len(s.split()) <= 40:
            kept.setdefault(s.lower(), s)
    return list(kept.values())[:MAX_REVISED_SENTENCES]


def revise(prompts: list, completions: list, seed: int = 0) -> list[str | None]:
    """A model's own answers laid out to meet their prompts' constraints (the `revise_fn` of `builtin:constraints`):
    the answer's own sentences are the body of a demonstration (`demonstrate(..., sentences=...)`), so the words
    stay the model's, and the layout, case, keyword, letters and phrases that the prompt asks for are added by code.
    None (keep the answer as it is) where the answer has fewer than 2 whole sentences or no layout of them meets
    every constraint (e.g. none of them avoids a banned letter).

    SFT on revised answers teaches the instructions without the script of the code-written demonstrations: on
    SmolLM2-135M-Instruct their KL to the base stays a few nats where the scripted SFT -> DPO reached 60-85
    (docs/results.md, "On a real model")."""
    out = []
    for prompt, completion in _texts(prompts, completions, "revise"):
        sentences = answer_sentences(completion)
        cs = parse_constraints(prompt)
        topic = next((m.group("topic") for r in _REQUEST_RES if (m := r.match(prompt))), None)
        if len(sentences) < 2 or not cs or topic is None:
            out.append(None)
            continue
        row = {"constraints": json.dumps(cs), "topic": topic, "prompt": [{"role": "user", "content": prompt}]}
        out.append(demonstrate(row, seed, attempts=200, sentences=sentences))
    return out
