"""Mean (and standard error) of per-completion rewards: a task's ground-truth reward function or a reward
model's score, one value per sampled completion.

    mean = sum(r) / n        stderr = sqrt(sum((r - mean)^2) / (n - 1) / n)   (0 when n == 1)
"""

import math

import datasets
import evaluate

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
        n = len(rewards)
        mean = sum(rewards) / n
        var = sum((r - mean) ** 2 for r in rewards) / (n - 1) if n > 1 else 0.0
        return {"mean_reward": mean, "stderr": math.sqrt(var / n)}
