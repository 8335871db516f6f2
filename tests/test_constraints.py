"""builtin:constraints: every checker on hand-written cases, the prompt -> constraints round trip, the held-out
split, eval balance, determinism, the reward and report, and the `builtin:` reward names."""

import itertools
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from alignlab.builtin import constraints as C
from alignlab.builtin.tasks import arith_reward, generate_task
from alignlab.data import build_datasets
from alignlab.recipe import DatasetSpec
from alignlab.rewards import load_reward_fn

CARD = Path(__file__).resolve().parents[1] / "data_cards" / "constraints.md"


def _text(row) -> str:
    return row["prompt"][0]["content"]


def _combo(row) -> str:
    return "+".join(sorted(row["kinds"]))


# --------------------------------------------------------------------------------------------------------------
# Checkers: (constraint, response, expected)
# --------------------------------------------------------------------------------------------------------------

W = {"kind": "word_count"}
S = {"kind": "sentence_count"}
CASES = [
    # Words: letters/digits runs; "don't" and "well-known" are one word; markdown markers are none.
    ({**W, "relation": "at most", "n": 5}, "One two three four five.", True),
    ({**W, "relation": "at most", "n": 5}, "One two three four five six.", False),
    ({**W, "relation": "at most", "n": 4}, "Don't  use well-known\n\n words!", True),  # 4 words
    ({**W, "relation": "at most", "n": 3}, "Don't  use well-known\n\n words!", False),
    ({**W, "relation": "at least", "n": 3}, "* a\n* b", False),  # 2 words, the bullets are not words
    ({**W, "relation": "at least", "n": 3}, "Hi there, friend!", True),
    ({**W, "relation": "at most", "n": 20}, "", False),  # no word at all satisfies nothing
    ({**W, "relation": "at most", "n": 20}, "  ...!  ", False),
    # Sentences end at . ! ? followed by whitespace or the end; a trailing fragment counts; "3.5" does not split.
    ({**S, "relation": "exactly", "n": 2}, "The moon is bright. It glows!", True),
    ({**S, "relation": "exactly", "n": 2}, "It costs 3.5 dollars. Really?", True),
    ({**S, "relation": "exactly", "n": 2}, "One. Two. Three.", False),
    ({**S, "relation": "exactly", "n": 2}, "One. Two", True),
    ({**S, "relation": "exactly", "n": 2}, 'He said "hi." Then he left.', True),
    ({**S, "relation": "exactly", "n": 1}, "Wait... what?", False),  # "Wait..." + "what?"
    ({**S, "relation": "exactly", "n": 1}, "<<Owls>>\nOwls hunt at night.", True),  # a title line is no sentence
    ({**S, "relation": "at most", "n": 2}, "A. B. C.", False),
    ({**S, "relation": "at least", "n": 3}, "A! B? C.\n", True),
    # Case: a letter is needed (a number alone has no case); any capital (lowercase) or small letter fails.
    ({"kind": "lowercase"}, "all lowercase, even 42 and é.", True),
    ({"kind": "lowercase"}, "all lowercase but One", False),
    ({"kind": "lowercase"}, "42", False),
    ({"kind": "lowercase"}, "p.s. lower is fine\n", True),
    ({"kind": "uppercase"}, "ALL CAPS, 42 TIMES!", True),
    ({"kind": "uppercase"}, "ALL CAPS BUT one", False),
    ({"kind": "uppercase"}, "42", False),
    # Keywords: whole words, any case, next to punctuation.
    ({"kind": "include_keyword", "word": "simple"}, "It is (Simple).", True),
    ({"kind": "include_keyword", "word": "simple"}, "the simplest way", False),
    ({"kind": "include_keyword", "word": "simple"}, "SIMPLE-minded", True),
    ({"kind": "exclude_word", "word": "the"}, "Then they left.", True),
    ({"kind": "exclude_word", "word": "the"}, "THE end", False),
    ({"kind": "exclude_word", "word": "it"}, "It's late.", False),  # the apostrophe ends the word "it"
    # Letters, either case.
    ({"kind": "include_letter", "letter": "z", "n": 2}, "Zebras zoom", True),
    ({"kind": "include_letter", "letter": "z", "n": 2}, "zebras", False),
    ({"kind": "avoid_letter", "letter": "q"}, "Quiet please", False),
    ({"kind": "avoid_letter", "letter": "q"}, "Silent please", True),
    # Phrases: exact case; leading/trailing whitespace ignored; the start phrase must end at a word boundary.
    ({"kind": "start_phrase", "phrase": "Of course"}, "  Of course! Owls hunt.", True),
    ({"kind": "start_phrase", "phrase": "Of course"}, "Of course", True),
    ({"kind": "start_phrase", "phrase": "Of course"}, "of course they do", False),
    ({"kind": "start_phrase", "phrase": "Of course"}, "Of courses are served", False),
    ({"kind": "start_phrase", "phrase": "Of course"}, '"Of course," she said.', False),
    ({"kind": "end_phrase", "phrase": "Thank you."}, "Owls hunt. Thank you.\n  ", True),
    ({"kind": "end_phrase", "phrase": "Thank you."}, "Thank you. Owls hunt.", False),
    ({"kind": "end_phrase", "phrase": "Thank you."}, "Owls hunt. thank you.", False),
    ({"kind": "end_phrase", "phrase": "Thank you."}, "Owls hunt. Thank you", False),
    # Bullets: lines starting with "* " or "- " (indent allowed); not "**bold**", "***" or "*word".
    ({"kind": "bullets", "n": 2}, "* a\n* b", True),
    ({"kind": "bullets", "n": 2}, "Intro:\n  - a\n- b\n", True),
    ({"kind": "bullets", "n": 2}, "* a\n* b\n* c", False),
    ({"kind": "bullets", "n": 2}, "**Bold** intro\n***\n* a\n* b", True),
    ({"kind": "bullets", "n": 2}, "*a\n*b", False),
    # JSON: the whole response (or one ``` fence) is an object holding the keys; extra keys are fine.
    ({"kind": "json_keys", "keys": ["title", "body"]}, '{"title": "Owls", "body": "They hunt."}', True),
    ({"kind": "json_keys", "keys": ["title", "body"]}, '```json\n{"title": "a", "body": "b", "x": 1}\n```\n', True),
    ({"kind": "json_keys", "keys": ["answer"]}, '```\n{"answer": "yes"}\n```', True),
    ({"kind": "json_keys", "keys": ["title", "body"]}, '{"title": "Owls"}', False),
    ({"kind": "json_keys", "keys": ["title"]}, '["title"]', False),
    ({"kind": "json_keys", "keys": ["title"]}, 'Here it is: {"title": "Owls"}', False),
    ({"kind": "json_keys", "keys": ["title"]}, '{"title": "Owls",}', False),  # trailing comma: invalid JSON
    ({"kind": "json_keys", "keys": ["title"]}, '{"title": "Owls hunt at', False),  # cut off by max_new_tokens
    # Title: <<...>> on one line with something inside.
    ({"kind": "title"}, "<<Night Owls>>\nOwls hunt.", True),
    ({"kind": "title"}, "Owls <<hunt>> at night", True),
    ({"kind": "title"}, "<<  >> Owls", False),
    ({"kind": "title"}, "<Night Owls> Owls", False),
    ({"kind": "title"}, "<<Night\nOwls>>", False),
    ({"kind": "no_commas"}, "No commas here.", True),
    ({"kind": "no_commas"}, "One, two", False),
    ({"kind": "no_commas"}, "full-width\uff0ccomma", False),
    # Paragraphs: split at "***"; an empty part at either end is ignored, an empty middle one fails.
    ({"kind": "paragraphs", "n": 2}, "First.\n***\nSecond.", True),
    ({"kind": "paragraphs", "n": 2}, "First. *** Second.", True),
    ({"kind": "paragraphs", "n": 2}, "First.\n***\nSecond.\n***\n", True),
    ({"kind": "paragraphs", "n": 2}, "First.\n***\n***\nSecond.", False),
    ({"kind": "paragraphs", "n": 2}, "First.\n\nSecond.", False),
    ({"kind": "paragraphs", "n": 2}, "A\n***\nB\n***\nC", False),
    # Postscript: "P.S." at the start of a line, any case.
    ({"kind": "postscript"}, "Owls hunt.\nP.S. They are quiet.", True),
    ({"kind": "postscript"}, "Owls hunt.\n  p. s. quiet", True),
    ({"kind": "postscript"}, "Owls hunt. P.S. They are quiet.", False),
    ({"kind": "postscript"}, "Owls hunt.\nPS: quiet", False),
]


