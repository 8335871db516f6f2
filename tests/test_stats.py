"""Reporting statistics (alignlab/evaluation/stats.py) and degeneration measures (repetition.py) on hand values."""

import math

import pytest

from alignlab.evaluation import stats
from alignlab.evaluation.repetition import distinct_n, repeated_ngram_share, words

Z = 1.959963984540054


def test_wilson_interval_for_7_of_20():
    """p = 0.35, z^2 = 3.8415: center (0.35 + 3.8415/40) / (1 + 3.8415/20) = 0.44604 / 1.19207 = 0.37417;
    half-width 1.96 sqrt(0.35 * 0.65 / 20 + 3.8415 / 1600) / 1.19207 = 1.96 * 0.11737 / 1.19207 = 0.19298
    -> [0.1812, 0.5671] (the textbook value)."""
    lo, hi = stats.wilson_interval(7, 20)
    assert lo == pytest.approx(0.18119, abs=1e-4) and hi == pytest.approx(0.56714, abs=1e-4)
    summary = stats.rate([1] * 7 + [0] * 13)
    assert summary["value"] == 0.35 and summary["n"] == 20
    assert summary["stderr"] == pytest.approx(math.sqrt(0.35 * 0.65 / 20))  # 0.10665
    assert summary["ci"] == pytest.approx([lo, hi])


def test_wilson_stays_inside_0_1_where_the_normal_interval_collapses():
    """0 of 10: the normal interval is [0, 0]; Wilson's is [0, z^2 / (n + z^2)] = [0, 3.8415 / 13.8415] = [0, 0.2775]."""
    assert stats.wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert stats.wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)
    assert stats.wilson_interval(0, 24)[0] == 0.0 and stats.wilson_interval(24, 24)[1] == 1.0  # exactly, no 1e-17
    assert stats.rate([0] * 10)["stderr"] == 0.0
    with pytest.raises(ValueError, match="rate\\(\\) takes 0/1 outcomes"):
        stats.rate([1, 0.5, 0])


def test_mean_and_its_normal_interval():
    """[1.0, 0.4, 0.1]: mean 0.5, sample variance (0.25 + 0.01 + 0.16) / 2 = 0.21, stderr sqrt(0.21 / 3) = 0.26458,
    interval 0.5 -+ 1.96 * 0.26458 = [-0.0186, 1.0186]; clipped to [0, 1] when the values cannot leave it."""
    m = stats.mean([1.0, 0.4, 0.1])
    assert m["value"] == pytest.approx(0.5) and m["stderr"] == pytest.approx(math.sqrt(0.07))
    assert m["ci"] == pytest.approx([0.5 - Z * math.sqrt(0.07), 0.5 + Z * math.sqrt(0.07)])
    assert stats.mean([1.0, 0.4, 0.1], bounds=(0.0, 1.0))["ci"] == [0.0, 1.0]
    one = stats.mean([0.3])
    assert one["value"] == 0.3 and math.isnan(one["stderr"]) and all(math.isnan(c) for c in one["ci"])


def test_paired_difference_uses_the_per_prompt_differences():
    """a = [1, 0, 1, 1], b = [0, 0, 1, 0]: d = [1, 0, 0, 1], mean 0.5, sd sqrt(4 * 0.25 / 3) = 0.57735, stderr
    0.28868, interval 0.5 -+ 0.56580. The unpaired stderr (sqrt(var a / 4 + var b / 4) = sqrt(0.0625 + 0.0625) =
    0.35355) is larger: pairing removes what the two share (prompt 3 is easy for both)."""
    d = stats.paired_difference([1, 0, 1, 1], [0, 0, 1, 0])
    assert d["value"] == 0.5 and d["stderr"] == pytest.approx(0.288675, abs=1e-6)
    assert d["ci"] == pytest.approx([0.5 - Z * 0.288675, 0.5 + Z * 0.288675], abs=1e-6)
    unpaired = math.hypot(stats.mean([1, 0, 1, 1])["stderr"], stats.mean([0, 0, 1, 0])["stderr"])
    assert unpaired == pytest.approx(0.353553, abs=1e-6) and d["stderr"] < unpaired
    with pytest.raises(ValueError, match="pairs need the same units"):
        stats.paired_difference([1, 2], [1])


