"""PPO building blocks against hand-computed values. Shapes are [B, T]; mask is 1 on real response tokens."""

import math

import pytest
import torch

from alignlab.losses import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)


def t(x):
    return torch.tensor(x, dtype=torch.float64)


# --- masked statistics -----------------------------------------------------------------------------------------


def test_masked_mean_and_var_hand_values():
    x = t([[1.0, 2.0, 3.0, 100.0], [4.0, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)  # (1 + 2 + 3 + 4) / 4
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0, 4.0])
    # values 1, 2, 3, 4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(5 / 4)
    assert masked_var(x, mask).item() == pytest.approx(5 / 3)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # empty mask -> 0, not nan


def test_masked_mean_accepts_bool_mask():
    x = t([[1.0, 3.0, 50.0]])
    assert masked_mean(x, torch.tensor([[True, True, False]])).item() == pytest.approx(2.0)


def test_masked_whiten():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64) * 4 + 7
    mask = t([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    x = x.masked_fill(mask == 0, 1e6)  # padding values must not matter
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert (w[mask == 0] == 0).all()
    scaled = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(scaled, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-9)
    assert masked_var(scaled, mask).item() == pytest.approx(1.0, abs=1e-6)


# --- KL estimates ----------------------------------------------------------------------------------------------


def test_kl_estimates_hand_values():
    # logr = ref - logp = [-1.5 - (-1), -1 - (-2)] = [-0.5, 1.0]
    logp, ref = t([[-1.0, -2.0]]), t([[-1.5, -1.0]])
    assert kl_estimate(logp, ref, "k1").tolist()[0] == pytest.approx([0.5, -1.0])
    # k3 = (e^logr - 1) - logr: e^-0.5 - 1 + 0.5 = 0.106531; e - 1 - 1 = 0.718282
    k3 = kl_estimate(logp, ref, "k3").tolist()[0]
    assert k3 == pytest.approx([math.exp(-0.5) - 0.5, math.e - 2.0], abs=1e-12)
    assert k3 == pytest.approx([0.106531, 0.718282], abs=1e-6)
    assert kl_estimate(logp, ref).tolist() == kl_estimate(logp, ref, "k1").tolist()  # default k1


def test_k3_nonnegative():
    g = torch.Generator().manual_seed(1)
    logp, ref = torch.randn(64, 32, generator=g) * 5, torch.randn(64, 32, generator=g) * 5
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, logp, "k3") == 0).all()


def _expected_reward_gradient(theta: float, kind: str) -> float:
    """d/dtheta of E_{a~pi}[R(a)] with the DETACHED per-token reward R = -kl_estimate(kind), by the score-function
    (policy-gradient) identity sum_a pi(a) R(a) d log pi(a) / d theta, computed exactly over a 2-token vocabulary:
    pi = softmax([theta, 0]), ref = softmax([0, 0])."""
    z = torch.tensor([theta, 0.0], dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(z, dim=-1)  # [2]: both tokens, as a batch of 2 one-token responses
    ref = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    reward = -kl_estimate(logp.detach()[None], ref[None], kind)[0]  # [2], detached like PPO's rewards
    surrogate = (logp.detach().exp() * reward * logp).sum()
    (grad,) = torch.autograd.grad(surrogate, z)
    return grad[0].item()


def test_k3_reward_has_no_restoring_gradient():
    """Why PPO's reward holds k1, never k3 (Tang & Munos 2025, arXiv 2506.09477). pi = (p, 1 - p), p = sigma(0.1) =
    0.5249792, ref = (1/2, 1/2):
      KL(pi||ref) gradient   p (1 - p) theta = 0.2493760 * 0.1 = 0.0249376
      KL(ref||pi) gradient   p - 1/2                           = 0.0249792
    Expected gradient of the reward E[-k]: k1 gives -0.0249376 = -grad KL(pi||ref) (pulls theta back to 0, the
    reference); k3 gives grad KL(ref||pi) - grad KL(pi||ref) = +4.16e-5: 600 times weaker, and here it even pushes
    theta AWAY from the reference."""
    p = 1 / (1 + math.exp(-0.1))
    g1, g3 = _expected_reward_gradient(0.1, "k1"), _expected_reward_gradient(0.1, "k3")
    assert g1 == pytest.approx(-p * (1 - p) * 0.1, abs=1e-12)
    assert g1 == pytest.approx(-0.0249376, abs=1e-7)
    assert g3 == pytest.approx((p - 0.5) - p * (1 - p) * 0.1, abs=1e-12)
    assert g3 == pytest.approx(4.158e-5, abs=1e-8)
    assert g3 > 0 > g1 and abs(g3) < abs(g1) / 500


def test_kl_unknown_kind():
    with pytest.raises(ValueError, match="known: k1, k3"):
        kl_estimate(t([[0.0]]), t([[0.0]]), "k2")


# --- GAE -------------------------------------------------------------------------------------------------------


def test_gae_1x3():
    # gamma = 0.9, lam = 0.5 (gamma lam = 0.45); r = [0, 0, 1], V = [0.5, 0.4, 0.8], V_3 = 0
    # t=2: delta = 1 + 0.9*0   - 0.8 =  0.2;   A_2 = 0.2
    # t=1: delta = 0 + 0.9*0.8 - 0.4 =  0.32;  A_1 = 0.32 + 0.45*0.2  = 0.41
    # t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14;  A_0 = -0.14 + 0.45*0.41 = 0.0445
    # returns = A + V = [0.5445, 0.81, 1.0]
    adv, ret = compute_gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.4, 0.8]]), t([[1, 1, 1]]), gamma=0.9, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.0445, 0.41, 0.2], abs=1e-12)
    assert ret.tolist()[0] == pytest.approx([0.5445, 0.81, 1.0], abs=1e-12)