@pytest.mark.parametrize(("constraint", "response", "expected"), CASES)
def test_checker(constraint, response, expected):
    assert C.check_constraint(response, constraint) is expected


def test_every_kind_has_pass_and_fail_cases():
    outcomes = {(c["kind"], expected) for c, _, expected in CASES}
    assert outcomes == {(k, e) for k in C.KINDS for e in (True, False)}
    assert len(C.KINDS) == 16


# --------------------------------------------------------------------------------------------------------------
# Parsing back what was generated
# --------------------------------------------------------------------------------------------------------------


def test_every_phrasing_of_every_kind_parses_back():
    rng = C.random.Random(0)
    for kind in C.KIND_LIST:
        for i in range(len(kind.phrasings)):
            for _ in range(20):
                c = {"kind": kind.name, **kind.draw(rng)}
                text = "Tell me about owls. " + C.render_constraint(c, i)
                assert C.parse_constraints(text) == [c], text


def test_generated_prompts_parse_back_to_their_constraints():
    rows = generate_task("constraints", "train", 3000, seed=5) + generate_task("constraints", "eval", C.EVAL_SIZE)
    for row in rows:
        assert C.parse_constraints(_text(row)) == json.loads(row["constraints"]), _text(row)
        assert row["kinds"] == [c["kind"] for c in json.loads(row["constraints"])]
        assert 1 <= len(row["kinds"]) <= 3 and row["primary_kind"] in row["kinds"]
    # Every kind and every phrasing was generated.
    texts = " ".join(_text(r) for r in rows)
    for kind in C.KIND_LIST:
        for template in kind.phrasings:
            assert re.search(C._phrasing_regex(template), texts), template


