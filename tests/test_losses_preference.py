"""Preference losses against hand-computed values, invariants, gradients, validation, and the WDPO penalty.

Shared example (beta = 0.5), three pairs:
    policy chosen   [-1.0, -3.0, -2.0]    ref chosen   [-2.0, -3.5, -1.5]  -> chosen log-ratios   [ 1.0, 0.5, -0.5]
    policy rejected [-4.0, -5.0, -2.5]    ref rejected [-3.0, -5.5, -3.0]  -> rejected log-ratios [-1.0, 0.5,  0.5]
    h = [2.0, 0.0, -1.0],  z = beta h = [1.0, 0.0, -0.5]
l(z) = -log sigma(z) = log(1 + exp(-z)).
"""

import math

import pytest
import torch

from alignlab.losses import (
    PREFERENCE_LOSS_INFO,
    PREFERENCE_LOSSES,
    chosen_nll,
    preference_loss,
    preference_loss_params,
    validate_preference_params,
    wdpo_penalty,
)

BETA = 0.5
Z = [1.0, 0.0, -0.5]  # beta * h for the shared example


def nll(z: float) -> float:
    """l(z) = -log sigma(z) = log(1 + exp(-z))."""
    return math.log1p(math.exp(-z))


def mean(xs):
    return sum(xs) / len(xs)


def example():
    pc = torch.tensor([-1.0, -3.0, -2.0], dtype=torch.float64)
    pr = torch.tensor([-4.0, -5.0, -2.5], dtype=torch.float64)
    rc = torch.tensor([-2.0, -3.5, -1.5], dtype=torch.float64)
    rr = torch.tensor([-3.0, -5.5, -3.0], dtype=torch.float64)
    return pc, pr, rc, rr


def from_h(h, dtype=torch.float64, requires_grad=False):
    """Log-probs with h as given: policy chosen = h, everything else 0."""
    pc = torch.tensor(h, dtype=dtype, requires_grad=requires_grad)
    zeros = torch.zeros(len(h), dtype=dtype)
    return pc, zeros, zeros, zeros


def test_registry_names():
    assert set(PREFERENCE_LOSSES) == {
        "dpo", "ipo", "hinge", "cdpo", "rdpo", "drdpo", "kldpo", "wdpo", "ln_dpo", "simpo", "orpo"
    }  # fmt: skip
    assert preference_loss_params("dpo") == {}
    assert preference_loss_params("rdpo") == {"eps": 0.0}
    assert preference_loss_params("drdpo") == {"beta_prime": 1.0}
    assert preference_loss_params("kldpo") == {"tau": 0.05, "w_max": 10.0, "eps": 0.0, "gather": None}
    assert preference_loss_params("wdpo") == {"rho": 0.01, "eps": 0.0}
    assert preference_loss_params("simpo") == {"gamma": 1.0}
    assert preference_loss_params("ln_dpo") == {} and preference_loss_params("orpo") == {}


def test_catalog_agrees_with_registry():
    """The torch-free catalog (read by validation and trainers) lists every loss with the function's parameters."""
    assert set(PREFERENCE_LOSS_INFO) == set(PREFERENCE_LOSSES)
    for name, info in PREFERENCE_LOSS_INFO.items():
        params = {k: v for k, v in preference_loss_params(name).items() if k != "gather"}
        assert info.params == params, name
        assert ("gather" in preference_loss_params(name)) == info.batch_statistic, name
        assert info.source, name
    assert [n for n, i in PREFERENCE_LOSS_INFO.items() if not i.needs_reference] == ["simpo", "orpo"]
    assert {n for n, i in PREFERENCE_LOSS_INFO.items() if i.length_normalized} == {"ipo", "ln_dpo", "simpo", "orpo"}


def test_every_param_has_a_range_check():
    from alignlab.losses.preference import _PARAM_CHECKS

    for name in PREFERENCE_LOSSES:
        assert set(preference_loss_params(name)) <= set(_PARAM_CHECKS), name


