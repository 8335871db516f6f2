"""Reporting statistics (docs/algorithms.md, "Reporting statistics"): small pure functions, standard library only.

Every summary is a dict {"value", "stderr", "ci": [lo, hi], "n"} at 95% (z = 1.959964):
- `rate`: a fraction of 0/1 outcomes, p = k / n; stderr sqrt(p (1 - p) / n); the Wilson score interval (Wilson 1927),
  which stays inside [0, 1] and keeps its coverage near 0 and 1 and for small n, where p +- z stderr does not
  (at p = 0 that interval is [0, 0]).
- `mean`: mean +- z s / sqrt(n), s the sample standard deviation (n - 1), clipped to the values' range when one is
  given. For outcomes that are not 0/1 (rewards in [0, 1], ties counted 1/2 in a win rate, a KL estimate per
  prompt).
- `ratio`: sum(a) / sum(b) over units i (NLL per token: a_i the summed NLL of text i, b_i its token count), with
  the delta-method stderr sqrt(sum((a_i - R b_i)^2) / (n (n - 1))) / mean(b). Units, not tokens, are the
  independent draws: tokens of one text are not independent.
- `paired_difference`: two measurements of the same units (two models on the same prompts): the mean of the
  per-unit differences d_i = a_i - b_i with the stderr of d, which is smaller than the unpaired one whenever
  the two are positively correlated (easy prompts are easy for both).
- `paired_ratio_difference`: the same for ratios with a shared denominator: sum(a - b) / sum(n).
- `spread`: over training seeds: mean, sample standard deviation, min, max (no interval: 3 seeds are too few to
  pretend one).
- `win_rate`: how often a beats b on paired units (policy vs reference scores on the same prompts; a chosen vs a
  rejected answer's reward, a pair accuracy): the `mean` of the outcomes 1 (a > b), 1/2 (a tie), 0, clipped to
  [0, 1], with the counts of wins, ties and losses.
- `perplexity`: exp of the NLL per token (a `ratio`); the interval maps through exp, the stderr by the delta method.
These are the one home of each eval number: the evaluator and the `evaluate` modules in alignlab/metrics/ call them.
n = 0 gives nan everywhere; n = 1 gives stderr nan (nothing to estimate a spread from), and the interval [nan, nan],
except Wilson, which is defined for any n >= 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
NAN = float("nan")


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials:
    (p + z^2 / 2n -+ z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n), p = k / n."""
    if n <= 0:
        return NAN, NAN
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 (k = n) the bound is exactly 0 (1); computed, it is off by a rounding error (1e-17).
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return lo, hi


def rate(outcomes: Sequence[float], z: float = Z95) -> dict:
    """A rate from 0/1 outcomes (True/False work), with the Wilson interval."""
    n = len(outcomes)
    if any(x not in (0, 1) for x in outcomes):
        raise ValueError("rate() takes 0/1 outcomes; use mean() for fractional ones (e.g. ties counted 1/2)")
    k = sum(outcomes)
    p = k / n if n else NAN
    return _summary(p, math.sqrt(p * (1 - p) / n) if n else NAN, wilson_interval(k, n, z), n)


def mean(values: Sequence[float], z: float = Z95, bounds: tuple[float, float] | None = None) -> dict:
    """A mean with its normal 95% interval, mean +- z s / sqrt(n), clipped to `bounds` (lo, hi) when the values
    cannot leave them (a win rate in [0, 1]: the interval never claims 1.06)."""
    n = len(values)
    if n == 0:
        return _summary(NAN, NAN, (NAN, NAN), 0)
    m = math.fsum(values) / n
    se = math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1) / n) if n > 1 else NAN
    lo, hi = m - z * se, m + z * se
    if bounds is not None and n > 1:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return _summary(m, se, (lo, hi), n)


