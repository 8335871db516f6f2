"""Evaluation shared by the `eval` stage and `alignlab eval`: load a checkpoint and its reference, measure what
alignment changed, with how much confidence, write eval.json, eval.md and plots of the run's training curves.

    alignlab eval runs/quickstart/dpo                         # a stage of a run (its recipe's eval settings)
    alignlab eval base runs/x/dpo runs/x/ppo --out cmp        # several checkpoints: also their paired comparison
    alignlab run recipes/quickstart.yaml --stage eval         # the same, as the recipe's last stage

Policy and reference complete the SAME prompts: greedy when `rollout.temperature: 0`; when sampling, prompt i draws from
its own random stream (seeded from the recipe seed and i, whatever its batch), so equal models give equal samples
and two checkpoints share their random numbers (a paired comparison). Every aggregate is computed in stats.py
(Wilson intervals for rates of prompts, normal intervals for means, delta-method for ratios, paired differences, win
rates, perplexity; docs/algorithms.md, "Reporting statistics"); the `evaluate` modules in alignlab/metrics/<name>/
wrap the same functions for users of the `evaluate` library. The models are run in evaluator.py.

eval.json keys (EVAL_KEYS; a value is null when the input it needs was not given). Every measured number KEY
(MEASURED_KEYS) has `KEY_stderr` (its standard error) and `KEY_ci` ([lo, hi], 95%) beside it; `X_reference` is the
same measure of the reference; `X_diff` is the paired difference policy - reference over the same prompts (its
interval from the per-prompt differences, narrower than comparing the two intervals):
    policy, reference        str    what was evaluated, and what it is compared with
    num_prompts              int    prompts both models completed
    true_reward              float  mean of the task's reward function (`reward_fn`, module:function or builtin:TASK,
    true_reward_reference           called as the PPO stage calls it: fn(prompt texts, completions)) on the policy's /
    true_reward_diff                the reference's completions; normal interval
    strict_accuracy          float  for a reward function with a task report (builtin:constraints): the fraction of
    strict_accuracy_reference       prompts whose every constraint is met (IFEval's prompt-level strict accuracy);
    strict_accuracy_diff            Wilson interval (the difference: normal, over the paired 0/1 outcomes)
    instruction_accuracy     float  constraints met / constraints (a ratio over prompts: constraints of one prompt
    instruction_accuracy_reference  are not independent draws)
    per_kind                 dict   {kind: {n, policy, policy_ci, reference, reference_ci}}: accuracy per constraint
                                    kind (Wilson), so no kind can be quietly over-weighted
    mean_score               float  mean reward-model score (`reward_model`) of the policy's / reference's
    mean_score_reference            completions (and their paired difference)
    mean_score_diff
    win_rate                 float  fraction of prompts where the policy's completion outscores the reference's,
                                    ties 0.5 (a mean of 1 / 0.5 / 0 outcomes, interval clipped to [0, 1]); under the
                                    reward model when given, else the reward function
    win_rate_by              str    "reward_model", "reward_fn" or null
    kl                       float  KL(pi || pi_ref) in nats, from responses SAMPLED FROM THE POLICY AT TEMPERATURE 1
                                    (whatever `rollout.temperature` the completions above use; the same samples when it is 1):
                                    mean over prompts of sum_t [log pi(y_t|x, y<t) - log pi_ref(y_t|x, y<t)], the k1
                                    estimator, unbiased; a single prompt's term can be negative
    kl_exact                 float  the same KL as the mean over those samples of sum_t KL(pi(.|x, y<t) || pi_ref(.|x,
                                    y<t)), the exact per-token KL summed over the vocabulary along the sampled path:
                                    unbiased too, >= 0 per prompt, less variance. (No greedy log-ratio is reported:
                                    on greedy outputs it is not a KL.)
    repetition               float  share of repeated word 3-grams per response (evaluation/repetition.py), mean
    repetition_reference            over prompts, for policy and reference: degeneration into loops ("done done done")
    repetition_diff                 shows here, not in the reward
    distinct_2               float  distinct word bigrams / bigrams per response, mean over prompts
    distinct_2_reference, distinct_2_diff
    response_length          float  response tokens before the end token, mean over prompts
    response_length_reference, response_length_diff
    preference_accuracy      float  DPO's implicit reward r = beta * (log pi - log pi_ref), summed over completion
    preference_margin               tokens, on held-out pairs (`preference_dataset`): fraction of pairs with
                                    r(chosen) > r(rejected) (ties 0.5) and mean r(chosen) - r(rejected)
    reward_model_accuracy    float  the same with the reward model's scores
    reward_model_margin
    perplexity               float  exp(NLL per completion token) of the policy / reference on held-out SFT data
    perplexity_reference            (`sft_dataset`); interval: exp of the NLL's (ratio over examples)
    nll                      float  NLL per token of the policy / reference on a fixed held-out text (`nll_dataset`,
    nll_reference                   e.g. builtin:prose), every token scored; nll_diff their paired difference per
    nll_diff                        token; nll_change = nll / nll_reference - 1 (capability lost when it rises);
    nll_change, nll_tokens          nll_tokens: the tokens scored
    samples                  list   the first `num_samples_shown` prompts: {prompt, policy, reference,
                                    policy_reward, reference_reward} (rewards: reward model when given, else
                                    reward function, else null)
    per_prompt               dict   the per-prompt values behind the means ({true_reward: [...], kl: [...], win: [...],
                                    strict_accuracy: [...], ...}), in prompt order: what `alignlab eval A B` pairs
    per_pair                 dict   the per-pair margins behind the pair accuracies ({preference_margin: [...],
                                    reward_model_margin: [...]}), in the order of `preference_dataset`'s rows; null
                                    without it
    settings                 dict   temperature, max_new_tokens, beta, seed, kl_temperature (1.0), confidence (0.95),
                                    prompts_sha256 (which prompts, in order)
nan (a stderr of one prompt) is written as null.

`alignlab eval A B ...` evaluates each checkpoint as above and writes comparison.json / comparison.md (into --out,
else ./eval-comparison): for every checkpoint after the first, the paired difference (it - A) of the policy's
per-prompt numbers (command.COMPARED: true reward, strict accuracy, reward-model score, repetition, distinct-2,
length, KL), with its 95% interval; the evaluations must cover the same prompts (settings.prompts_sha256).

Tokenisation follows TRL's trainers: a chat prompt is templated with add_generation_prompt=True, the completion is
the rest of the templated prompt + completion conversation (from where the two token sequences diverge).

Modules: evaluator.py (models, tokenisation, the measurements), stats.py (intervals), repetition.py (degeneration
measures), report.py (eval.json, eval.md, plots), command.py (`alignlab eval`, comparisons).
"""