def test_no_incompatible_combination_is_drawn():
    rows = generate_task("constraints", "train", 3000, seed=1) + generate_task("constraints", "eval", C.EVAL_SIZE)
    for row in rows:
        cs = json.loads(row["constraints"])
        for a, b in itertools.combinations(cs, 2):
            assert frozenset((a["kind"], b["kind"])) not in C.INCOMPATIBLE, _text(row)
            assert not C._params_conflict(a, b), _text(row)
        # Nothing to avoid is in the request itself ("Share a fun fact ..." never comes with: avoid "fun").
        (request,) = [
            r.format(topic=row["topic"]) for r in C.REQUESTS if _text(row).startswith(r.format(topic=row["topic"]))
        ]
        for c in cs:
            if c["kind"] == "avoid_letter":
                assert c["letter"] not in request.lower(), _text(row)
            if c["kind"] == "exclude_word":
                assert not re.search(rf"\b{c['word']}\b", request, re.I), _text(row)
    # The parameter rules themselves, on the examples the docstring gives.
    low, up = {"kind": "lowercase"}, {"kind": "uppercase"}
    assert C._params_conflict(low, {"kind": "start_phrase", "phrase": "Of course"})
    assert C._params_conflict({"kind": "no_commas"}, {"kind": "json_keys", "keys": ["title", "body"]})
    assert not C._params_conflict({"kind": "no_commas"}, {"kind": "json_keys", "keys": ["answer"]})
    assert C._params_conflict(
        {"kind": "avoid_letter", "letter": "y"}, {"kind": "end_phrase", "phrase": "Have a nice day!"}
    )
    assert C._params_conflict({"kind": "exclude_word", "word": "is"}, {"kind": "start_phrase", "phrase": "Here is"})
    assert C._params_conflict({"kind": "avoid_letter", "letter": "p"}, {"kind": "postscript"})
    assert not C._params_conflict(up, {"kind": "postscript"}) and not C._params_conflict(low, {"kind": "postscript"})


