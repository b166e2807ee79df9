"""KTO's loss and reference point, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from dvpo_lightning.algos import check_kto_options, kto_loss, kto_reference_point


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_reference_point_is_the_detached_mean_log_ratio_clamped_at_zero():
    policy = torch.tensor([-3.0, -5.0], requires_grad=True)
    z = kto_reference_point(policy, torch.tensor([-4.0, -5.5]))  # log-ratios 1.0, 0.5
    assert float(z) == pytest.approx(0.75) and not z.requires_grad
    assert float(kto_reference_point(torch.tensor([-4.0]), torch.tensor([-3.0]))) == 0.0  # -1 clamped


def test_loss_by_hand():
    # log-ratios 0.5 (desirable), -1.0 (undesirable), 2.0 (undesirable); z = 0.25, beta 0.5, weights 2 and 0.5
    losses = kto_loss(
        torch.tensor([-1.0, -3.0, -2.0]),
        torch.tensor([-1.5, -2.0, -4.0]),
        torch.tensor([True, False, False]),
        torch.tensor(0.25),
        beta=0.5,
        desirable_weight=2.0,
        undesirable_weight=0.5,
    )
    expected = [
        2.0 * (1 - sigmoid(0.5 * (0.5 - 0.25))),
        0.5 * (1 - sigmoid(0.5 * (0.25 + 1.0))),
        0.5 * (1 - sigmoid(0.5 * (0.25 - 2.0))),
    ]
    assert losses.tolist() == pytest.approx(expected, abs=1e-7)


def test_the_reference_gets_no_gradient_and_the_policy_does():
    policy, reference = (
        torch.tensor([-1.0, -2.0], requires_grad=True),
        torch.tensor([-1.0, -2.0], requires_grad=True),
    )
    kto_loss(policy, reference, torch.tensor([True, False]), torch.tensor(0.0), beta=0.1).sum().backward()
    assert reference.grad is None
    # d/dr of 1 - sigmoid(beta r) at r = 0 is -beta/4 for a desirable row, +beta/4 for an undesirable one
    assert policy.grad.tolist() == pytest.approx([-0.025, 0.025])


@pytest.mark.parametrize(
    "options, message",
    [
        ((0.0, 1.0, 1.0), "beta"),
        ((0.1, 0.0, 1.0), "desirable_weight"),
        ((0.1, 1.0, -1.0), "undesirable_weight"),
    ],
)
def test_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        check_kto_options(*options)