def test_gae_2x4_right_padded():
    # gamma = 1, lam = 0.95
    # row 0 (4 real tokens): r = [0, 0, 0, 1], V = [0.1, 0.2, 0.3, 0.4]
    #   t=3: delta = 1 - 0.4 = 0.6;          A = 0.6
    #   t=2: delta = 0.4 - 0.3 = 0.1;        A = 0.1 + 0.95*0.6    = 0.67
    #   t=1: delta = 0.3 - 0.2 = 0.1;        A = 0.1 + 0.95*0.67   = 0.7365
    #   t=0: delta = 0.2 - 0.1 = 0.1;        A = 0.1 + 0.95*0.7365 = 0.799675
    # row 1 (2 real tokens, junk 7 / 9 in the padding that must be ignored): r = [0, 2], V = [0.5, 1.0]
    #   t=1: delta = 2 + 0 (V_2 is padding) - 1.0 = 1.0;   A = 1.0 (A_2 is padding -> 0)
    #   t=0: delta = 0 + 1.0 - 0.5 = 0.5;                  A = 0.5 + 0.95*1.0 = 1.45
    rewards = t([[0.0, 0.0, 0.0, 1.0], [0.0, 2.0, 7.0, 7.0]])
    values = t([[0.1, 0.2, 0.3, 0.4], [0.5, 1.0, 9.0, 9.0]])
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert adv.tolist()[0] == pytest.approx([0.799675, 0.7365, 0.67, 0.6], abs=1e-12)
    assert adv.tolist()[1] == pytest.approx([1.45, 1.0, 0.0, 0.0], abs=1e-12)
    assert ret.tolist()[0] == pytest.approx([0.899675, 0.9365, 0.97, 1.0], abs=1e-12)
    assert ret.tolist()[1] == pytest.approx([1.95, 2.0, 0.0, 0.0], abs=1e-12)
    torch.testing.assert_close(ret, (adv + values) * mask)


# --- policy and value losses -----------------------------------------------------------------------------------