def test_ratio_weighs_units_by_their_size():
    """NLL 3 over 2 tokens and 1 over 2 tokens, 8 over 4: R = 12 / 8 = 1.5 nats/token (not the mean of 1.5, 0.5 and
    2). Residuals a - R b: 0, -2, 2; stderr sqrt(8 / (3 * 2)) / (8 / 3) = 1.1547 / 2.6667 = 0.43301."""
    r = stats.ratio([3.0, 1.0, 8.0], [2, 2, 4])
    assert r["value"] == 1.5 and r["stderr"] == pytest.approx(0.433013, abs=1e-6)
    # Paired: policy NLL [3, 1, 8], reference [2, 1, 6] on the same texts: (1 + 0 + 2) / 8 = 0.375 per token.
    assert stats.paired_ratio_difference([3.0, 1.0, 8.0], [2.0, 1.0, 6.0], [2, 2, 4])["value"] == 0.375


def test_win_rate_counts_ties_as_half_with_its_interval():
    """Scores a = [0.9, 0.2, 0.5, 0.5] vs b = [0.1, 0.7, 0.5, 0.4]: outcomes [1, 0, 1/2, 1], win rate 2.5 / 4 = 0.625;
    sample variance (0.375^2 + 0.625^2 + 0.125^2 + 0.375^2) / 3 = 0.22917, stderr sqrt(0.22917 / 4) = 0.23936,
    interval 0.625 -+ 1.96 * 0.23936 = [0.156, 1.094], clipped to [0.156, 1]. A pair accuracy is the same count
    (chosen against rejected)."""
    w = stats.win_rate([0.9, 0.2, 0.5, 0.5], [0.1, 0.7, 0.5, 0.4])
    assert (w["value"], w["wins"], w["ties"], w["losses"], w["n"]) == (0.625, 2, 1, 1, 4)
    assert w["outcomes"] == [1.0, 0.0, 0.5, 1.0]
    assert w["stderr"] == pytest.approx(math.sqrt(0.6875 / 3 / 4))
    assert w["ci"] == pytest.approx([0.625 - Z * math.sqrt(0.6875 / 12), 1.0])
    assert stats.win_rate([0.3] * 3, [0.3] * 3)["value"] == 0.5  # equal models tie everywhere
    with pytest.raises(ValueError, match="the same units"):
        stats.win_rate([1.0], [1.0, 2.0])


def test_perplexity_is_exp_of_the_nll_per_token():
    """NLL 3 over 2 tokens and 1 over 2 tokens: 4 / 4 = 1 nat/token, perplexity e (not the mean of e^1.5 and e^0.5).
    With a third text, 8 over 4 (the ratio test above: R = 1.5, se 0.43301): perplexity e^1.5 = 4.4817, stderr
    e^1.5 * 0.43301 = 1.9406 (delta method), interval exp(1.5 -+ 1.96 * 0.43301)."""
    assert stats.perplexity([3.0, 1.0], [2, 2])["value"] == pytest.approx(math.e)
    p = stats.perplexity([3.0, 1.0, 8.0], [2, 2, 4])
    assert p["value"] == pytest.approx(math.exp(1.5)) and p["stderr"] == pytest.approx(math.exp(1.5) * 0.433013)
    assert p["ci"] == pytest.approx([math.exp(1.5 - Z * 0.433013), math.exp(1.5 + Z * 0.433013)], rel=1e-6)


def test_spread_over_seeds():
    """0.2, 0.3, 0.4: mean 0.3, sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1."""
    s = stats.spread([0.2, 0.3, 0.4])
    assert s["mean"] == pytest.approx(0.3) and s["std"] == pytest.approx(0.1)
    assert (s["min"], s["max"], s["n"]) == (0.2, 0.4, 3)
    assert math.isnan(stats.spread([0.5])["std"])


def test_repetition_measures():
    """ "a b a b a b": 3-grams aba, bab, aba, bab: 2 distinct of 4 -> repeated share 0.5; bigrams ab, ba, ab, ba, ab:
    2 distinct of 5 -> distinct-2 0.4. The collapse the issue saw: "The ocean is done done done done" has 3-grams
    (the ocean is) (ocean is done) (is done done) (done done done) x2: 1 repeat of 5 -> 0.2."""
    assert repeated_ngram_share("a b a b a b") == 0.5 and distinct_n("a b a b a b") == pytest.approx(0.4)
    assert repeated_ngram_share("The ocean is done done done done") == pytest.approx(0.2)
    assert repeated_ngram_share("Bees make honey from nectar.") == 0.0 and distinct_n("Bees make honey.") == 1.0
    assert repeated_ngram_share("too short") == 0.0 and distinct_n("") == 1.0  # no n-grams: nothing repeats
    assert words("Don't STOP, 2 go!") == ["don't", "stop", "2", "go"]