def test_a_compatible_triple_is_satisfiable():
    """lowercase + one-key JSON + no commas all hold in one response (and the reward says so)."""
    prompt = (
        "Tell me about owls. Write everything in lowercase letters only. Format your entire response as a JSON "
        'object with the key "answer". Do not use any commas in your response.'
    )
    assert [c["kind"] for c in C.parse_constraints(prompt)] == ["lowercase", "json_keys", "no_commas"]
    assert C.constraints_reward([prompt], ['```json\n{"answer": "owls hunt at night"}\n```']) == [1.0]


# --------------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------------


def test_train_and_eval_share_no_topic_and_no_combination():
    train = generate_task("constraints", "train", 5000, seed=0) + generate_task("constraints", "train", 2000, seed=9)
    evals = generate_task("constraints", "eval", C.EVAL_SIZE)
    assert not {r["topic"] for r in train} & {r["topic"] for r in evals}
    assert not {_combo(r) for r in train} & {_combo(r) for r in evals}
    assert not {_text(r) for r in train} & {_text(r) for r in evals}
    # The sides are the hash buckets, whatever the seed, and both are non-trivial.
    assert {r["topic"] for r in evals} <= set(C._topics(eval_side=True))
    assert len(C._topics(eval_side=True)) > 50 and len(C._topics(eval_side=False)) > 250
    assert {_combo(r) for r in evals} <= {"+".join(sorted(c)) for c in C._combos(eval_side=True)}
    # No duplicate prompt in the eval split.
    assert len({_text(r) for r in evals}) == C.EVAL_SIZE


def test_eval_split_has_an_equal_share_per_kind():
    evals = generate_task("constraints", "eval", C.EVAL_SIZE)
    assert C.EVAL_SIZE == 480
    assert Counter(r["primary_kind"] for r in evals) == {k: 30 for k in C.KINDS}
    # Any prefix is balanced within one prompt per kind (40 prompts: 8 kinds x 3 + 8 kinds x 2).
    assert sorted(Counter(r["primary_kind"] for r in evals[:40]).values()) == [2] * 8 + [3] * 8
    # Counting every constraint (not only the primary one), kinds appear within 15% of each other.
    occurrences = Counter(k for r in evals for k in r["kinds"])
    assert set(occurrences) == set(C.KINDS)
    assert max(occurrences.values()) <= 1.15 * min(occurrences.values())


def test_generation_is_deterministic_and_eval_is_fixed():
    a = generate_task("constraints", "train", 200, seed=3)
    assert a == generate_task("constraints", "train", 200, seed=3)
    assert a != generate_task("constraints", "train", 200, seed=4)
    assert generate_task("constraints", "train", 50, seed=3) == a[:50]
    full = generate_task("constraints", "eval", C.EVAL_SIZE, seed=0)
    assert generate_task("constraints", "eval", 40, seed=7) == full[:40]  # seed ignored, prefix of the fixed list
    assert generate_task("constraints", "eval", C.EVAL_SIZE + 5)[C.EVAL_SIZE :] == full[:5]  # then it repeats
    with pytest.raises(
        ValueError,
        match="unknown split 'test' for task 'constraints'; known splits: train, eval, sft, sft_eval, preference, "
        "preference_eval",
    ):
        generate_task("constraints", "test", 1)
    # arith keeps its own splits.
    with pytest.raises(ValueError, match="known splits: sft, preference, eval"):
        generate_task("arith", "train", 1)


def test_builtin_dataset_takes_train_rows_and_held_out_rows_from_eval():
    spec = DatasetSpec(path="builtin:constraints", split="train", size=30, eval_size=20)
    train, held_out = build_datasets(spec, None, "ppo", chat=False)
    assert train.column_names == ["prompt"] and len(train) == 30 and len(held_out) == 20
    # The recipe seed (0 here) picks the train rows; held-out rows are the fixed eval split's first 20.
    assert [_text(r) for r in train] == [_text(r) for r in generate_task("constraints", "train", 30, seed=0)]
    assert [_text(r) for r in held_out] == [_text(r) for r in generate_task("constraints", "eval", 20)]


# --------------------------------------------------------------------------------------------------------------
# Reward and report
# --------------------------------------------------------------------------------------------------------------

PROMPT3 = (
    "Write a short note about owls. Answer with at most 10 words. Do not use any commas in your response. "
    'Include the keyword "quiet" in your response.'
)


