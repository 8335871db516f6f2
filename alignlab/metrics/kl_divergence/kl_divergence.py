"""KL(policy || reference) estimated from completions sampled from the policy.

For each prompt x and completion y ~ pi(.|x), the summed log-ratio over the completion tokens,
log pi(y|x) - log pi_ref(y|x), is an unbiased estimate of the sequence-level KL(pi(.|x) || pi_ref(.|x))
(the "k1" estimator of Schulman, http://joschu.net/blog/kl-approx.html). Its mean over prompts estimates the
expected KL. Single estimates can be negative; the mean converges to a value >= 0. With greedy decoding the
completions are not samples from pi, and the number is the log-ratio on the greedy outputs, not a KL.

    kl = mean_i (policy_logps_i - reference_logps_i)

Computed by alignlab.evaluation.stats.paired_difference, as eval.json's `kl` is the mean of these per-prompt
log-ratios (this module wraps it for the `evaluate` library).
"""

import datasets
import evaluate

from alignlab.evaluation import stats

_DESCRIPTION = "Mean summed log-ratio log pi(y|x) - log pi_ref(y|x) over the policy's own completions."

_KWARGS_DESCRIPTION = """
Args:
    policy_logps (list of float): log pi(y|x), summed over the completion tokens, one per completion.
    reference_logps (list of float): log pi_ref(y|x) of the same completion.
Returns:
    kl (float): mean of policy_logps - reference_logps.
Example:
    >>> metric = evaluate.load("alignlab/metrics/kl_divergence")
    >>> metric.compute(policy_logps=[-1.0, -2.0], reference_logps=[-2.0, -2.5])["kl"]
    0.75
"""


class KLDivergence(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"policy_logps": datasets.Value("float64"), "reference_logps": datasets.Value("float64")}
            ),
        )

    def _compute(self, policy_logps, reference_logps):
        return {"kl": stats.paired_difference(policy_logps, reference_logps)["value"]}
