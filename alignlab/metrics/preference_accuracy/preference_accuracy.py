"""Preference accuracy and mean margin of a reward on held-out pairs (prompt, chosen, rejected).

The reward is either a reward model's score or DPO's implicit reward r = beta * (log pi - log pi_ref) summed
over the completion tokens (Rafailov et al. 2023, eq. 5). Per pair the margin is r(chosen) - r(rejected).

    accuracy = (#{margin > 0} + 0.5 * #{margin == 0}) / n        margin = mean(r(chosen) - r(rejected))

Ties count 0.5 (no preference is chance level), so a policy equal to its reference scores 0.5 with margin 0.
alignlab's training metrics count ties the same way (DPO's `rewards/accuracies`, the reward stage's `accuracy`:
alignlab.losses.preference.pair_accuracy); TRL's own `rewards/accuracies` counts them as wrong and shows 0 there.

Computed by alignlab.evaluation.stats (win_rate of chosen over rejected, mean of the margins), as in eval.json (this
module wraps them for the `evaluate` library).
"""

import datasets
import evaluate

from alignlab.evaluation import stats

_DESCRIPTION = "Fraction of preference pairs whose chosen completion gets the higher reward, and the mean margin."

_KWARGS_DESCRIPTION = """
Args:
    chosen_rewards (list of float): reward of the chosen completion, one per pair.
    rejected_rewards (list of float): reward of the rejected completion of the same pair.
Returns:
    accuracy (float): (#{chosen > rejected} + 0.5 * #{chosen == rejected}) / n.
    margin (float): mean of chosen - rejected.
Example:
    >>> metric = evaluate.load("alignlab/metrics/preference_accuracy")
    >>> metric.compute(chosen_rewards=[1.0, 0.0], rejected_rewards=[0.0, 0.5])
    {'accuracy': 0.5, 'margin': 0.25}
"""


class PreferenceAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"chosen_rewards": datasets.Value("float64"), "rejected_rewards": datasets.Value("float64")}
            ),
        )

    def _compute(self, chosen_rewards, rejected_rewards):
        accuracy = stats.win_rate(chosen_rewards, rejected_rewards)["value"]
        margin = stats.paired_difference(chosen_rewards, rejected_rewards)["value"]
        return {"accuracy": accuracy, "margin": margin}
