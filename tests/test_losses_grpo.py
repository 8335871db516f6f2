"""GRPO-family building blocks (alignlab/losses/grpo.py) against hand-computed values.

The running example is one group of G = 4 responses with rewards r = [0, 4, 4, 4]:
  mean = 3, r - mean = [-3, 1, 1, 1], sum of squares 9 + 1 + 1 + 1 = 12, std (Bessel, / (G - 1)) = sqrt(12 / 3) = 2.
"""

import math

import pytest
import torch

from alignlab.losses import aggregate, clipped_surrogate, group_advantages, grpo_loss, zero_std_groups
from alignlab.losses.sft import token_unlikelihood

EPS = 1e-4  # GRPO's std epsilon (alignlab.losses.grpo.GRPO_STD_EPS)


def t(x):
    return torch.tensor(x, dtype=torch.float64)


R = t([[0.0, 4.0, 4.0, 4.0]])


# --- advantages --------------------------------------------------------------------------------------------------


def test_grpo_advantage_divides_by_the_group_std():
    # (r - 3) / (2 + 1e-4) = [-3, 1, 1, 1] / 2.0001
    expected = [-3 / (2 + EPS), 1 / (2 + EPS), 1 / (2 + EPS), 1 / (2 + EPS)]
    assert group_advantages(R, "grpo")[0].tolist() == pytest.approx(expected, rel=1e-12)


def test_dr_grpo_advantage_only_centres():
    assert group_advantages(R, "dr_grpo")[0].tolist() == pytest.approx([-3.0, 1.0, 1.0, 1.0])


def test_rloo_advantage_leaves_one_out():
    # r_1 = 0: the others' mean (4 + 4 + 4) / 3 = 4, A = -4; r_2 = 4: the others' mean (0 + 4 + 4) / 3 = 8/3, A = 4/3.
    # That is G / (G - 1) = 4/3 times Dr. GRPO's [-3, 1, 1, 1].
    assert group_advantages(R, "rloo")[0].tolist() == pytest.approx([-4.0, 4 / 3, 4 / 3, 4 / 3])


def test_groups_are_independent_and_equal_rewards_give_zero():
    rewards = t([[0.0, 4.0, 4.0, 4.0], [0.5, 0.5, 0.5, 0.5], [10.0, 14.0, 14.0, 14.0]])
    for kind in ("grpo", "dr_grpo", "rloo"):
        adv = group_advantages(rewards, kind)
        assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0], kind  # all equal: no signal (and no nan from std 0)
        assert adv[2].tolist() == pytest.approx(adv[0].tolist()), kind  # a shift of a whole group changes nothing
    assert zero_std_groups(rewards).tolist() == [False, True, False]


def test_advantage_errors():
    with pytest.raises(ValueError, match="at least 2 responses"):
        group_advantages(t([[1.0], [2.0]]), "grpo")
    with pytest.raises(ValueError, match="unknown advantage 'ppo'; known: grpo, dr_grpo, rloo"):
        group_advantages(R, "ppo")


# --- aggregation -------------------------------------------------------------------------------------------------

# The group above, Dr. GRPO advantages A = [-3, 1, 1, 1], responses of 1, 2, 3 and 2 tokens (max length 4), ratio 1:
# every real token's loss is -A_i.
LENGTHS_MASK = t([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]])
PER_TOKEN = -t([-3.0, 1.0, 1.0, 1.0])[:, None].expand(4, 4) * LENGTHS_MASK + 99.0 * (1 - LENGTHS_MASK)  # 99: padding


def test_sequence_mean_averages_per_response_then_over_responses():
    # per response: 3, -1, -1, -1 (each response's token mean); mean over responses: (3 - 3) / 4 = 0
    assert aggregate(PER_TOKEN, LENGTHS_MASK, "sequence_mean", 4).item() == pytest.approx(0.0)


def test_token_mean_weighs_every_token_alike():
    # token sums: 3*1, -1*2, -1*3, -1*2 -> 3 - 7 = -4 over 8 real tokens: -0.5
    assert aggregate(PER_TOKEN, LENGTHS_MASK, "token_mean", 4).item() == pytest.approx(-0.5)


def test_constant_divides_token_sums_by_responses_times_max_length():
    # the same -4, divided by 4 responses x max length 4 = 16: -0.25 (Dr. GRPO: no per-response length division)
    assert aggregate(PER_TOKEN, LENGTHS_MASK, "constant", 4).item() == pytest.approx(-0.25)


