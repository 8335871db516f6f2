"""Win rate of a policy's completions against a reference's completions on the same prompts.

A prompt is a win (1) when the policy's completion scores higher than the reference's under the same reward
function or reward model, a tie (0.5) when the scores are equal, a loss (0) otherwise. Two identical models
decoding greedily tie on every prompt: win rate 0.5 exactly.

    win_rate = (wins + 0.5 * ties) / n

Computed by alignlab.evaluation.stats.win_rate, as in eval.json (this module wraps it for the `evaluate` library).
"""

import datasets
import evaluate

from alignlab.evaluation import stats

_DESCRIPTION = "Fraction of prompts where the policy's completion outscores the reference's (ties count 0.5)."

_KWARGS_DESCRIPTION = """
Args:
    policy_scores (list of float): score of the policy's completion, one per prompt.
    reference_scores (list of float): score of the reference's completion on the same prompt.
Returns:
    win_rate (float): (wins + 0.5 * ties) / n.
    wins, ties, losses (int): counts.
Example:
    >>> metric = evaluate.load("alignlab/metrics/win_rate")
    >>> metric.compute(policy_scores=[1.0, 0.5, 0.0], reference_scores=[0.0, 0.5, 1.0])["win_rate"]
    0.5
"""


class WinRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"policy_scores": datasets.Value("float64"), "reference_scores": datasets.Value("float64")}
            ),
        )

    def _compute(self, policy_scores, reference_scores):
        out = stats.win_rate(policy_scores, reference_scores)
        return {"win_rate": out["value"], "wins": out["wins"], "ties": out["ties"], "losses": out["losses"]}
