"""Bradley-Terry loss against hand-computed values.

Example: r_c = [2.0, 0.5, -1.0], r_r = [1.0, 1.5, -3.0] (given as [B, 1] like a reward head's output)
    d = r_c - r_r = [1.0, -1.0, 2.0];  l(z) = -log sigma(z) = log(1 + exp(-z))
"""

import math

import pytest
import torch

from alignlab.losses import bradley_terry_loss


def nll(z: float) -> float:
    return math.log1p(math.exp(-z))


R_C = [[2.0], [0.5], [-1.0]]
R_R = [[1.0], [1.5], [-3.0]]


def rewards():
    return torch.tensor(R_C, dtype=torch.float64), torch.tensor(R_R, dtype=torch.float64)


def test_plain_loss_and_metrics():
    # L = [l(1) + l(-1) + l(2)] / 3 = [0.313262 + 1.313262 + 0.126928] / 3 = 0.584484
    loss, m = bradley_terry_loss(*rewards())
    assert loss.item() == pytest.approx((nll(1.0) + nll(-1.0) + nll(2.0)) / 3, abs=1e-12)
    assert loss.item() == pytest.approx(0.584484, abs=1e-6)
    assert m["accuracy"].item() == pytest.approx(2 / 3)  # 2 > 1 yes, 0.5 > 1.5 no, -1 > -3 yes
    assert m["margin"].item() == pytest.approx(2 / 3)  # (1 - 1 + 2) / 3
    assert m["chosen_rewards"].item() == pytest.approx(0.5)  # (2 + 0.5 - 1) / 3
    assert m["rejected_rewards"].item() == pytest.approx(-0.5 / 3)  # (1 + 1.5 - 3) / 3
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_margin():
    # m = [0.5, 0, 1]: logits d - m = [0.5, -1, 1] -> L = [l(0.5) + l(-1) + l(1)] / 3
    margin = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
    loss, m = bradley_terry_loss(*rewards(), margin=margin)
    assert loss.item() == pytest.approx((nll(0.5) + nll(-1.0) + nll(1.0)) / 3, abs=1e-12)
    assert m["margin"].item() == pytest.approx(2 / 3)  # the metric is the raw r_c - r_r, not minus m


def test_centering():
    # r_c + r_r = [3, 2, -4] -> squares [9, 4, 16], mean 29/3; eta = 0.01 adds 0.01 * 29/3 = 0.096667
    loss, _ = bradley_terry_loss(*rewards(), center_coef=0.01)
    plain = (nll(1.0) + nll(-1.0) + nll(2.0)) / 3
    assert loss.item() == pytest.approx(plain + 0.01 * 29 / 3, abs=1e-12)
    off, _ = bradley_terry_loss(*rewards(), center_coef=0.0)
    assert off.item() == pytest.approx(plain, abs=1e-12)


def test_margin_and_centering_and_1d_inputs():
    r_c, r_r = (t.squeeze(-1) for t in rewards())
    margin = torch.tensor([[0.5], [0.0], [1.0]], dtype=torch.float64)
    loss, _ = bradley_terry_loss(r_c, r_r, margin=margin, center_coef=0.01)
    assert loss.item() == pytest.approx((nll(0.5) + nll(-1.0) + nll(1.0)) / 3 + 0.01 * 29 / 3, abs=1e-12)


def test_gradient_finite_and_correct():
    # dL/dr_c,i = -sigma(-d_i) / B
    r_c = torch.tensor([1e3, -1e3, 0.0], requires_grad=True)
    r_r = torch.zeros(3)
    loss, _ = bradley_terry_loss(r_c, r_r)
    loss.backward()
    assert torch.isfinite(loss)
    assert r_c.grad.tolist() == pytest.approx([0.0, -1 / 3, -0.5 / 3], abs=1e-7)


def test_bad_inputs():
    with pytest.raises(ValueError, match="center_coef must be >= 0"):
        bradley_terry_loss(*rewards(), center_coef=-0.1)
    with pytest.raises(ValueError, match=r"shape \[B\] or \[B, 1\]"):
        bradley_terry_loss(torch.zeros(3, 2), torch.zeros(3, 2))


def test_accuracy_counts_a_tie_as_half():
    # d = [2 - 1, 1 - 1, 0.5 - 3] = [1, 0, -2.5]: right, tie (1/2), wrong -> (1 + 0.5 + 0) / 3 = 0.5, as the
    # evaluation's preference_accuracy counts it; all ties (an untrained head) give 0.5, chance level.
    _, m = bradley_terry_loss(torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.0, 1.0, 3.0]))
    assert m["accuracy"].item() == 0.5
    _, m = bradley_terry_loss(torch.zeros(4), torch.zeros(4))
    assert m["accuracy"].item() == 0.5