def ratio(numerators: Sequence[float], denominators: Sequence[float], z: float = Z95) -> dict:
    """sum(a) / sum(b) with the delta-method stderr over units (module docstring)."""
    n = len(numerators)
    if n != len(denominators):
        raise ValueError(f"ratio(): {n} numerators but {len(denominators)} denominators")
    total = math.fsum(denominators)
    if n == 0 or total == 0:
        return _summary(NAN, NAN, (NAN, NAN), n)
    r = math.fsum(numerators) / total
    if n == 1:
        return _summary(r, NAN, (NAN, NAN), 1)
    resid = math.fsum((a - r * b) ** 2 for a, b in zip(numerators, denominators))
    se = math.sqrt(resid / (n * (n - 1))) / (total / n)
    return _summary(r, se, (r - z * se, r + z * se), n)


def paired_difference(a: Sequence[float], b: Sequence[float], z: float = Z95) -> dict:
    """mean(a - b) over paired units, with the stderr of the differences."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference(): {len(a)} and {len(b)} values; pairs need the same units")
    return mean([x - y for x, y in zip(a, b)], z)


def paired_ratio_difference(
    a: Sequence[float], b: Sequence[float], denominators: Sequence[float], z: float = Z95
) -> dict:
    """sum(a) / sum(n) - sum(b) / sum(n) over paired units sharing the denominators n (e.g. two models' NLL on the
    same texts): the ratio of the per-unit differences."""
    if not len(a) == len(b) == len(denominators):
        raise ValueError("paired_ratio_difference(): a, b and the denominators need one value per unit each")
    return ratio([x - y for x, y in zip(a, b)], denominators, z)


def outcome(margin: float) -> float:
    """One paired comparison: 1 when the margin a - b is positive, 1/2 when it is 0 (a tie: no preference is chance
    level), 0 otherwise."""
    return 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0


def win_rate(a: Sequence[float], b: Sequence[float], z: float = Z95) -> dict:
    """(wins + ties / 2) / n of a against b over paired units: the `mean` of the per-unit outcomes (interval clipped
    to [0, 1]), plus "wins", "ties", "losses" (counts) and "outcomes" (per unit, in order)."""
    if len(a) != len(b):
        raise ValueError(f"win_rate(): {len(a)} and {len(b)} scores; a paired comparison needs the same units")
    outcomes = [outcome(x - y) for x, y in zip(a, b)]
    wins, ties = outcomes.count(1.0), outcomes.count(0.5)
    summary = mean(outcomes, z, bounds=(0.0, 1.0))
    return {**summary, "wins": wins, "ties": ties, "losses": len(outcomes) - wins - ties, "outcomes": outcomes}


def perplexity(nll: Sequence[float], num_tokens: Sequence[int], z: float = Z95) -> dict:
    """exp(sum(nll) / sum(num_tokens)) over texts (nll_i: text i's summed NLL, nats): exp of the `ratio`, its
    interval mapped through exp and its stderr exp(R) se(R) (delta method)."""
    return _exp(ratio(nll, num_tokens, z))


def spread(values: Sequence[float]) -> dict:
    """Over repeated runs (training seeds): {"mean", "std" (sample, n - 1), "min", "max", "n", "values"}."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(vals)
    m = math.fsum(vals) / n if n else NAN
    std = math.sqrt(math.fsum((v - m) ** 2 for v in vals) / (n - 1)) if n > 1 else NAN
    return {
        "mean": m,
        "std": std,
        "min": min(vals) if vals else NAN,
        "max": max(vals) if vals else NAN,
        "n": n,
        "values": vals,
    }


def _summary(value: float, stderr: float, ci: tuple[float, float], n: int) -> dict:
    return {"value": value, "stderr": stderr, "ci": [ci[0], ci[1]], "n": n}


def _exp(summary: dict) -> dict:
    """exp of a log-scale summary: the interval maps through exp, the stderr by the delta method (exp(x) * se)."""
    value = math.exp(summary["value"])
    return {**summary, "value": value, "stderr": value * summary["stderr"], "ci": [math.exp(c) for c in summary["ci"]]}
