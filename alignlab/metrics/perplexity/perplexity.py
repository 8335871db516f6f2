"""Perplexity from per-sequence negative log-likelihoods: exp of the mean NLL per token over all sequences.

The model is run elsewhere (alignlab.evaluation.evaluator); this metric only aggregates, so it needs no model and
works for any checkpoint. Every token weighs the same (a long completion counts more than a short one):

    perplexity = exp(sum_i nll_i / sum_i num_tokens_i)

Computed by alignlab.evaluation.stats (perplexity, ratio), as in eval.json (this module wraps them for the `evaluate`
library).
"""

import datasets
import evaluate

from alignlab.evaluation import stats

_DESCRIPTION = "exp(total negative log-likelihood / total tokens) from per-sequence NLL sums."

_KWARGS_DESCRIPTION = """
Args:
    nll (list of float): negative log-likelihood of a sequence's scored tokens, summed (nats).
    num_tokens (list of int): how many tokens were scored in that sequence.
Returns:
    perplexity (float): exp(sum(nll) / sum(num_tokens)).
    mean_nll (float): sum(nll) / sum(num_tokens).
Example:
    >>> metric = evaluate.load("alignlab/metrics/perplexity")
    >>> metric.compute(nll=[2.0, 1.0], num_tokens=[2, 1])["mean_nll"]
    1.0
"""


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll, num_tokens):
        return {
            "perplexity": stats.perplexity(nll, num_tokens)["value"],
            "mean_nll": stats.ratio(nll, num_tokens)["value"],
        }