def test_dpo_hand_values_and_metrics():
    # l(1) = log(1+e^-1) = 0.313262, l(0) = ln 2 = 0.693147, l(-0.5) = log(1+e^0.5) = 0.974077; mean = 0.660162
    loss, m = preference_loss("dpo", *example(), beta=BETA)
    expected = (math.log(1 + math.exp(-1.0)) + math.log(2.0) + math.log(1 + math.exp(0.5))) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(0.660162, abs=1e-6)
    # chosen rewards 0.5*[1, .5, -.5] = [.5, .25, -.25]; rejected 0.5*[-1, .5, .5] = [-.5, .25, .25]
    assert m["rewards/chosen"].item() == pytest.approx(0.5 / 3)
    assert m["rewards/rejected"].item() == pytest.approx(0.0)
    assert m["rewards/margins"].item() == pytest.approx(0.5 / 3)
    # .5 > -.5 right (1), .25 == .25 a tie (1/2), -.25 > .25 wrong (0): (1 + 0.5 + 0) / 3
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_ipo_hand_value():
    # tau = beta = 0.5 -> 1/(2 tau) = 1; h = [2, 0, -1] -> (1)^2, (-1)^2, (-2)^2 = 1, 1, 4 -> mean 2
    loss, _ = preference_loss("ipo", *example(), beta=BETA)
    assert loss.item() == pytest.approx(2.0)


def test_hinge_hand_value():
    # max(0, 1 - z) for z = [1, 0, -0.5] -> [0, 1, 1.5] -> mean 2.5 / 3
    loss, _ = preference_loss("hinge", *example(), beta=BETA)
    assert loss.item() == pytest.approx(2.5 / 3)


def test_cdpo_hand_value():
    # (1 - 0.1) l(z) + 0.1 l(-z) per pair
    loss, _ = preference_loss("cdpo", *example(), beta=BETA, eps=0.1)
    assert loss.item() == pytest.approx(mean([0.9 * nll(z) + 0.1 * nll(-z) for z in Z]), abs=1e-12)


def test_rdpo_hand_value():
    # [(1 - 0.1) l(z) - 0.1 l(-z)] / (1 - 0.2) per pair
    loss, _ = preference_loss("rdpo", *example(), beta=BETA, eps=0.1)
    assert loss.item() == pytest.approx(mean([(0.9 * nll(z) - 0.1 * nll(-z)) / 0.8 for z in Z]), abs=1e-12)


def test_drdpo_hand_value():
    # -beta' log(mean exp(-l_i / beta')) with beta' = 0.5
    loss, _ = preference_loss("drdpo", *example(), beta=BETA, beta_prime=0.5)
    expected = -0.5 * math.log(mean([math.exp(-nll(z) / 0.5) for z in Z]))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # Dr. DPO <= mean DPO (Jensen): the soft-min down-weights the high-loss pair
    assert expected < mean([nll(z) for z in Z])


@pytest.mark.parametrize("beta_prime", [1e6, 1e9])
def test_drdpo_large_beta_prime_is_exact_in_float32(beta_prime):
    """-b' log mean exp(-l / b') = mean l - Var(l) / (2 b') + O(1 / b'^2) (Var over the batch, 1/B). Shared example:
    l = [0.313262, 0.693147, 0.974077], mean 0.660162, Var 0.073323, so at b' = 1e6 L = mean DPO - 3.7e-8.
    In float32 the logsumexp form cancelled: 0.715256 at 1e6, 0.0 at 1e9."""
    pc, pr, rc, rr = (x.float() for x in example())
    loss, _ = preference_loss("drdpo", pc, pr, rc, rr, beta=BETA, beta_prime=beta_prime)
    dpo, _ = preference_loss("dpo", pc, pr, rc, rr, beta=BETA)
    ls = [nll(z) for z in Z]
    var = mean([(li - mean(ls)) ** 2 for li in ls])
    assert var == pytest.approx(0.073323, abs=1e-6)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(mean(ls) - var / (2 * beta_prime), abs=1e-6)
    assert loss.item() == pytest.approx(dpo.item(), abs=1e-6)


