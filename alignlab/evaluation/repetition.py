"""Degeneration measures of one response: how much of it repeats itself.

Preference optimisation on a small model can win a reward by collapsing into loops ("The ocean is done done done
...", "unending, unending, unending"): the reward rises while the text stops being language. These catch it:

    words(text)               lowercased runs of letters, digits and apostrophes ("Don't stop!" -> don't, stop)
    repeated_ngram_share      1 - distinct / total word n-grams (n = 3 by default): the share of the response's
                              3-grams that already occurred in it. 0 for a text without repeats; "a b a b a b" has
                              four 3-grams, two of them distinct: 0.5.
    distinct_n                distinct / total word n-grams (n = 2 by default: distinct-2, Li et al. 2016,
                              arXiv 1510.03055, here per response rather than over the corpus, so it has a
                              per-prompt value to pair and to put an interval on).
A response with fewer than n words has no n-grams: repeated share 0, distinct 1 (nothing in it repeats).
Standard library only.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    w = words(text)
    return [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]


def repeated_ngram_share(text: str, n: int = 3) -> float:
    grams = _ngrams(text, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def distinct_n(text: str, n: int = 2) -> float:
    grams = _ngrams(text, n)
    return len(set(grams)) / len(grams) if grams else 1.0
