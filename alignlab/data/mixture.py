"""Dataset mixtures: how many rows each source gives, and which.

A recipe's `dataset: {mix: [{path: a.jsonl, weight: 0.7}, {path: builtin:constraints, weight: 0.3}], size: N}`
reads each source on its own (its columns, format, flips, held-out rows: alignlab.data.build_datasets), then takes
n_i rows of source i and puts them in one seeded order:

- with `size: N`: n_i is N split in proportion to the weights, w_i / sum(w), by largest remainders (the counts sum
  to N exactly; a tie goes to the earlier source). A source with fewer rows than its n_i gives its rows again
  (each once more before any a third time: upsampling, as OpenRLHF and LLaMA-Factory's "all_exhausted" do);
- without `size`: the largest mixture with exactly these proportions that repeats no row, N = min_i(a_i / p_i)
  for a_i available rows and p_i = w_i / sum(w) (the first source to run out sets it: LLaMA-Factory's
  "first_exhausted"), rounded down, then split as above.

Which rows: a seeded permutation of the source's rows, the first n_i of it (another permutation per further pass
when a source repeats). Seeds are the data seed (dataset.seed, else the recipe's) plus the source's index, so the
mixture is the same in every run and on any number of processes (every process builds the same rows; the
trainers shard them afterwards).
"""

from __future__ import annotations

import math
import random

__all__ = ["mixture_counts", "pick_rows"]


def mixture_counts(available: list[int], weights: list[float], size: int | None) -> list[int]:
    """Rows to take from each source: `size` (None: the largest mixture with these proportions that repeats no row)
    split in proportion to `weights` by largest remainders. E.g. available [100, 10], weights [0.7, 0.3], size None:
    N = min(100 / 0.7, 10 / 0.3) = 33.3 -> 33, split 23.1 / 9.9 -> [23, 10]."""
    total = sum(weights)
    shares = [w / total for w in weights]
    if size is None:
        size = math.floor(min(a / p for a, p in zip(available, shares)) + 1e-9)
    exact = [p * size for p in shares]
    counts = [math.floor(x + 1e-9) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: size - sum(counts)]:
        counts[i] += 1
    return counts


def pick_rows(available: int, n: int, seed: int) -> list[int]:
    """`n` row indices of a source of `available` rows: the first n of seeded permutations of all its rows, one
    permutation per pass (so a row comes again only after every row has come as often)."""
    if available == 0:
        return []
    rng = random.Random(seed)
    rows: list[int] = []
    while len(rows) < n:
        rows += rng.sample(range(available), available)
    return rows[:n]