def test_weights_drop_responses_from_sum_and_denominator():
    # weight 0 on responses 2 and 3: sequence_mean (3 - 1) / 2 = 1; token_mean (3 - 2) / (1 + 2) = 1/3;
    # constant (3 - 2) / (2 x 4) = 1/8
    w = t([1.0, 0.0, 0.0, 1.0])
    assert aggregate(PER_TOKEN, LENGTHS_MASK, "sequence_mean", 4, w).item() == pytest.approx(1.0)
    assert aggregate(PER_TOKEN, LENGTHS_MASK, "token_mean", 4, w).item() == pytest.approx(1 / 3)
    assert aggregate(PER_TOKEN, LENGTHS_MASK, "constant", 4, w).item() == pytest.approx(1 / 8)
    assert aggregate(PER_TOKEN, LENGTHS_MASK, "token_mean", 4, torch.zeros(4)).item() == 0.0  # all dropped: 0


# --- clipping ----------------------------------------------------------------------------------------------------

# Two responses of 3 tokens: A = [2, -1]; ratios row 0 [1.5, 1.25, 1.0], row 1 [0.5, 1.5, 0.75].
RATIOS = t([[1.5, 1.25, 1.0], [0.5, 1.5, 0.75]])
ADV = t([2.0, -1.0])
OLD = t([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])


def test_clip_higher_hand_values():
    """clip_low 0.2, clip_high 0.28: ratios clip to [0.8, 1.28]. Per token l = -min(rho A, clip(rho) A):
    row 0 (A = 2):  rho 1.5  -> -min(3.0, 2.56) = -2.56 (clipped high); rho 1.25 -> -2.5 (inside); rho 1 -> -2
    row 1 (A = -1): rho 0.5  -> -min(-0.5, -0.8) = 0.8 (clipped low);  rho 1.5 -> -min(-1.5, -1.28) = 1.5 (a ratio
                    above 1 + clip_high is NOT clipped when A < 0);     rho 0.75 -> -min(-0.75, -0.8) = 0.8 (clipped)
    token_mean: (-2.56 - 2.5 - 2 + 0.8 + 1.5 + 0.8) / 6 = -3.96 / 6 = -0.66."""
    logprobs = OLD + RATIOS.log()
    per_token, low, high = clipped_surrogate(logprobs, OLD, ADV, 0.2, 0.28)
    assert per_token.flatten().tolist() == pytest.approx([-2.56, -2.5, -2.0, 0.8, 1.5, 0.8])
    assert low.tolist() == [[False, False, False], [True, False, True]]
    assert high.tolist() == [[True, False, False], [False, False, False]]
    mask = torch.ones_like(OLD)
    loss, m = grpo_loss(logprobs, OLD, ADV, mask, clip_low=0.2, clip_high=0.28, loss_agg="token_mean", max_length=3)
    assert loss.item() == pytest.approx(-0.66)
    assert m["clip_low_frac"].item() == pytest.approx(2 / 6) and m["clip_high_frac"].item() == pytest.approx(1 / 6)
    assert m["ratio"].item() == pytest.approx((1.5 + 1.25 + 1 + 0.5 + 1.5 + 0.75) / 6)
    # Symmetric 0.2 instead: with A = 2, rho 1.5 and now also rho 1.25 clip to 1.2 -> -2.4 each (was -2.56, -2.5),
    # so the mean is (-3.96 + 0.16 + 0.1) / 6 = -3.7 / 6.
    sym, m_sym = grpo_loss(logprobs, OLD, ADV, mask, clip_low=0.2, clip_high=0.2, loss_agg="token_mean", max_length=3)
    assert sym.item() == pytest.approx(-3.7 / 6)
    assert m_sym["clip_high_frac"].item() == pytest.approx(2 / 6)


def test_clipped_tokens_get_no_gradient():
    """d l / d logp = -rho A where the unclipped term is the minimum, 0 where the clipped one is."""
    logprobs = (OLD + RATIOS.log()).requires_grad_(True)
    per_token, _, _ = clipped_surrogate(logprobs, OLD, ADV, 0.2, 0.28)
    per_token.sum().backward()
    # row 0: [clipped, -1.25 * 2, -1 * 2]; row 1: [clipped, -1.5 * -1, clipped]
    assert logprobs.grad.flatten().tolist() == pytest.approx([0.0, -2.5, -2.0, 0.0, 1.5, 0.0])


# --- KL term -----------------------------------------------------------------------------------------------------


