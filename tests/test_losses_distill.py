"""Distillation losses (alignlab/losses/distill.py) against hand-computed values on two-token distributions.

The running example: teacher logits [0, 0] give p = [1/2, 1/2]; student logits [ln 3, 0] give q = [3/4, 1/4].
    KL(p || q) = 1/2 ln(1/2 / 3/4) + 1/2 ln(1/2 / 1/4) = 1/2 ln(4/3)                = 0.143841
    KL(q || p) = 3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2) = 3/4 ln 3 - ln 2            = 0.130812
    beta 1/2: m = [5/8, 3/8]; KL(p || m) = 1/2 ln(4/5) + 1/2 ln(4/3)                 = 0.032269
                              KL(q || m) = 3/4 ln(6/5) + 1/4 ln(2/3)                 = 0.035375
              JSD = (0.032269 + 0.035375) / 2                                         = 0.033822
"""

import math

import pytest
import torch

from alignlab.losses.distill import distill_loss, token_divergence

TEACHER = torch.tensor([[[0.0, 0.0]]])  # [B 1, C 1, V 2]
STUDENT = torch.tensor([[[math.log(3.0), 0.0]]])
FORWARD = 0.5 * math.log(4 / 3)
REVERSE = 0.75 * math.log(3) - math.log(2)
JSD_HALF = 0.5 * (0.5 * math.log(4 / 5) + 0.5 * math.log(4 / 3)) + 0.5 * (
    0.75 * math.log(6 / 5) + 0.25 * math.log(2 / 3)
)


def _div(name, student=STUDENT, teacher=TEACHER, **kw):
    return token_divergence(student, teacher, name=name, **kw).item()


def test_hand_values():
    assert _div("forward_kl") == pytest.approx(FORWARD, rel=1e-6)  # 0.143841
    assert _div("reverse_kl") == pytest.approx(REVERSE, rel=1e-6)  # 0.130812
    assert _div("jsd", beta=0.5) == pytest.approx(JSD_HALF, rel=1e-6)  # 0.033822
    assert _div("jsd", beta=0.5) < math.log(2)  # the symmetric JSD is bounded by ln 2


def test_every_divergence_is_zero_when_the_distributions_agree():
    for name in ("forward_kl", "reverse_kl", "jsd"):
        assert _div(name, student=TEACHER + 5.0) == pytest.approx(0.0, abs=1e-7)  # a shift leaves softmax alone


def test_beta_limits_are_the_two_kls():
    # JSD_beta / beta = KL(p || q) + O(beta) near 0, and JSD_beta / (1 - beta) = KL(q || p) + O(1 - beta) near 1:
    # the gap shrinks about ten-fold with beta (exact values: 0.142178 and 0.143674 against 0.143841; 0.129562 and
    # 0.130687 against 0.130812). Smaller betas drown in float32 rounding.
    for kl, side in ((FORWARD, lambda b: b), (REVERSE, lambda b: 1 - b)):
        gaps = [abs(_div("jsd", beta=side(b)) / b - kl) for b in (1e-2, 1e-3)]
        assert gaps[0] < 2e-3 and gaps[1] < gaps[0] / 5
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        _div("jsd", beta=0.0)


def test_temperature_softens_both_sides_and_scales_by_its_square():
    # tau = 2: p stays [1/2, 1/2]; q = softmax([ln 3 / 2, 0]) = [sqrt 3, 1] / (sqrt 3 + 1) = [0.633975, 0.366025].
    q1 = math.sqrt(3) / (math.sqrt(3) + 1)
    kl = 0.5 * math.log(0.5 / q1) + 0.5 * math.log(0.5 / (1 - q1))  # 0.037256
    assert _div("forward_kl", temperature=2.0) == pytest.approx(4 * kl, rel=1e-6)  # x tau^2 = 0.149024
    # Hinton et al.'s high-temperature limit: tau^2 KL -> sum_v (a_v - b_v)^2 / (2 V), a and b the zero-mean logits;
    # here a = [0, 0], b = [ln 3 / 2, -ln 3 / 2], V = 2: (ln 3)^2 / 2 / 4 = 0.150869 (at tau 20: 0.150850).
    assert _div("forward_kl", temperature=20.0) == pytest.approx(math.log(3) ** 2 / 8, rel=2e-4)


def test_forward_kl_gradient_is_student_minus_teacher():
    # d KL(p || softmax(z / tau)) / dz = (q_tau - p_tau) / tau, times tau^2: tau (q_tau - p_tau).
    for tau, q in ((1.0, [0.75, 0.25]), (2.0, [math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)])):
        student = STUDENT.clone().requires_grad_(True)
        token_divergence(student, TEACHER, name="forward_kl", temperature=tau).sum().backward()
        expected = [tau * (q[0] - 0.5), tau * (q[1] - 0.5)]
        assert student.grad[0, 0].tolist() == pytest.approx(expected, rel=1e-5)


def test_loss_averages_the_masked_tokens_and_reports_both_kls():
    # Two positions: the running example, and one the mask drops (its logits would add a large divergence).
    student = torch.cat([STUDENT, torch.tensor([[[9.0, -9.0]]])], dim=1)
    teacher = torch.cat([TEACHER, torch.tensor([[[-9.0, 9.0]]])], dim=1)
    mask = torch.tensor([[1, 0]])
    loss, stats = distill_loss(student, teacher, mask, name="reverse_kl")
    assert loss.item() == pytest.approx(REVERSE, rel=1e-6)
    assert stats["divergence"].item() == pytest.approx(REVERSE, rel=1e-6)
    assert stats["forward_kl"].item() == pytest.approx(FORWARD, rel=1e-6)
    assert stats["reverse_kl"].item() == pytest.approx(REVERSE, rel=1e-6)
    # num_items divides the sum: the global token count of a batch split over processes
    halved, _ = distill_loss(student, teacher, mask, name="reverse_kl", num_items=2)
    assert halved.item() == pytest.approx(REVERSE / 2, rel=1e-6)
    # the reported KLs are at temperature 1 whatever the loss's temperature
    _, hot = distill_loss(student, teacher, mask, name="jsd", beta=0.5, temperature=3.0)
    assert hot["forward_kl"].item() == pytest.approx(FORWARD, rel=1e-6)


def test_jsd_equals_trls_gkd_loss_over_tau_squared():
    """TRL's GKDTrainer.generalized_jsd_loss (GKD eq. 1, without the tau^2 factor) on random logits, masked."""
    from trl.experimental.gkd import GKDTrainer

    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=generator), torch.randn(2, 5, 7, generator=generator)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, 1]])
    mask = labels != -100
    for beta in (0.1, 0.5, 0.9):
        ours, _ = distill_loss(student, teacher, mask, name="jsd", beta=beta, temperature=2.0)
        trl = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=2.0)
        assert ours.item() / 4.0 == pytest.approx(trl.item(), rel=1e-5)


def test_unknown_loss_and_mismatched_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="unknown distillation loss 'kl'; choose one of forward_kl, reverse_kl, jsd"):
        _div("kl")
    with pytest.raises(ValueError, match="differ in shape"):
        token_divergence(STUDENT, torch.zeros(1, 1, 3))