def test_reward_is_the_fraction_of_constraints_satisfied():
    completions = [
        "Owls are quiet hunters and they fly at night.",  # 9 words, no comma, "quiet": 3/3
        "Owls are quiet hunters, and they fly at night.",  # a comma: 2/3
        "Owls, being silent hunters of the night, fly over fields and catch mice.",  # 13 words, comma: 0/3
        "",  # nothing: 0/3
    ]
    rewards = C.constraints_reward([PROMPT3] * 4, completions)
    assert [round(r, 6) for r in rewards] == [1.0, round(2 / 3, 6), 0.0, 0.0]
    # Conversational inputs (message lists) give the same scores; extra TRL columns are ignored.
    messages = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT3}]] * 2
    answers = [[{"role": "assistant", "content": c}] for c in completions[:2]]
    assert C.constraints_reward(messages, answers, kinds=[["x"]] * 2) == rewards[:2]


def test_reward_errors_name_the_problem():
    with pytest.raises(ValueError, match="constraints_reward: 1 prompts but 2 completions"):
        C.constraints_reward([PROMPT3], ["a", "b"])
    with pytest.raises(ValueError, match=r"prompt 1 states no constraint in a phrasing that builtin:constraints"):
        C.constraints_reward([PROMPT3, "What is 4+5?"], ["a", "b"])


def test_constraint_report_counts_per_kind():
    """Prompt 1 (3 constraints) gets 2/3 right; prompt 2 (word_count + title) gets both:
    strict = 1/2; instruction level = (2 + 2) / 5 = 0.8; mean reward = (2/3 + 1) / 2 = 5/6;
    word_count 2/2, no_commas 0/1, include_keyword 1/1, title 1/1."""
    p2 = "Tell me about owls. Answer with at least 3 words. Include a title in double angular brackets, like <<a title>>."
    report = C.constraint_report([PROMPT3, p2], ["Owls are quiet hunters, and fly.", "<<Owls>> They fly at night."])
    assert report["n_prompts"] == 2 and report["strict_accuracy"] == 0.5
    assert math.isclose(report["instruction_accuracy"], 0.8) and math.isclose(report["mean_reward"], 5 / 6)
    assert report["per_kind"] == {
        "word_count": {"n": 2, "accuracy": 1.0},
        "include_keyword": {"n": 1, "accuracy": 1.0},
        "title": {"n": 1, "accuracy": 1.0},
        "no_commas": {"n": 1, "accuracy": 0.0},
    }


def test_builtin_reward_names_resolve_through_load_reward_fn():
    assert load_reward_fn("builtin:constraints") is C.constraints_reward
    assert load_reward_fn("builtin:arith") is arith_reward
    assert load_reward_fn("alignlab.builtin.tasks:arith_reward") is arith_reward  # module:function still works
    assert load_reward_fn("alignlab.builtin.constraints:constraints_reward") is C.constraints_reward
    with pytest.raises(ValueError, match="unknown built-in reward function 'builtin:chess'; known: builtin:arith, "):
        load_reward_fn("builtin:chess")


# --------------------------------------------------------------------------------------------------------------
# The data card quotes the code's numbers
# --------------------------------------------------------------------------------------------------------------


def test_data_card_numbers_match_the_code():
    card = CARD.read_text()
    st = C.split_stats()
    assert f"| topics (train / eval) | {st['topics']} ({st['train_topics']} / {st['eval_topics']}) |" in card
    assert f"| kind combinations (train / eval) | {st['train_combinations']} / {st['eval_combinations']} |" in card
    assert f"| request templates | {st['requests']} |" in card
    assert f"| eval prompts | {st['eval_size']} ({st['eval_size'] // st['kinds']} per primary kind) |" in card
    per_prompt = " / ".join(str(st["eval_constraints_per_prompt"][k]) for k in (1, 2, 3))
    assert f"| eval prompts with 1 / 2 / 3 constraints | {per_prompt} |" in card
    occ = st["eval_occurrences_per_kind"]
    assert f"| eval constraints per kind (min-max) | {min(occ.values())}-{max(occ.values())} |" in card
    for kind in C.KINDS:
        assert f"`{kind}`" in card