def test_k3_term_value_and_gradient():
    """Two tokens with log(ref / pi) = +ln 2 and -ln 2, ratio 1, A = 0, beta = 0.5, token_mean:
    k3 = exp(x) - x - 1: (2 - ln 2 - 1) + (1/2 + ln 2 - 1) = 0.5 in all, mean 0.25, loss 0.5 * 0.25 = 0.125.
    d k3 / d logp = 1 - ref/pi: -1 and +0.5; times beta / 2 tokens: -0.25 and 0.125 (up where ref > pi)."""
    logprobs = t([[-1.0, -2.0]]).requires_grad_(True)
    ref = logprobs.detach() + t([[math.log(2), -math.log(2)]])
    mask = torch.ones(1, 2, dtype=torch.float64)
    kw = dict(clip_low=0.2, clip_high=0.2, loss_agg="token_mean", max_length=2)
    loss, m = grpo_loss(logprobs, logprobs.detach(), t([0.0]), mask, ref_logprobs=ref, beta=0.5, **kw)
    assert loss.item() == pytest.approx(0.125)
    assert m["kl"].item() == pytest.approx(0.25)
    loss.backward()
    assert logprobs.grad.flatten().tolist() == pytest.approx([-0.25, 0.125])
    # beta = 0 with a reference: the KL is measured, not trained on
    loss0, m0 = grpo_loss(logprobs, logprobs.detach(), t([0.0]), mask, ref_logprobs=ref, beta=0.0, **kw)
    assert loss0.item() == 0.0 and m0["kl"].item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="beta > 0 needs ref_logprobs"):
        grpo_loss(logprobs, logprobs.detach(), t([0.0]), mask, beta=0.5, **kw)


# --- unlikelihood term ----------------------------------------------------------------------------------------


def test_token_unlikelihood_hand_values():
    """Uniform log-probs over 4 tokens, response 1 2 1 3 then a padding token: C_t is {}, {1}, {2} (not 1 itself),
    {1, 2} (1 once), so the per-token terms are 0, u, u, 2u with u = -log(1 - 1/4); padding gets 0 and is never a
    candidate (its token 2 would be one at a later position otherwise)."""
    u = -math.log(0.75)
    targets = torch.tensor([[1, 2, 1, 3, 2]])
    logp = torch.full((1, 5, 4), math.log(0.25), dtype=torch.float64)
    per_token = token_unlikelihood(logp, targets, t([[1, 1, 1, 1, 0]]))
    assert per_token[0].tolist() == pytest.approx([0.0, u, u, 2 * u, 0.0])


def test_unlikelihood_adds_alpha_times_its_aggregate():
    """A = 0 and ratio 1: the surrogate is 0, so the loss is alpha x the aggregated term. Two responses, 2 and 1 real
    tokens with terms (1, 3) and (2): token_mean 6 / 3 = 2, times alpha 0.5 = 1; sequence_mean (2 + 2) / 2 = 2, the
    same; the gradient is alpha x the aggregation's weight per token."""
    logprobs = t([[-1.0, -1.0], [-1.0, 0.0]])
    ul = t([[1.0, 3.0], [2.0, 9.0]]).requires_grad_(True)  # 9 sits on padding: never counted
    mask = t([[1, 1], [1, 0]])
    kw = dict(clip_low=0.2, clip_high=0.2, max_length=2, unlikelihood=ul, ul_alpha=0.5)
    loss, m = grpo_loss(logprobs, logprobs, t([0.0, 0.0]), mask, loss_agg="token_mean", **kw)
    assert loss.item() == pytest.approx(1.0) and m["unlikelihood"].item() == pytest.approx(2.0)
    loss.backward()
    assert ul.grad.flatten().tolist() == pytest.approx([0.5 / 3, 0.5 / 3, 0.5 / 3, 0.0])
    seq, _ = grpo_loss(logprobs, logprobs, t([0.0, 0.0]), mask, loss_agg="sequence_mean", **kw)
    assert seq.item() == pytest.approx(0.5 * (4 / 2 + 2 / 1) / 2)
    # alpha 0: the term is measured, not trained on; alpha > 0 without the term is a bug in the caller
    off, m0 = grpo_loss(logprobs, logprobs, t([0.0, 0.0]), mask, loss_agg="token_mean", **{**kw, "ul_alpha": 0.0})
    assert off.item() == 0.0 and m0["unlikelihood"].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="needs the per-token unlikelihood"):
        grpo_loss(logprobs, logprobs, t([0.0, 0.0]), mask, loss_agg="token_mean", **{**kw, "unlikelihood": None})


def test_first_pass_ratio_one_gives_the_plain_policy_gradient():
    """At rho = 1 (before any update) the loss is -sum A_i logp-weights: the gradient on token t of response i is
    -A_i / (aggregation count), e.g. sequence_mean with responses of 1 and 2 tokens: -A_1 / (1 * 2), -A_2 / (2 * 2)."""
    logprobs = t([[-1.0, 0.0], [-2.0, -3.0]]).requires_grad_(True)
    mask = t([[1, 0], [1, 1]])
    loss, m = grpo_loss(
        logprobs, logprobs.detach(), t([1.0, -1.0]), mask, clip_low=0.2, clip_high=0.28, loss_agg="sequence_mean",
        max_length=2,
    )  # fmt: skip
    loss.backward()
    assert logprobs.grad.flatten().tolist() == pytest.approx([-0.5, 0.0, 0.25, 0.25])
    assert m["ratio"].item() == 1.0 and m["approx_kl"].item() == 0.0
