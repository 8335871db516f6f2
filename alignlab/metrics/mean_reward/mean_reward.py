"""Mean (and standard error) of per-completion rewards: a task's ground-truth reward function or a reward
model's score, one value per sampled completion.

    mean = sum(r) / n        stderr = sqrt(sum((r - mean)^2) / (n - 1) / n)   (nan when n == 1: no spread to measure)

Computed by alignlab.evaluation.stats.mean, as in eval.json (this module wraps it for the `evaluate` library).
"""

import datasets
import evaluate

from alignlab.evaluation import stats

_DESCRIPTION = "Mean reward over completions, with its standard error."

_KWARGS_DESCRIPTION = """
Args:
    rewards (list of float): one reward per completion.
Returns:
    mean_reward (float): the mean.
    stderr (float): standard error of the mean (sample standard deviation / sqrt(n)).
Example:
    >>> metric = evaluate.load("alignlab/metrics/mean_reward")
    >>> metric.compute(rewards=[1.0, 0.0, 0.5])["mean_reward"]
    0.5
"""


class MeanReward(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"rewards": datasets.Value("float64")}),
        )

    def _compute(self, rewards):
        summary = stats.mean(rewards)
        return {"mean_reward": summary["value"], "stderr": summary["stderr"]}