@pytest.mark.parametrize("beta_prime", [0.01, 0.5, 1.0, 1e3])
def test_drdpo_float32_hand_values_and_soft_min_gradient(beta_prime):
    """Small and moderate b' in float32: the hand value -b' log(mean exp(-l_i / b')) to 1e-6, and the gradient
    dL/dh_i = w_i dl_i/dh_i with w = softmax(-l / b') (the soft-min weights) and dl/dh = -beta sigma(-beta h)."""
    pc, pr, rc, rr = (x.float() for x in example())
    pc.requires_grad_(True)
    loss, _ = preference_loss("drdpo", pc, pr, rc, rr, beta=BETA, beta_prime=beta_prime)
    ls = [nll(z) for z in Z]
    expected = -beta_prime * math.log(mean([math.exp(-li / beta_prime) for li in ls]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    e = [math.exp(-li / beta_prime) for li in ls]
    grad = [ei / sum(e) * -BETA / (1 + math.exp(z)) for ei, z in zip(e, Z)]  # h = pc - ...: dh/dpc = 1
    assert pc.grad.tolist() == pytest.approx(grad, abs=1e-6)


def test_kldpo_hand_value():
    # lbar = mean l = 0.660162; w_i = min(exp((l_i - lbar) / 0.5), 10); L = mean w_i l_i
    loss, m = preference_loss("kldpo", *example(), beta=BETA, tau=0.5)
    ls = [nll(z) for z in Z]
    lbar = mean(ls)
    ws = [min(math.exp((li - lbar) / 0.5), 10.0) for li in ls]
    assert loss.item() == pytest.approx(mean([w * li for w, li in zip(ws, ls)]), abs=1e-12)
    assert m["kldpo/weight_mean"].item() == pytest.approx(mean(ws))
    assert m["kldpo/weight_max"].item() == pytest.approx(max(ws))
    assert m["kldpo/weight_min"].item() == pytest.approx(min(ws))


def test_kldpo_with_cdpo_base_hand_value():
    ls = [0.8 * nll(z) + 0.2 * nll(-z) for z in Z]  # cDPO base, eps = 0.2
    lbar = mean(ls)
    ws = [min(math.exp((li - lbar) / 0.3), 10.0) for li in ls]
    loss, _ = preference_loss("kldpo", *example(), beta=BETA, tau=0.3, eps=0.2)
    assert loss.item() == pytest.approx(mean([w * li for w, li in zip(ws, ls)]), abs=1e-12)


def test_wdpo_base_hand_value():
    # preference_loss("wdpo") returns the cDPO base term only; rho is not used there
    loss, _ = preference_loss("wdpo", *example(), beta=BETA, rho=5.0, eps=0.1)
    assert loss.item() == pytest.approx(mean([0.9 * nll(z) + 0.1 * nll(-z) for z in Z]), abs=1e-12)


@pytest.mark.parametrize(
    "name, params, tol",
    [
        ("cdpo", {"eps": 0.0}, 1e-12),
        ("rdpo", {"eps": 0.0}, 1e-12),
        ("wdpo", {"eps": 0.0, "rho": 0.3}, 1e-12),
        ("kldpo", {"tau": 1e9}, 1e-8),  # w_i = exp(O(1) / 1e9) = 1 + O(1e-9)
        ("drdpo", {"beta_prime": 1e6}, 1e-6),  # -b' log mean exp(-l/b') = mean l - Var(l) / (2 b') + ...
    ],
)
def test_reduces_to_dpo(name, params, tol):
    dpo, _ = preference_loss("dpo", *example(), beta=BETA)
    loss, _ = preference_loss(name, *example(), beta=BETA, **params)
    assert loss.item() == pytest.approx(dpo.item(), abs=tol)


@pytest.mark.parametrize(
    "name, params, expected",
    [
        ("dpo", {}, math.log(2)),
        ("cdpo", {"eps": 0.3}, math.log(2)),  # 0.7 ln2 + 0.3 ln2
        ("rdpo", {"eps": 0.3}, math.log(2)),  # (0.7 ln2 - 0.3 ln2) / 0.4
        ("kldpo", {"tau": 0.05}, math.log(2)),  # all l_i equal -> w_i = 1
        ("drdpo", {"beta_prime": 0.5}, math.log(2)),  # -b' log exp(-ln2 / b')
        ("wdpo", {"rho": 0.1}, math.log(2)),
        ("hinge", {}, 1.0),  # max(0, 1 - 0)
        ("ipo", {}, (1 / (2 * 0.2)) ** 2),  # (0 - 1/(2 beta))^2 = 2.5^2 = 6.25
    ],
)
def test_policy_equals_reference(name, params, expected):
    logps = torch.tensor([-3.0, -7.0, -1.5, -4.0])
    loss, m = preference_loss(name, logps, logps - 1, logps, logps - 1, beta=0.2, **params)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["rewards/margins"].item() == 0.0
    assert m["rewards/accuracies"].item() == 0.5  # every pair a tie: 1/2 each, chance level


def test_rdpo_single_term_can_be_negative():
    # beta h = 10, eps = 0.4: [0.6 l(10) - 0.4 l(-10)] / 0.2 = [0.6 * 4.54e-5 - 0.4 * 10.0000454] / 0.2 = -19.999955
    loss, _ = preference_loss("rdpo", *from_h([10.0]), beta=1.0, eps=0.4)
    expected = (0.6 * nll(10.0) - 0.4 * nll(-10.0)) / 0.2
    assert expected == pytest.approx(-19.999955, abs=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("eps", [0.1, 0.25, 0.45])
@pytest.mark.parametrize("h", [3.0, 0.7, -2.0])
def test_rdpo_unbiased_under_flips(eps, h):
    # With prob 1 - eps the label is kept (loss L(h)), with prob eps flipped (loss L(-h)):
    # (1-e)[(1-e) l(z) - e l(-z)] + e[(1-e) l(-z) - e l(z)] = ((1-e)^2 - e^2) l(z) = (1 - 2e) l(z); / (1 - 2e) -> l(z)
    kept, _ = preference_loss("rdpo", *from_h([h]), beta=BETA, eps=eps)
    flipped, _ = preference_loss("rdpo", *from_h([-h]), beta=BETA, eps=eps)
    expected_loss = (1 - eps) * kept.item() + eps * flipped.item()
    assert expected_loss == pytest.approx(nll(BETA * h), abs=1e-12)


def test_kldpo_weight_clipped_on_outlier():
    # beta = 1, h = [-20, 0, 0, 0]: l = [20.000000002, ln2, ln2, ln2]; lbar = (20 + 3 ln2) / 4 = 5.519860
    # w_0 = exp(20 - 5.519860) = 1.94e6 -> clipped to w_max = 10; w_j = exp(ln2 - 5.519860) = 0.008013
    loss, m = preference_loss("kldpo", *from_h([-20.0, 0.0, 0.0, 0.0]), beta=1.0, tau=1.0)
    ls = [nll(-20.0)] + [math.log(2)] * 3
    lbar = mean(ls)
    w_small = math.exp(math.log(2) - lbar)
    assert w_small == pytest.approx(0.008013, abs=1e-6)
    expected = (10.0 * ls[0] + 3 * w_small * math.log(2)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-10)
    assert m["kldpo/weight_max"].item() == pytest.approx(10.0)
    assert m["kldpo/weight_min"].item() == pytest.approx(w_small)
    # w_max = 2 clips the outlier at 2 instead
    loss2, m2 = preference_loss("kldpo", *from_h([-20.0, 0.0, 0.0, 0.0]), beta=1.0, tau=1.0, w_max=2.0)
    assert loss2.item() == pytest.approx((2.0 * ls[0] + 3 * w_small * math.log(2)) / 4, abs=1e-10)
    assert m2["kldpo/weight_max"].item() == pytest.approx(2.0)


def test_kldpo_gather_uses_global_mean():
    # Local batch: h = [0, 0], beta = 1 -> l = [ln2, ln2]. Another "process" holds per-pair losses [3, 5].
    # Global lbar = (2 ln2 + 8) / 4 = 2.346574; w = exp((ln2 - 2.346574) / 1) = 0.191393; L = w ln2 = 0.132664
    other = torch.tensor([3.0, 5.0], dtype=torch.float64)
    seen = []

    def fake_gather(x):
        seen.append(x)
        return torch.cat([x, other])

    loss, m = preference_loss("kldpo", *from_h([0.0, 0.0]), beta=1.0, tau=1.0, gather=fake_gather)
    lbar = (2 * math.log(2) + 8.0) / 4
    w = math.exp(math.log(2) - lbar)
    assert w == pytest.approx(0.191393, abs=1e-6)
    assert loss.item() == pytest.approx(w * math.log(2), abs=1e-12)
    assert m["kldpo/weight_mean"].item() == pytest.approx(w)
    assert len(seen) == 1 and not seen[0].requires_grad  # gather receives the detached per-pair losses
    # Single process: lbar = ln2, w = 1, L = ln2
    local, _ = preference_loss("kldpo", *from_h([0.0, 0.0]), beta=1.0, tau=1.0)
    assert local.item() == pytest.approx(math.log(2))


def test_kldpo_weights_are_detached():
    # dL/dh_i = w_i * dl_i/dh_i / B with w_i treated as a constant; dl/dh = -beta sigma(-beta h)
    pc, pr, rc, rr = from_h([2.0, -1.0, 0.5], requires_grad=True)
    loss, _ = preference_loss("kldpo", pc, pr, rc, rr, beta=BETA, tau=0.5)
    loss.backward()
    zs = [BETA * h for h in (2.0, -1.0, 0.5)]
    ls = [nll(z) for z in zs]
    ws = [math.exp((li - mean(ls)) / 0.5) for li in ls]
    sig = [1 / (1 + math.exp(z)) for z in zs]  # sigma(-z)
    expected = [w * (-BETA * s) / 3 for w, s in zip(ws, sig)]
    assert pc.grad.tolist() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_gradients_finite_for_large_h(name):
    params = {"cdpo": {"eps": 0.1}, "rdpo": {"eps": 0.1}, "kldpo": {"tau": 0.05}, "drdpo": {"beta_prime": 0.1}}
    for dtype in (torch.float32, torch.float64):
        pc, pr, rc, rr = from_h([1e3, -1e3, 0.0, 5.0], dtype=dtype, requires_grad=True)
        if not PREFERENCE_LOSS_INFO[name].needs_reference:  # no reference; log-probs <= 0, some at 0 (p = 1)
            pc = torch.tensor([0.0, -1e3, 0.0, -5.0], dtype=dtype, requires_grad=True)
            pr, rc, rr = torch.tensor([-1e3, 0.0, 0.0, -1e-9], dtype=dtype), None, None
        loss, m = preference_loss(name, pc, pr, rc, rr, beta=1.0, **params.get(name, {}))
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(pc.grad).all(), (name, dtype, pc.grad)
        assert all(torch.isfinite(v) for v in m.values())


@pytest.mark.parametrize(
    "name, beta, params, match",
    [
        ("cdpo", 0.1, {"eps": 0.5}, r"eps must be in \[0, 0\.5\)"),
        ("rdpo", 0.1, {"eps": -0.1}, r"eps must be in \[0, 0\.5\)"),
        ("kldpo", 0.1, {"eps": 0.7}, r"eps must be in \[0, 0\.5\)"),
        ("wdpo", 0.1, {"eps": 0.5}, r"eps must be in \[0, 0\.5\)"),
        ("kldpo", 0.1, {"tau": 0.0}, r"tau must be > 0"),
        ("kldpo", 0.1, {"w_max": 0.5}, r"w_max must be >= 1"),
        ("kldpo", 0.1, {"gather": 3}, r"gather must be None or a callable"),
        ("drdpo", 0.1, {"beta_prime": -1.0}, r"beta_prime must be > 0"),
        ("wdpo", 0.1, {"rho": -0.01}, r"rho must be a finite number >= 0"),
        ("dpo", 0.0, {}, r"beta must be a finite number > 0"),
        ("ipo", -1.0, {}, r"beta must be a finite number > 0"),
        ("dpo", 0.1, {"tau": 1.0}, r"unknown parameter 'tau'; dpo accepts: none besides beta"),
        ("rdpo", 0.1, {"tau": 1.0}, r"unknown parameter 'tau'; rdpo accepts: eps"),
        ("kldpo", 0.1, {"rho": 1.0}, r"kldpo accepts: tau, w_max, eps, gather"),
    ],
)
def test_bad_params_raise(name, beta, params, match):
    with pytest.raises(ValueError, match=match):
        validate_preference_params(name, beta, params)
    with pytest.raises(ValueError, match=match):
        preference_loss(name, *example(), beta=beta, **params)


def test_unknown_name_lists_known_names():
    msg = r"unknown preference loss 'dpo2'; known losses: cdpo, dpo, drdpo, hinge, ipo, kldpo, ln_dpo, orpo, rdpo,"
    with pytest.raises(ValueError, match=msg):
        preference_loss("dpo2", *example())
    with pytest.raises(ValueError, match=msg):
        validate_preference_params("dpo2", 0.1, {})
    with pytest.raises(ValueError, match="known losses"):
        preference_loss_params("dpo2")


def test_valid_params_pass_validation():
    validate_preference_params("kldpo", 0.1, {"tau": 0.05, "w_max": 1.0, "eps": 0.0, "gather": None})
    validate_preference_params("wdpo", 0.1, {"rho": 0.0})
    validate_preference_params("ipo", 0.1, {})


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"1-D log-prob tensors of equal shape"):
        preference_loss("dpo", torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(3))


# ---------------------------------------------------------------------------------------------------------------
# WDPO penalty: R_i = ||d(sum_j l_j)/dE_i||^2 over the chosen row i plus the rejected row i.
# Toy model: logp(row) = sum_{t,k} E[row, t, k] W[t, k]; reference log-probs 0; l_j = l(beta (logp_c,j - logp_r,j)).
# By hand: dl_j/dE[chosen j] = -beta sigma(-beta h_j) W and dl_j/dE[rejected j] = +beta sigma(-beta h_j) W, so
# R_j = 2 beta^2 sigma(-beta h_j)^2 ||W||^2.
# ---------------------------------------------------------------------------------------------------------------

B, T, H = 2, 2, 3
WBETA = 0.5


def toy_total(E, W):
    logps = (E * W).sum(dim=(1, 2))  # [2B]
    zeros = torch.zeros(B, dtype=E.dtype)
    loss, _ = preference_loss("dpo", logps[:B], logps[B:], zeros, zeros, beta=WBETA)
    return loss * B  # sum of per-pair losses, as the paper's g_i is defined


def toy_inputs():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(T, H, generator=g, dtype=torch.float64, requires_grad=True)
    return E, W


def test_wdpo_penalty_matches_finite_differences_and_hand_formula():
    E, W = toy_inputs()
    R = wdpo_penalty(toy_total(E, W), E)
    assert R.shape == (B,)

    # central differences of the total loss w.r.t. every element of E
    d = 1e-6
    flat = E.detach().clone().reshape(-1)
    grad_fd = torch.zeros_like(flat)
    with torch.no_grad():
        for k in range(flat.numel()):
            plus, minus = flat.clone(), flat.clone()
            plus[k] += d
            minus[k] -= d
            grad_fd[k] = (toy_total(plus.view_as(E), W) - toy_total(minus.view_as(E), W)) / (2 * d)
    sq = grad_fd.view(2 * B, -1).pow(2).sum(dim=1)
    R_fd = sq[:B] + sq[B:]
    torch.testing.assert_close(R, R_fd, rtol=1e-6, atol=1e-9)

    # closed form: R_j = 2 beta^2 sigma(-beta h_j)^2 ||W||^2
    with torch.no_grad():
        logps = (E * W).sum(dim=(1, 2))
        h = logps[:B] - logps[B:]
        R_hand = 2 * WBETA**2 * torch.sigmoid(-WBETA * h).pow(2) * W.pow(2).sum()
    torch.testing.assert_close(R.detach(), R_hand, rtol=1e-10, atol=1e-12)


def test_wdpo_penalty_gradient_flows_through_create_graph():
    E, W = toy_inputs()
    R = wdpo_penalty(toy_total(E, W), E, create_graph=True)
    (dW,) = torch.autograd.grad(R.sum(), W)

    def penalty_sum(W_value):
        E2 = E.detach().clone().requires_grad_(True)
        return wdpo_penalty(toy_total(E2, W_value), E2, create_graph=False).sum()

    d = 1e-6
    flat = W.detach().clone().reshape(-1)
    dW_fd = torch.zeros_like(flat)
    for k in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus[k] += d
        minus[k] -= d
        dW_fd[k] = (penalty_sum(plus.view_as(W)) - penalty_sum(minus.view_as(W))) / (2 * d)
    torch.testing.assert_close(dW, dW_fd.view_as(W), rtol=1e-5, atol=1e-8)


def test_wdpo_penalty_without_graph_is_constant():
    E, W = toy_inputs()
    R = wdpo_penalty(toy_total(E, W), E, create_graph=False)
    assert not R.requires_grad


def test_wdpo_penalty_rejects_odd_batch():
    E = torch.zeros(3, 2, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"\[2B"):
        wdpo_penalty((E * 2).sum(), E)


# ---------------------------------------------------------------------------------------------------------------
# Length-normalised and reference-free losses: ln_dpo, simpo, orpo
# ---------------------------------------------------------------------------------------------------------------


def test_ln_dpo_is_dpo_on_the_averages_it_is_given():
    """ln_dpo is DPO's formula; what differs is its catalog flag, which makes the stage pass per-token averages.
    Averages of the shared example over lengths (chosen 2, 4, 1; rejected 4, 1, 2 tokens), beta = 0.5:
      chosen log-ratios [1.0, 0.5, -0.5] / [2, 4, 1] = [0.5, 0.125, -0.5]
      rejected          [-1.0, 0.5, 0.5] / [4, 1, 2] = [-0.25, 0.5, 0.25]
      h = [0.75, -0.375, -0.75], z = [0.375, -0.1875, -0.375]
      L = mean(l(0.375), l(-0.1875), l(-0.375)) = mean(0.524187, 0.792897, 0.899187) = 0.738757"""
    n_c = torch.tensor([2.0, 4.0, 1.0], dtype=torch.float64)
    n_r = torch.tensor([4.0, 1.0, 2.0], dtype=torch.float64)
    pc, pr, rc, rr = example()
    loss, m = preference_loss("ln_dpo", pc / n_c, pr / n_r, rc / n_c, rr / n_r, beta=BETA)
    assert loss.item() == pytest.approx(mean([nll(0.375), nll(-0.1875), nll(-0.375)]), abs=1e-12)
    assert loss.item() == pytest.approx(0.737511, abs=1e-6)
    assert PREFERENCE_LOSS_INFO["ln_dpo"].length_normalized and PREFERENCE_LOSS_INFO["ln_dpo"].needs_reference
    # beta defaults to the catalog's 5 (Tulu 3): z = 5 h
    loss5, _ = preference_loss("ln_dpo", pc / n_c, pr / n_r, rc / n_c, rr / n_r)
    assert loss5.item() == pytest.approx(mean([nll(3.75), nll(-1.875), nll(-3.75)]), abs=1e-12)


def test_simpo_hand_values():
    """SimPO: L = mean softplus(-(beta (avg_c - avg_r) - gamma)), beta = 2, gamma = 1, no reference.
    Pair 1: avg_c = -0.5, avg_r = -1.5: z = 2 * 1 - 1 = 1    -> l(1)  = log(1 + e^-1) = 0.313262
    Pair 2: avg_c = -1.0, avg_r = -1.0: z = 2 * 0 - 1 = -1   -> l(-1) = log(1 + e)    = 1.313262
    L = (0.313262 + 1.313262) / 2 = 0.813262. Rewards: beta * avg: chosen [-1, -2], rejected [-3, -2]."""
    pc = torch.tensor([-0.5, -1.0], dtype=torch.float64)
    pr = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    loss, m = preference_loss("simpo", pc, pr, None, None, beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx((nll(1.0) + nll(-1.0)) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(0.813262, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(-1.5)
    assert m["rewards/rejected"].item() == pytest.approx(-2.5)
    assert m["rewards/accuracies"].item() == pytest.approx(0.75)  # right (1) and a tie (1/2)
    # Catalog defaults (beta 2, gamma 1) give the same; gamma = 0: mean(l(2), l(0)) = (0.126928 + 0.693147) / 2
    assert preference_loss("simpo", pc, pr, None, None)[0].item() == pytest.approx(loss.item(), abs=1e-12)
    loss0, _ = preference_loss("simpo", pc, pr, None, None, beta=2.0, gamma=0.0)
    assert loss0.item() == pytest.approx((nll(2.0) + math.log(2)) / 2, abs=1e-12)
    # Equal averages: L = softplus(gamma) whatever the lengths were
    same = torch.tensor([-0.7, -2.0], dtype=torch.float64)
    assert preference_loss("simpo", same, same, None, None, gamma=0.5)[0].item() == pytest.approx(
        math.log1p(math.exp(0.5)), abs=1e-12
    )


def test_orpo_hand_values():
    """ORPO with lambda = beta = 0.1, per-token average log-probs:
    Pair 1: p_c = 0.5 -> odds 1, log odds 0;  p_r = 0.2 -> odds 0.25, log odds -ln 4.
            log OR = ln 4; l(ln 4) = log(1 + 1/4) = ln 1.25 = 0.223144;  NLL = -ln 0.5 = 0.693147
            -> 0.693147 + 0.1 * 0.223144 = 0.715461
    Pair 2: p_c = 0.8 -> log odds ln 4;  p_r = 0.5 -> log odds 0.  log OR = ln 4 again; NLL = -ln 0.8 = 0.223144
            -> 0.223144 + 0.1 * 0.223144 = 0.245458
    L = (0.715461 + 0.245458) / 2 = 0.480460"""
    pc = torch.log(torch.tensor([0.5, 0.8], dtype=torch.float64))
    pr = torch.log(torch.tensor([0.2, 0.5], dtype=torch.float64))
    loss, m = preference_loss("orpo", pc, pr, None, None, beta=0.1)
    pair1 = math.log(2) + 0.1 * math.log(1.25)
    pair2 = -math.log(0.8) + 0.1 * math.log(1.25)
    assert loss.item() == pytest.approx((pair1 + pair2) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(0.480460, abs=1e-6)
    assert m["orpo/nll"].item() == pytest.approx((math.log(2) - math.log(0.8)) / 2, abs=1e-12)
    assert m["orpo/log_odds_ratio"].item() == pytest.approx(math.log(4), abs=1e-12)
    assert PREFERENCE_LOSS_INFO["orpo"].policy_logps and not PREFERENCE_LOSS_INFO["orpo"].needs_reference


@pytest.mark.parametrize("x", [-1e-5, -1e-3, -0.5, -0.69, -0.7, -3.0, -40.0, -200.0])
def test_orpo_log_odds_is_accurate_in_float32(x):
    """log(p / (1 - p)) = x - log(1 - e^x), p = e^x, in float32 against float64, on both sides of the branch at
    -ln 2 = -0.693. The naive float32 log(1 - exp(x)) keeps ~3 digits at x = -1e-5 (exp(x) rounds to a multiple
    of 6e-8 below 1), and log1p(-exp(x)) alone loses them the same way near 0."""
    from alignlab.losses import orpo_log_odds

    expected = x - math.log(-math.expm1(x))
    got = orpo_log_odds(torch.tensor([x], dtype=torch.float32)).item()
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_orpo_finite_where_the_policy_is_certain():
    """A confident model's float32 average log-prob rounds to exactly 0 (p = 1, infinite odds): the loss and its
    gradient stay finite (avg log-prob capped at -1e-6, log odds 13.8155), and the chosen side keeps the NLL's
    gradient -1/B."""
    pc = torch.tensor([0.0, -1.0], requires_grad=True)
    pr = torch.tensor([0.0, -2.0], requires_grad=True)
    loss, m = preference_loss("orpo", pc, pr, None, None, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    from alignlab.losses import orpo_log_odds

    assert orpo_log_odds(torch.tensor([0.0])).item() == pytest.approx(-1e-6 - math.log(1e-6), rel=1e-4)
    assert pc.grad[0].item() == pytest.approx(-0.5)  # NLL only: the cap stops the odds gradient at p = 1


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_losses_refuse_reference_log_probs(name):
    pc, pr, rc, rr = example()
    with pytest.raises(ValueError, match=f"{name} uses no reference model: pass ref_chosen_logps = ref_rejected"):
        preference_loss(name, pc, pr, rc, rr)


def test_losses_with_a_reference_refuse_none():
    pc, pr, _, _ = example()
    with pytest.raises(
        ValueError, match=r"dpo compares the policy with a reference model.*Reference-free losses: simpo"
    ):
        preference_loss("dpo", pc, pr, None, None)


def test_simpo_gamma_range():
    with pytest.raises(ValueError, match=r"gamma must be a finite number >= 0, got gamma=-1"):
        validate_preference_params("simpo", 2.0, {"gamma": -1})
    with pytest.raises(ValueError, match=r"orpo: unknown parameter 'gamma'; orpo accepts: none besides beta"):
        validate_preference_params("orpo", 0.1, {"gamma": 1.0})


def test_chosen_nll_is_the_per_token_nll_averaged_over_pairs():
    """RPO's term: chosen log-probs [-6, -2] over 3 and 4 tokens -> NLL per token 2 and 0.5 -> mean 1.25; an empty
    answer (0 tokens, log-prob 0) counts 0, not nan. Its gradient on pair i's summed log-prob is -1 / (B n_i)."""
    logps = torch.tensor([-6.0, -2.0, 0.0], dtype=torch.float64, requires_grad=True)
    value = chosen_nll(logps, torch.tensor([3, 4, 0]))
    assert value.item() == pytest.approx((2.0 + 0.5 + 0.0) / 3)
    value.backward()
    assert logps.grad.tolist() == pytest.approx([-1 / 9, -1 / 12, -1 / 3])


def test_nll_alpha_is_checked_when_the_recipe_loads():
    from alignlab.stages.specs import DPOSpec

    data = {"path": "builtin:arith", "split": "preference"}
    assert DPOSpec(name="dpo", dataset=data, nll_alpha=0.5).nll_alpha == 0.5
    with pytest.raises(ValueError, match="orpo already trains on the chosen answers' NLL.*Remove nll_alpha"):
        DPOSpec(name="dpo", dataset=data, loss={"name": "orpo"}, nll_alpha=0.5)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        DPOSpec(name="dpo", dataset=data, nll_alpha=-1.0)