def test_policy_loss_clipping_hand_values():
    # cliprange 0.2, old logprobs 0, so ratio = exp(new). Per token: -A r vs -A clip(r, 0.8, 1.2), take the max
    #   r=1.5, A= 1: -1.5 vs -1.2 -> -1.2  (clipped active)
    #   r=0.5, A= 1: -0.5 vs -0.8 -> -0.5
    #   r=1.1, A=-1:  1.1 vs  1.1 ->  1.1  (tie: not counted as clipped)
    #   r=0.5, A=-1:  0.5 vs  0.8 ->  0.8  (clipped active)
    #   r=0.7, A= 2: padding, ignored
    # pg = (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.05; clipfrac = 2/4
    ratios = [1.5, 0.5, 1.1, 0.5, 0.7]
    new = t([[math.log(r) for r in ratios]]).requires_grad_(True)
    old = torch.zeros_like(new)
    adv = t([[1.0, 1.0, -1.0, -1.0, 2.0]])
    mask = t([[1, 1, 1, 1, 0]])
    loss, m = policy_loss(new, old, adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(0.05, abs=1e-12)
    assert m["clipfrac"].item() == pytest.approx(0.5)
    # approx_kl = 0.5 * mean(log(r)^2) over the 4 real tokens
    assert m["approx_kl"].item() == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in ratios[:4]) / 4, abs=1e-12)
    # gradient: clipped tokens and padding get 0; unclipped d(-A r)/d logp / 4 = -A r / 4
    loss.backward()
    assert new.grad.tolist()[0] == pytest.approx([0.0, -0.5 / 4, 1.1 / 4, 0.0, 0.0], abs=1e-12)


def test_value_loss_clipping_hand_values():
    # eps_v = 0.2, V_old = 1 everywhere
    #   V=1.5, R=2: V_clip = 1.2; (1.5-2)^2 = 0.25 vs (1.2-2)^2 = 0.64 -> 0.64 (clipped active)
    #   V=0.9, R=1: V_clip = 0.9; 0.01 vs 0.01                     -> 0.01
    #   V=1.5, R=0: V_clip = 1.2; 2.25 vs 1.44                     -> 2.25
    #   padding token ignored
    # vf = 0.5 * (0.64 + 0.01 + 2.25) / 3 = 0.483333; clipfrac = 1/3
    values = t([[1.5, 0.9, 1.5, 5.0]])
    old = t([[1.0, 1.0, 1.0, 1.0]])
    returns = t([[2.0, 1.0, 0.0, -3.0]])
    mask = t([[1, 1, 1, 0]])
    loss, m = value_loss(values, old, returns, mask, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * 2.9 / 3, abs=1e-12)
    assert m["clipfrac"].item() == pytest.approx(1 / 3)


# --- entropy ---------------------------------------------------------------------------------------------------


def test_entropy_uniform_is_log_vocab():
    logits = torch.zeros(2, 3, 7, dtype=torch.float64) + t([1.0, -5.0, 300.0]).view(1, 3, 1)  # constant per row
    torch.testing.assert_close(entropy_from_logits(logits), torch.full((2, 3), math.log(7), dtype=torch.float64))


def test_entropy_matches_definition_and_is_stable():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 11, generator=g, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    peaked = torch.tensor([[[1e4, 0.0, 0.0]]])  # one-hot in float32: entropy 0, no nan
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)


# --- KL controllers --------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_hand_values():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 9: e = clip(9/6 - 1 = 0.5) = 0.2;   coef = 0.2 * (1 + 0.2 * 256/10000) = 0.2 * 1.00512 = 0.201024
    ctl.update(9.0, n_steps=256)
    assert ctl.value == pytest.approx(0.201024, abs=1e-12)
    # KL 6.6: e = 0.1 (inside the clip); coef *= 1 + 0.1 * 100/10000 = 1.001 -> 0.201225024
    ctl.update(torch.tensor(6.6, dtype=torch.float64), n_steps=100)  # a 0-dim tensor is accepted
    assert ctl.value == pytest.approx(0.201024 * 1.001, abs=1e-12)
    # KL 1: e = clip(1/6 - 1 = -0.833) = -0.2; coef *= 1 - 0.2 * 256/10000 = 0.99488
    ctl.update(1.0, n_steps=256)
    assert ctl.value == pytest.approx(0.201024 * 1.001 * 0.99488, abs=1e-12)

    restored = AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()
    ctl.update(3.0, 10)
    restored.update(3.0, 10)
    assert restored.value == ctl.value


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_controller_rejects_bad_config():
    with pytest.raises(ValueError, match="must be > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
