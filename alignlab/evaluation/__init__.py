"""Evaluation shared by the `eval` stage and `alignlab eval`: load a checkpoint and its reference, measure what
alignment changed, write eval.json, eval.md and plots of the run's training curves.

    alignlab eval runs/quickstart/dpo                         # a stage of a run (its recipe's eval settings)
    alignlab run recipes/quickstart.yaml --stage eval         # the same, as the recipe's last stage

Every aggregate is an `evaluate` module shipped in alignlab/metrics/<name>/ and loaded from that path
(`load_metric`); the models are run here. Policy and reference complete the SAME prompts (greedy when
`temperature: 0`; when sampling, both use the same seed per batch, so equal models give equal samples).

eval.json keys (EVAL_KEYS; a value is null when the input it needs was not given):
    policy, reference        str    what was evaluated, and what it is compared with
    num_prompts              int    prompts both models completed
    true_reward              float  mean of the task's reward function (`reward_fn`, module:function, called as
    true_reward_reference           the PPO stage calls it: fn(prompt texts, completions)) on the policy's / the
                                    reference's completions
    mean_score               float  mean reward-model score (`reward_model`) of the policy's / reference's
    mean_score_reference            completions
    win_rate                 float  fraction of prompts where the policy's completion outscores the reference's,
                                    ties 0.5; under the reward model when given, else the reward function
    win_rate_by              str    "reward_model", "reward_fn" or null
    kl                       float  mean over prompts of sum_t [log pi(y_t|x, y_<t) - log pi_ref(y_t|x, y_<t)] on the
                                    POLICY's completions: an unbiased estimate of KL(pi || pi_ref) when sampling at
                                    temperature 1. With greedy decoding (temperature 0) it is the log-ratio on the
                                    greedy outputs, not a KL; at other temperatures the samples come from a sharpened
                                    pi, so the estimate is biased. Log-probs are always those of the models (T = 1).
    preference_accuracy      float  DPO's implicit reward r = beta * (log pi - log pi_ref), summed over completion
    preference_margin               tokens, on held-out pairs (`preference_dataset`): fraction of pairs with
                                    r(chosen) > r(rejected) (ties 0.5) and mean r(chosen) - r(rejected)
    reward_model_accuracy    float  the same with the reward model's scores
    reward_model_margin
    perplexity               float  exp(mean NLL per completion token) of the policy / reference on held-out SFT
    perplexity_reference            data (`sft_dataset`)
    samples                  list   the first `num_samples_shown` prompts: {prompt, policy, reference,
                                    policy_reward, reference_reward} (rewards: reward model when given, else
                                    reward function, else null)
    settings                 dict   temperature, max_new_tokens, beta, seed

Tokenisation follows TRL's trainers: a chat prompt is templated with add_generation_prompt=True, the completion is
the rest of the templated prompt + completion conversation (from where the two token sequences diverge).

Modules: evaluator.py (models, tokenisation, the measurements), report.py (eval.json, eval.md, plots), command.py
(`alignlab eval`). Aggregates are `evaluate` modules in alignlab/metrics/.
"""