def test_registering_the_task_leaves_the_builtin_tokenizer_corpus_unchanged():
    """tiny-llama's tokenizer is trained on task_corpus(); a new task must not change it (or every cached build)."""
    from alignlab.builtin.tasks import BUILTIN_TASKS, task_corpus

    assert "constraints" in BUILTIN_TASKS
    assert task_corpus(0, 50) == BUILTIN_TASKS["arith"].corpus(C.random.Random("corpus/0"), 50)


# --------------------------------------------------------------------------------------------------------------
# Demonstrations and preference pairs (alignlab/builtin/constraint_demos.py)
# --------------------------------------------------------------------------------------------------------------


def test_demonstrations_satisfy_every_constraint_and_rejected_answers_miss_one():
    """Every `sft` / `sft_eval` completion earns reward 1; every pair's chosen earns 1 and its rejected (k - 1) / k
    for k constraints (a near miss: all but one); rows keep the prompt columns, and held-out rows come from eval
    prompts only (their topics are all eval topics)."""
    from alignlab.builtin.constraint_demos import DEMO_SPLITS

    rows = {split: generate_task("constraints", split, 300) for split in DEMO_SPLITS}
    for split in ("sft", "sft_eval"):
        texts = [r["completion"][0]["content"] for r in rows[split]]
        assert C.constraints_reward([_text(r) for r in rows[split]], texts) == [1.0] * 300
    for split in ("preference", "preference_eval"):
        prompts = [_text(r) for r in rows[split]]
        assert C.constraints_reward(prompts, [r["chosen"][0]["content"] for r in rows[split]]) == [1.0] * 300
        missed = C.constraints_reward(prompts, [r["rejected"][0]["content"] for r in rows[split]])
        k = [len(json.loads(r["constraints"])) for r in rows[split]]
        assert [round(m * n) for m, n in zip(missed, k)] == [n - 1 for n in k]
    eval_topics = set(C._topics(eval_side=True))
    assert {r["topic"] for r in rows["sft_eval"] + rows["preference_eval"]} <= eval_topics
    assert not {r["topic"] for r in rows["sft"] + rows["preference"]} & eval_topics
    assert set(rows["sft"][0]) == {"prompt", "constraints", "kinds", "primary_kind", "topic", "completion"}
    assert generate_task("constraints", "sft", 100) == rows["sft"][:100]  # deterministic, prefixes agree


def test_demonstrations_cover_almost_every_prompt_and_every_kind():
    """The layout search finds a demonstration for all but a few prompts (measured: 16 of the first 2,000 train
    prompts, mostly a long answer in exactly one sentence) and a near miss for all but 172 more, for every kind;
    every word and letter a prompt may ban leaves at least 4 topic sentences to build from."""
    from alignlab.builtin.constraint_demos import _SENTENCES, demonstrate, near_miss

    prompts = generate_task("constraints", "train", 2000)
    found = [r for r in prompts if demonstrate(r) is not None]  # the layout search, once per prompt
    assert len(prompts) - len(found) <= 20
    assert sum(near_miss(r) is None for r in found) <= 200
    done = Counter(k for r in found for k in r["kinds"])
    assert set(done) == set(C.KINDS) and min(done.values()) > 100
    for letter in C.AVOID_LETTERS:
        assert sum(letter not in s.format(t="").lower() for s in _SENTENCES) >= 4, letter
    for word in C.AVOID_WORDS:
        assert sum(not C.has_word(s.format(t=""), word) for s in _SENTENCES) >= 4, word


# ---------------------------------------------------------------------------------------------------------------
# revise (`revise_fn: builtin:constraints`): the model's own sentences, laid out by code
# ---------------------------------------------------------------------------------------------------------------

_ANSWER = (
    "Sure, here is a start. Pottery is a craft that shapes clay into useful things. Many people find it calming "
    "to work with their hands. The wheel spins while"  # a fragment cut off by the token limit
)


