"""`builtin:constraints`: short requests with verifiable constraints, in the spirit of IFEval.

IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models", arXiv 2311.07911) scores
instruction following with constraints a program can check ("answer in at most 20 words", "no commas"). This task
uses the same idea to give a real small instruct model (SmolLM2-135M-Instruct, generating ~64 new tokens) an exact
reward with signal: a short request plus one to three constraints, e.g.

    Write a short note about honeybees. Answer with at most 20 words. Do not use any commas in your response.

Sixteen kinds (`KINDS`, in that order): word_count, sentence_count, lowercase, uppercase, include_keyword,
exclude_word, include_letter, avoid_letter, start_phrase, end_phrase, bullets, json_keys, title, no_commas,
paragraphs, postscript. Their parameters are chosen for responses of ~20-60 words. Combinations that cannot all
hold are never drawn: kind-level ones (`INCOMPATIBLE`: lowercase + uppercase, JSON + bullets, ...) and parameter
level ones (`_params_conflict`: lowercase + a capitalised start phrase, no commas + a two-key JSON object,
avoiding the letter "y" + ending with "Have a nice day!", ...).

Splits:
- `train`: any number of rows, drawn with `random.Random(("constraints/train", seed))` from train topics and train
  combinations.
- `eval`: one fixed list of `EVAL_SIZE` rows (its own constant seed; the `seed` argument is ignored so that every
  recipe evaluates on the same prompts); n rows are its first n (repeated from the start past `EVAL_SIZE`, as
  `arith` does). Row i has primary kind `KINDS[i % 16]`, so any prefix has an equal share of prompts per kind
  (+-1); the other kinds of a row are picked to keep how often each kind appears balanced too.
Held out by construction: a topic is on the eval side iff sha256("topic/" + topic)[0] % 5 == 0, and a combination
(the set of kinds of a prompt) iff sha256("combo/" + "+".join(sorted(kinds)))[0] % 5 == 0, independent of any
seed; train rows use only train topics and train combinations, eval rows only eval ones.

Rows (prompt format): `prompt` [user message], `constraints` (JSON string: list of {"kind": ..., params} in prompt
order), `kinds` (list of kind names in prompt order), `primary_kind`, `topic`.

Reward (`constraints_reward`): the constraints are parsed back from the prompt TEXT (alignlab calls reward
functions with the user texts only); the reward is the fraction of them the completion satisfies, in [0, 1].
A completion without a single word (letters or digits) satisfies nothing, so an empty answer cannot collect
"at most 20 words" or "no commas". `constraint_report` gives strict accuracy (all satisfied), instruction-level
accuracy and accuracy per kind.

This module imports only the standard library.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "EVAL_SIZE",
    "INCOMPATIBLE",
    "KINDS",
    "check_constraint",
    "constraint_report",
    "constraints_reward",
    "constraints_rows",
    "count_sentences",
    "count_words",
    "parse_constraints",
    "render_constraint",
    "split_stats",
]

CONSTRAINTS_SPLITS = ("train", "eval")
HOLDOUT_BUCKETS = 5  # 1 topic (and 1 combination) in 5 is held out for evaluation
EVAL_PER_KIND = 30
SIZE_WEIGHTS = {1: 0.4, 2: 0.4, 3: 0.2}  # how many constraints a prompt has

# --------------------------------------------------------------------------------------------------------------
# Topics and requests
# --------------------------------------------------------------------------------------------------------------

# Lowercase common nouns without quotes, so that no topic looks like a constraint phrasing to the parser.
_TOPIC_TEXT = """
honeybees, the moon, volcanoes, rainbows, penguins, coffee, tea, chocolate, bicycles, trains, sailing boats,
lighthouses, libraries, public parks, city gardens, houseplants, cactus plants, autumn leaves, snowflakes,
thunderstorms, ocean tides, coral reefs, deserts, rainforests, mountains, glaciers, rivers, waterfalls, caves,
islands, owls, dolphins, elephants, giraffes, octopuses, butterflies, ants, spiders, wolves, foxes, rabbits,
hedgehogs, turtles, frogs, parrots, crows, pigeons, squirrels, horses, cows, goats, sheep, cats, dogs, goldfish,
hamsters, bread baking, pizza, soup, pancakes, apples, bananas, oranges, strawberries, tomatoes, potatoes, rice,
noodles, cheese, honey, olive oil, spices, salads, breakfast, picnics, birthday parties, board games, chess,
card games, puzzles, kites, paper planes, origami, knitting, painting, drawing, pottery, photography, music
lessons, the piano, the guitar, drums, singing, dancing, theatre, museums, zoos, aquariums, circuses, fairs,
carnivals, camping, hiking, swimming, running, yoga, cycling, skiing, ice skating, football, basketball, tennis,
table tennis, golf, rowing, climbing, fishing, gardening, composting, recycling, solar panels, wind turbines,
batteries, electric cars, buses, airports, bridges, tunnels, skyscrapers, old castles, windmills, clocks,
calendars, maps, compasses, telescopes, microscopes, magnets, rockets, satellites, comets, stars, planets,
eclipses, the sun, clouds, fog, wind, rain, snow, seasons, sunrises, sunsets, night skies, dreams, sleep,
naps, morning routines, habits, friendship, kindness, patience, curiosity, courage, gratitude, teamwork,
homework, exams, teachers, classrooms, school lunches, summer holidays, weekends, road trips, packing a
suitcase, learning a language, writing letters, postcards, diaries, poetry, fairy tales, comic books, novels,
newspapers, podcasts, radio, television, cinema, video games, smartphones, laptops, keyboards, passwords,
email, robots, spreadsheets, calculators, typewriters, printing presses, paper, pencils, notebooks, erasers,
backpacks, umbrellas, raincoats, boots, hats, scarves, gloves, sunglasses, bakeries, markets, grocery
shopping, cooking at home, kitchens, fridges, ovens, kettles, washing machines, vacuum cleaners, bedrooms,
pillows, blankets, candles, lamps, windows, doors, stairs, gardens in winter, birdwatching, bird feeders,
nests, eggs, seeds, trees, forests, mushrooms, moss, flowers, sunflowers, roses, tulips, lavender, herbs,
vegetable patches, farms, tractors, barns, harvest time, village life, city life, neighbours, post offices,
fire stations, hospitals, nurses, doctors, dentists, pharmacies, vitamins, drinking water, healthy snacks,
walking to work, stretching, deep breathing, meditation, hobbies, collecting stamps, coins, old photographs,
family dinners, grandparents, babysitting, pets at home, dog walking, cat naps, aquarium fish, pond life,
beaches, sandcastles, seashells, sea turtles, whales, sharks, jellyfish, crabs, starfish, lakes, canoes,
bonfires, fireworks, lanterns, festivals, holidays at home, snowmen, sledging, hot chocolate, mittens, first
snow, spring cleaning, bird songs, rainy days, puddles, muddy boots, garden snails, earthworms, ladybirds,
dragonflies, fireflies, crickets, deer, bears, moose, bats, mice, camels, kangaroos, koalas, pandas, tigers,
lions, zebras, hippos, flamingos, peacocks, swans, ducks, geese, hens, bees in winter, maple syrup, pumpkins,
apple pie, lemonade, ice cream, popcorn, sandwiches, dumplings, tacos, curry, porridge, muffins, cookies,
volunteering, charity shops, public transport, traffic lights, street art, murals, statues, fountains,
playgrounds, swings, treehouses, science fairs, inventions, the wheel, electricity, light bulbs, bread
ovens, water wheels, sundials, hourglasses, paper boats, soap bubbles, balloons, magic tricks, jokes,
riddles, tongue twisters, handwriting, spelling, counting, fractions, shapes, colours, the alphabet
"""
TOPICS: tuple[str, ...] = tuple(dict.fromkeys(t.strip() for t in _TOPIC_TEXT.replace("\n", " ").split(",")))

# Requests that say nothing about length or format, so that no constraint contradicts them.
REQUESTS = (
    "Write a short note about {topic}.",
    "Tell me about {topic}.",
    "Explain {topic} to a child.",
    "Write a short message to a friend about {topic}.",
    "Give a brief overview of {topic}.",
    "What is interesting about {topic}?",
    "Share a fun fact about {topic}.",
    "Write a short description of {topic}.",
    "Why should people care about {topic}?",
    "Write a short review of {topic}.",
    "Give some advice about {topic}.",
    "Write the opening of a blog post about {topic}.",
)

# --------------------------------------------------------------------------------------------------------------
# Measuring a response
# --------------------------------------------------------------------------------------------------------------

# A word: a run of letters/digits, with inner apostrophes or hyphens ("don't", "well-known" are one word each).
# Markdown markers ("*", "***", "<<", ">>") and punctuation are not words.
_WORD_RE = re.compile(r"[^\W_]+(?:['\u2019-][^\W_]+)*")
# A sentence ends at a run of . ! ? (with closing quotes/brackets) followed by whitespace or the end of the text.
# "3.5" does not end a sentence (no space after the dot); abbreviations ("e.g. this") do: a known limitation.
_SENTENCE_END_RE = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?:\s+|$)")
_BULLET_RE = re.compile(r"^[ \t]*[*-][ \t]+\S", re.M)  # "* point" or "- point"; not "**bold**", "***"
_TITLE_RE = re.compile(r"<<[^<>\n]*[^\s<>][^<>\n]*>>")
_POSTSCRIPT_RE = re.compile(r"^[ \t]*p\.[ \t]?s\.", re.M | re.I)  # at the start of a line: "P.S.", "p. s."
_FENCE_RE = re.compile(r"```[A-Za-z]*[ \t]*\n?(.*?)\n?[ \t]*```", re.S)


def count_words(text: str) -> int:
    return len(_WORD_RE.findall(text))


def count_sentences(text: str) -> int:
    """Segments between sentence ends that hold at least one letter or digit (a trailing fragment counts)."""
    return sum(1 for part in _SENTENCE_END_RE.split(text.strip()) if re.search(r"[^\W_]", part))


def _has_letter(text: str) -> bool:
    # "42" has neither case: without a letter, a number alone would satisfy lowercase and uppercase at once.
    return any(ch.isalpha() for ch in text)


def has_word(text: str, word: str) -> bool:
    """Whether `word` appears whole in `text`, in any case."""
    return re.search(rf"\b{re.escape(word)}\b", text, re.I) is not None


def _json_object(text: str) -> dict | None:
    """The response parsed as a JSON object, allowing one surrounding ``` fence (```json ... ```); else None."""
    s = text.strip()
    fenced = _FENCE_RE.fullmatch(s)
    if fenced:
        s = fenced.group(1).strip()
    try:
        obj = json.loads(s)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _paragraphs_ok(text: str, n: int) -> bool:
    """Exactly n non-empty paragraphs separated by "***". As in IFEval, an empty part before the first or after
    the last divider is ignored; an empty part between two dividers fails."""
    parts = [p.strip() for p in re.split(r"\*{3,}", text)]
    if parts and not parts[0]:
        parts = parts[1:]
    if parts and not parts[-1]:
        parts = parts[:-1]
    return len(parts) == n and all(parts)


def _compare(value: int, relation: str, n: int) -> bool:
    return {"at most": value <= n, "at least": value >= n, "exactly": value == n}[relation]


def _starts_with(text: str, phrase: str) -> bool:
    s = text.lstrip()
    # "Of course" must not be the start of "Of courses": the phrase ends at a non-word character or the end.
    return s.startswith(phrase) and not re.match(r"[^\W_]", s[len(phrase) : len(phrase) + 1])


# --------------------------------------------------------------------------------------------------------------
# The kinds: phrasings, parameters, checks
# --------------------------------------------------------------------------------------------------------------

# Regex for each {field} of a phrasing; every other character of a phrasing is literal.
_FIELD_RE = {
    "relation": r"at most|at least|exactly",
    "n": r"\d+",
    "s": r"s?",  # plural ending, "" for 1
    "word": r"[a-z]+",
    "letter": r"[a-z]",
    "phrase": r"[^\"]+",
    "keys": r'"[a-z_]+"(?: and "[a-z_]+")*',
}


@dataclass(frozen=True)
class Kind:
    """One kind of constraint.

    phrasings: templates with {fields} (see _FIELD_RE); a prompt uses one of them, the parser knows them all.
    draw(rng) -> params; check(response, params) -> bool.
    """

    name: str
    phrasings: tuple[str, ...]
    draw: Callable[[random.Random], dict]
    check: Callable[[str, dict], bool]


def _choice(rng: random.Random, options):
    return options[rng.randrange(len(options))]


WORD_COUNTS = (("at most", 15), ("at most", 20), ("at most", 25), ("at most", 30), ("at most", 40))
WORD_COUNTS += (("at least", 10), ("at least", 15), ("at least", 20), ("at least", 25), ("at least", 30))
SENTENCE_COUNTS = (("exactly", 1), ("exactly", 2), ("exactly", 3), ("at most", 2), ("at most", 3))
SENTENCE_COUNTS += (("at least", 2), ("at least", 3))
KEYWORDS = (
    "simple", "important", "because", "history", "future", "example", "people", "water", "together", "quiet",
    "bright", "careful", "morning", "journey", "balance", "surprising", "local", "ancient", "daily", "energy",
    "friendly", "curious", "practical", "gentle", "small",
)  # fmt: skip
# Words a short answer uses often (hard to avoid) mixed with words it uses sometimes (easy).
AVOID_WORDS = ("the", "and", "is", "it", "of", "very", "also", "really", "many", "can", "you", "great", "fun")
RARE_LETTERS = ("z", "q", "x", "j", "k", "v", "w", "y")  # include_letter: rare letters, at least 1-3 times
AVOID_LETTERS = ("z", "q", "x", "j", "k", "v", "w", "y", "b", "p", "f", "g")  # a mix of easy and hard to avoid
START_PHRASES = (
    "Sure thing", "Here is", "Of course", "In short", "Did you know", "Good question", "Let me explain",
    "Once upon a time", "Dear friend", "Fun fact",
)  # fmt: skip
END_PHRASES = (
    "Thank you.", "That is all.", "Have a nice day!", "Is there anything else I can help with?",
    "Any other questions?", "The end.", "Hope this helps.",
)  # fmt: skip
JSON_KEYS = (("answer",), ("summary",), ("text",), ("title", "body"), ("topic", "summary"), ("name", "description"))

KIND_LIST: tuple[Kind, ...] = (
    Kind(
        "word_count",
        ("Answer with {relation} {n} words.", "Your response should contain {relation} {n} words."),
        lambda rng: dict(zip(("relation", "n"), _choice(rng, WORD_COUNTS))),
        lambda text, p: _compare(count_words(text), p["relation"], p["n"]),
    ),
    Kind(
        "sentence_count",
        ("Answer in {relation} {n} sentence{s}.", "Your response must have {relation} {n} sentence{s}."),
        lambda rng: dict(zip(("relation", "n"), _choice(rng, SENTENCE_COUNTS))),
        lambda text, p: _compare(count_sentences(text), p["relation"], p["n"]),
    ),
    Kind(
        "lowercase",
        (
            "Your entire response must be in lowercase letters, with no capital letters at all.",
            "Write everything in lowercase letters only.",
        ),
        lambda rng: {},
        lambda text, p: _has_letter(text) and not any(ch.isupper() for ch in text),
    ),
    Kind(
        "uppercase",
        ("Your entire response must be in capital letters.", "Write everything in capital letters only."),
        lambda rng: {},
        lambda text, p: _has_letter(text) and not any(ch.islower() for ch in text),
    ),
    Kind(
        "include_keyword",
        ('Include the keyword "{word}" in your response.', 'Make sure to use the word "{word}".'),
        lambda rng: {"word": _choice(rng, KEYWORDS)},
        lambda text, p: has_word(text, p["word"]),
    ),
    Kind(
        "exclude_word",
        ('Do not use the word "{word}" anywhere in your response.', 'Avoid the word "{word}".'),
        lambda rng: {"word": _choice(rng, AVOID_WORDS)},
        lambda text, p: not has_word(text, p["word"]),
    ),
    Kind(
        "include_letter",
        (
            'Use the letter "{letter}" at least {n} time{s}.',
            'The letter "{letter}" should appear at least {n} time{s} in your response.',
        ),
        lambda rng: {"letter": _choice(rng, RARE_LETTERS), "n": rng.randint(1, 3)},
        lambda text, p: text.lower().count(p["letter"]) >= p["n"],
    ),
    Kind(
        "avoid_letter",
        ('Do not use the letter "{letter}" anywhere in your response.', 'Never use the letter "{letter}".'),
        lambda rng: {"letter": _choice(rng, AVOID_LETTERS)},
        lambda text, p: p["letter"] not in text.lower(),
    ),
    Kind(
        "start_phrase",
        ('Start your response with the exact phrase "{phrase}".', 'Begin your answer with "{phrase}".'),
        lambda rng: {"phrase": _choice(rng, START_PHRASES)},
        lambda text, p: _starts_with(text, p["phrase"]),
    ),
    Kind(
        # The phrase ends with its own punctuation, so the phrasing puts no period after the closing quote.
        "end_phrase",
        (
            'End your response with the exact phrase "{phrase}" with no other words after it.',
            'Finish your answer with "{phrase}"',
        ),
        lambda rng: {"phrase": _choice(rng, END_PHRASES)},
        lambda text, p: text.rstrip().endswith(p["phrase"]),
    ),
    Kind(
        "bullets",
        (
            'Use exactly {n} markdown bullet points, each on its own line starting with "* ".',
            "Format your answer as exactly {n} bullet points.",
        ),
        lambda rng: {"n": rng.randint(2, 4)},
        lambda text, p: len(_BULLET_RE.findall(text)) == p["n"],
    ),
    Kind(
        "json_keys",
        (
            "Format your entire response as a JSON object with the key{s} {keys}.",
            "Your whole answer must be valid JSON: an object with the key{s} {keys}.",
        ),
        lambda rng: {"keys": list(_choice(rng, JSON_KEYS))},
        lambda text, p: (obj := _json_object(text)) is not None and all(k in obj for k in p["keys"]),
    ),
    Kind(
        "title",
        (
            "Give your response a title wrapped in double angular brackets, such as <<my title>>.",
            "Include a title in double angular brackets, like <<a title>>.",
        ),
        lambda rng: {},
        lambda text, p: _TITLE_RE.search(text) is not None,
    ),
    Kind(
        "no_commas",
        ("Do not use any commas in your response.", "Your entire response must not contain a single comma."),
        lambda rng: {},
        lambda text, p: "," not in text and "\uff0c" not in text,  # also the full-width comma
    ),
    Kind(
        "paragraphs",
        (
            "Write exactly {n} paragraphs, separated from each other by the markdown divider ***.",
            "Your response must have {n} paragraphs with a line of *** between them.",
        ),
        lambda rng: {"n": rng.randint(2, 3)},
        lambda text, p: _paragraphs_ok(text, p["n"]),
    ),
    Kind(
        "postscript",
        (
            "At the end of your response, add a postscript starting with P.S.",
            "End with a postscript that starts with P.S.",
        ),
        lambda rng: {},
        lambda text, p: _POSTSCRIPT_RE.search(text) is not None,
    ),
)
KIND_BY_NAME: dict[str, Kind] = {k.name: k for k in KIND_LIST}
KINDS: tuple[str, ...] = tuple(KIND_BY_NAME)

# Pairs of kinds that are never drawn together: contradictory, or whose checks would fight (a JSON object has no
# bullet lines; "P.S." would split a sentence count; capital letters would break JSON keys and the phrases).
INCOMPATIBLE: frozenset[frozenset[str]] = frozenset(
    frozenset(pair)
    for pair in (
        ("lowercase", "uppercase"),
        ("lowercase", "start_phrase"),
        ("lowercase", "end_phrase"),
        ("uppercase", "start_phrase"),
        ("uppercase", "end_phrase"),
        ("uppercase", "json_keys"),
        ("json_keys", "start_phrase"),
        ("json_keys", "end_phrase"),
        ("json_keys", "bullets"),
        ("json_keys", "title"),
        ("json_keys", "paragraphs"),
        ("json_keys", "postscript"),
        ("json_keys", "sentence_count"),
        ("bullets", "sentence_count"),
        ("bullets", "paragraphs"),
        ("paragraphs", "sentence_count"),
        ("postscript", "sentence_count"),
        ("postscript", "end_phrase"),
    )
)


def _required_texts(c: dict) -> list[tuple[str, bool]]:
    """Texts a response satisfying `c` must contain, each with whether it must appear in exactly that case."""
    kind = c["kind"]
    if kind == "include_keyword":
        return [(c["word"], False)]
    if kind in ("start_phrase", "end_phrase"):
        return [(c["phrase"], True)]
    if kind == "include_letter":
        return [(c["letter"], False)]
    if kind == "json_keys":
        return [(f'"{k}"', True) for k in c["keys"]] + ([(",", True)] if len(c["keys"]) > 1 else [])
    if kind == "postscript":
        return [("P.S.", False)]
    return []


def _params_conflict(a: dict, b: dict) -> bool:
    """Whether two constraints (of compatible kinds) cannot hold together with these parameters."""
    for x, y in ((a, b), (b, a)):
        needed = _required_texts(y)
        if x["kind"] == "lowercase" and any(cs and t != t.lower() for t, cs in needed):
            return True
        if x["kind"] == "uppercase" and any(cs and t != t.upper() for t, cs in needed):
            return True
        if x["kind"] == "no_commas" and any("," in t for t, _ in needed):
            return True
        if x["kind"] == "avoid_letter" and any(x["letter"] in t.lower() for t, _ in needed):
            return True
        if x["kind"] == "exclude_word" and any(has_word(t, x["word"]) for t, _ in needed):
            return True
        # One sentence cannot also hold a closing phrase that is a sentence of its own.
        if x["kind"] == "sentence_count" and x["relation"] != "at least" and x["n"] < 2:
            if y["kind"] == "end_phrase":
                return True
    return False


def _fits_request(c: dict, request: str) -> bool:
    """Do not ask to avoid a letter or word that the request itself uses ("Share a fun fact ..." + avoid "fun",
    "... about zebras" + avoid "z"): possible, but needlessly unfair. The request is lowercased like the checks."""
    if c["kind"] == "avoid_letter":
        return c["letter"] not in request.lower()
    if c["kind"] == "exclude_word":
        return not has_word(request, c["word"])
    return True


# --------------------------------------------------------------------------------------------------------------
# Rendering and parsing
# --------------------------------------------------------------------------------------------------------------


def _fields(c: dict) -> dict[str, str]:
    fields = {k: str(v) for k, v in c.items() if k != "kind"}
    if "keys" in c:
        fields["keys"] = " and ".join(f'"{k}"' for k in c["keys"])
        fields["s"] = "s" if len(c["keys"]) > 1 else ""
    elif "n" in c:
        fields["s"] = "" if c["n"] == 1 else "s"
    return fields


def render_constraint(c: dict, phrasing: int = 0) -> str:
    """The natural-language phrasing of constraint `c` ({"kind": ..., params}), using template `phrasing`."""
    kind = KIND_BY_NAME[c["kind"]]
    return kind.phrasings[phrasing].format(**_fields(c))


def _phrasing_regex(template: str) -> str:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos : m.start()]))
        name = m.group(1)
        out.append(f"(?P<{name}>{_FIELD_RE[name]})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return "".join(out)


_PARSERS: tuple[tuple[str, re.Pattern], ...] = tuple(
    (kind.name, re.compile(_phrasing_regex(t))) for kind in KIND_LIST for t in kind.phrasings
)


def parse_constraints(prompt: str) -> list[dict]:
    """The constraints phrased in a prompt text, in the order they appear (the inverse of the prompt builder)."""
    found = []
    for name, regex in _PARSERS:
        for m in regex.finditer(prompt):
            c = {"kind": name}
            for field, value in m.groupdict().items():
                if field == "s":
                    continue
                if field == "n":
                    c["n"] = int(value)
                elif field == "keys":
                    c["keys"] = re.findall(r'"([a-z_]+)"', value)
                else:
                    c[field] = value
            found.append((m.start(), c))
    return [c for _, c in sorted(found, key=lambda item: item[0])]


def check_constraint(response: str, c: dict) -> bool:
    """Whether `response` satisfies constraint `c`. A response without a single word satisfies nothing."""
    if not _WORD_RE.search(response):
        return False
    return bool(KIND_BY_NAME[c["kind"]].check(response, c))


# --------------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------------


def _held_out(key: str) -> bool:
    # sha256 rather than hash(): str hashes are salted per process, and the split must be the same everywhere.
    return hashlib.sha256(key.encode()).digest()[0] % HOLDOUT_BUCKETS == 0


def _topics(eval_side: bool) -> tuple[str, ...]:
    return tuple(t for t in TOPICS if _held_out(f"topic/{t}") == eval_side)


def _combo_key(kinds) -> str:
    return "+".join(sorted(kinds))


@functools.cache
def _combos(eval_side: bool) -> tuple[tuple[str, ...], ...]:
    """Kind-compatible sets of 1-3 kinds (as sorted tuples in KINDS order) on one side of the split."""
    out = []
    for size in SIZE_WEIGHTS:
        for combo in itertools.combinations(KINDS, size):
            if any(frozenset(p) in INCOMPATIBLE for p in itertools.combinations(combo, 2)):
                continue
            if _held_out(f"combo/{_combo_key(combo)}") == eval_side:
                out.append(combo)
    return tuple(out)


def _draw_size(rng: random.Random) -> int:
    return rng.choices(list(SIZE_WEIGHTS), weights=list(SIZE_WEIGHTS.values()))[0]


def _draw_params(combo: tuple[str, ...], request: str, rng: random.Random) -> list[dict]:
    for _ in range(1000):
        cs = [{"kind": k, **KIND_BY_NAME[k].draw(rng)} for k in combo]
        if all(_fits_request(c, request) for c in cs) and not any(
            _params_conflict(a, b) for a, b in itertools.combinations(cs, 2)
        ):
            return cs
    raise RuntimeError(f"no compatible parameters for {combo} with request {request!r}")  # a bug in the tables above


def _row(primary: str, combo: tuple[str, ...], topics: tuple[str, ...], rng: random.Random) -> dict:
    topic = _choice(rng, topics)
    request = _choice(rng, REQUESTS).format(topic=topic)
    cs = _draw_params(combo, request, rng)
    rng.shuffle(cs)
    parts = [request]
    parts += [render_constraint(c, rng.randrange(len(KIND_BY_NAME[c["kind"]].phrasings))) for c in cs]
    return {
        "prompt": [{"role": "user", "content": " ".join(parts)}],
        "constraints": json.dumps(cs),
        "kinds": [c["kind"] for c in cs],
        "primary_kind": primary,
        "topic": topic,
    }


def _by_size(combos, primary: str, size: int) -> list[tuple[str, ...]]:
    """The combinations holding `primary` with `size` kinds, else with the nearest size (the smaller on a tie): few
    single kinds are on the eval side, and a missing one should become a pair, not a triple."""
    with_primary = [c for c in combos if primary in c]
    nearest = min({len(c) for c in with_primary}, key=lambda s: (abs(s - size), s))
    return [c for c in with_primary if len(c) == nearest]


def _train_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(f"constraints/train/{seed}")
    combos, topics = _combos(eval_side=False), _topics(eval_side=False)
    rows = []
    for _ in range(n):
        primary = _choice(rng, KINDS)
        rows.append(_row(primary, _choice(rng, _by_size(combos, primary, _draw_size(rng))), topics, rng))
    return rows


EVAL_SIZE = EVAL_PER_KIND * len(KINDS)


@functools.cache
def _eval_rows_all() -> tuple[str, ...]:
    """The fixed eval split as JSON lines (immutable, so the cache cannot be edited by a caller).

    Row i has primary kind KINDS[i % 16]; among the eval combinations of the drawn size that hold it, the one whose
    other kinds have appeared least so far is taken, so kinds also appear about equally often overall.
    """
    rng = random.Random("constraints/eval")
    combos, topics = _combos(eval_side=True), _topics(eval_side=True)
    seen: Counter = Counter()
    prompts, rows = set(), []
    while len(rows) < EVAL_SIZE:
        primary = KINDS[len(rows) % len(KINDS)]
        candidates = _by_size(combos, primary, _draw_size(rng))
        load = {c: sum(seen[k] for k in c if k != primary) for c in candidates}
        combo = _choice(rng, [c for c in candidates if load[c] == min(load.values())])
        row = _row(primary, combo, topics, rng)
        if row["prompt"][0]["content"] in prompts:
            continue  # a small eval set has no duplicate prompts
        prompts.add(row["prompt"][0]["content"])
        seen.update(row["kinds"])
        rows.append(json.dumps(row))
    return tuple(rows)


def constraints_rows(split: str, n: int, seed: int) -> list[dict]:
    """n rows of `split` ("train" or "eval"); see the module docstring."""
    if split == "train":
        return _train_rows(n, seed)
    if split == "eval":
        rows = _eval_rows_all()
        return [json.loads(rows[i % EVAL_SIZE]) for i in range(n)]
    raise ValueError(f"unknown split {split!r} for task 'constraints'; known splits: {', '.join(CONSTRAINTS_SPLITS)}")


def split_stats() -> dict:
    """The numbers the data card quotes, computed from the code (tests compare the card against them)."""
    ev = constraints_rows("eval", EVAL_SIZE, 0)
    return {
        "kinds": len(KINDS),
        "topics": len(TOPICS),
        "train_topics": len(_topics(False)),
        "eval_topics": len(_topics(True)),
        "requests": len(REQUESTS),
        "train_combinations": len(_combos(False)),
        "eval_combinations": len(_combos(True)),
        "eval_size": EVAL_SIZE,
        "eval_primary_per_kind": dict(Counter(r["primary_kind"] for r in ev)),
        "eval_occurrences_per_kind": dict(Counter(k for r in ev for k in r["kinds"])),
        "eval_constraints_per_prompt": dict(sorted(Counter(len(r["kinds"]) for r in ev).items())),
    }


# --------------------------------------------------------------------------------------------------------------
# Reward and report
# --------------------------------------------------------------------------------------------------------------


def _texts(prompts: list, completions: list, who: str) -> list[tuple[str, str]]:
    if len(prompts) != len(completions):
        raise ValueError(f"{who}: {len(prompts)} prompts but {len(completions)} completions")
    out = []
    for prompt, completion in zip(prompts, completions):
        if not isinstance(prompt, str):  # a conversational prompt: the last user message
            users = [m["content"] for m in prompt if m.get("role") == "user"]
            prompt = users[-1] if users else prompt[-1]["content"]
        if not isinstance(completion, str):
            completion = completion[-1]["content"]
        out.append((prompt, completion))
    return out


def _parsed(prompt: str, i: int, who: str) -> list[dict]:
    cs = parse_constraints(prompt)
    if not cs:
        raise ValueError(
            f"{who}: prompt {i} states no constraint in a phrasing that builtin:constraints generates: {prompt!r}. "
            f"Use prompts from the builtin:constraints dataset (its phrasings are in alignlab/builtin/constraints.py)."
        )
    return cs


def constraints_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """Fraction of each prompt's constraints that its completion satisfies, in [0, 1] (k constraints: steps of 1/k).

    prompts: user prompt texts (or message lists); the constraints are parsed from the text.
    completions: generated assistant texts (special tokens stripped), or message lists.
    kwargs: ignored (TRL passes extra dataset columns).
    """
    del kwargs
    rewards = []
    for i, (prompt, completion) in enumerate(_texts(prompts, completions, "constraints_reward")):
        cs = _parsed(prompt, i, "constraints_reward")
        rewards.append(sum(check_constraint(completion, c) for c in cs) / len(cs))
    return rewards


def constraint_report(prompts: list, completions: list) -> dict:
    """Scores for evaluation.

    strict_accuracy: fraction of prompts with ALL constraints satisfied (IFEval's prompt-level strict accuracy).
    instruction_accuracy: fraction of all constraints satisfied (IFEval's instruction level).
    mean_reward: mean of constraints_reward.
    per_kind: {kind: {"n": constraints of that kind, "accuracy": fraction satisfied}}, for kinds that occur.
    """
    per_kind: dict[str, list[int]] = {}
    strict, rewards, total, satisfied = 0, [], 0, 0
    pairs = _texts(prompts, completions, "constraint_report")
    for i, (prompt, completion) in enumerate(pairs):
        cs = _parsed(prompt, i, "constraint_report")
        oks = [check_constraint(completion, c) for c in cs]
        for c, ok in zip(cs, oks):
            per_kind.setdefault(c["kind"], []).append(ok)
        strict += all(oks)
        rewards.append(sum(oks) / len(oks))
        total += len(oks)
        satisfied += sum(oks)
    n = len(pairs)
    return {
        "n_prompts": n,
        "strict_accuracy": strict / n if n else 0.0,
        "instruction_accuracy": satisfied / total if total else 0.0,
        "mean_reward": sum(rewards) / n if n else 0.0,
        "per_kind": {
            k: {"n": len(per_kind[k]), "accuracy": sum(per_kind[k]) / len(per_kind[k])} for k in KINDS if k in per_kind
        },
    }


def _corpus(rng: random.Random, n: int) -> list[str]:
    """No strings for the builtin tokenizer: that corpus (and so `builtin:tiny-llama`'s tokenizer and every cached
    build) must not change when a task is added; this task is meant for real models with their own tokenizers."""
    del rng, n
    return []