@pytest.mark.parametrize(
    "prompt",
    [
        "Write the opening of a blog post about pottery. Your entire response must be in lowercase letters, with no "
        'capital letters at all. Make sure to use the word "friendly".',
        'Write a short review of pottery. Your whole answer must be valid JSON: an object with the key "summary".',
        'Tell me about pottery. Use exactly 3 markdown bullet points, each on its own line starting with "* ".',
        "Write a short note about pottery. Your response must have 2 paragraphs with a line of *** between them.",
        'Give a brief overview of pottery. Start your response with the exact phrase "Sure thing". End your response '
        'with the exact phrase "Hope this helps." with no other words after it.',
        "Write a short message to a friend about pottery. Write everything in capital letters only. Do not use any "
        "commas in your response.",
    ],
)
def test_revise_lays_the_models_own_sentences_out_to_meet_every_constraint(prompt):
    from alignlab.builtin.constraint_demos import answer_sentences, revise
    from alignlab.builtin.constraints import constraints_reward, parse_constraints

    assert len(parse_constraints(prompt)) >= 1
    assert constraints_reward([prompt], [_ANSWER]) != [1.0]
    (revised,) = revise([prompt], [_ANSWER])
    assert constraints_reward([prompt], [revised]) == [1.0]
    own = answer_sentences(_ANSWER)
    assert own == [
        "Sure, here is a start.",
        "Pottery is a craft that shapes clay into useful things.",
        "Many people find it calming to work with their hands.",
    ]  # the cut-off fragment is dropped
    # Every sentence of the script the code-written demonstrations use is absent: the body is the model's.
    assert "people often talk about" not in revised.lower()
    assert any(s.lower().rstrip(".") in revised.lower() for s in own)
    assert "the wheel spins while" not in revised.lower()


def test_revise_says_each_sentence_once():
    """A revision never repeats a sentence: training on answers that repeat themselves teaches the copy that greedy
    decoding turns into loops. The model's own repeats are dropped (the first kept, in order), and a postscript says
    a sentence the body does not (one left over, else a short closing line), where it once copied one of the body's:
    2 in 3 of the postscripts of SmolLM2's revised answers did."""
    from alignlab.builtin.constraint_demos import _POSTSCRIPTS, answer_sentences, revise
    from alignlab.builtin.constraints import constraints_reward

    looping = "Owls hunt at night. They fly without a sound. Owls hunt at night. OWLS HUNT AT NIGHT. They see well."
    assert answer_sentences(looping) == ["Owls hunt at night.", "They fly without a sound.", "They see well."]
    ps_rule = "End with a postscript that starts with P.S."
    for n_words in range(3, 9):  # bodies of different lengths: some use every sentence, some leave one over
        prompt = f"Tell me about owls. {ps_rule} Answer with at least {n_words} words."
        for answer in (looping, _ANSWER):
            (revised,) = revise([prompt], [answer])
            assert constraints_reward([prompt], [revised]) == [1.0]
            body, ps = revised.split("\n\nP.S. ")
            assert ps not in body, revised
            assert ps in answer_sentences(answer) or ps in _POSTSCRIPTS, revised
            said = [s for s in answer_sentences(answer) if s in revised]
            assert all(revised.count(s) == 1 for s in said), revised


def test_the_demonstrations_are_the_ones_measured():
    """The code-written demonstrations (splits sft, preference) are the rows the README's SFT -> DPO results were
    measured on: their postscripts are still drawn from the whole script (only revise stopped repeating sentences).
    The digest is of the first 200 sft and 100 preference rows; it changes only with the demonstrations."""
    import hashlib

    from alignlab.builtin.constraint_demos import rows

    made = json.dumps(rows("sft", 200, 0) + rows("preference", 100, 0), sort_keys=True)
    assert (
        hashlib.sha256(made.encode()).hexdigest() == "f6c58020c5367f6dd55eef2c046b82821fdc5ae45ed0fd3195ca9947ba5f0265"
    )


def test_revise_keeps_what_it_cannot_revise():
    from alignlab.builtin.constraint_demos import revise

    rule = "Do not use any commas in your response."
    assert revise([f"Tell me about pottery. {rule}"], ["Too short."]) == [None]  # fewer than 2 whole sentences
    assert revise([f"Say something nice. {rule}"], [_ANSWER]) == [None]  # not a request of the task
    # Every sentence has an "e": nothing is left to lay out (and a postscript has nothing to say).
    no_e = 'Tell me about pottery. Do not use the letter "e" anywhere in your response. End with a postscript that starts with P.S.'
    assert len(C.parse_constraints(no_e)) == 2
    assert revise([no_e], [_ANSWER]) == [None]
