"""KL estimators by hand, and the fixed / adaptive KL controllers."""

from __future__ import annotations

import math

import pytest
import torch

from dvpo_lightning.algos import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    build_kl_controller,
    check_kl_loss_estimator,
    kl_loss,
    kl_penalty,
    sequence_kl,
)
from dvpo_lightning.rl import PPOConfig

# log_ratio = logprobs - ref_logprobs = (1, -1)
LOGPROBS = torch.tensor([[-1.0, -2.0]])
REF_LOGPROBS = torch.tensor([[-2.0, -1.0]])


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("k1", [1.0, -1.0]),
        ("k2", [0.5, 0.5]),
        ("k3", [math.exp(-1) - 1 + 1, math.exp(1) - 1 - 1]),
        ("abs", [1.0, 1.0]),
    ],
)
def test_estimators_by_hand(kind, expected):
    assert kl_penalty(LOGPROBS, REF_LOGPROBS, kind)[0].tolist() == pytest.approx(expected)


@pytest.mark.parametrize("kind", KL_ESTIMATORS)
def test_nan_on_padding_is_zero_and_keeps_gradients_finite(kind):
    logprobs = torch.tensor([[-1.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[True, False]])
    kl = kl_penalty(logprobs, torch.tensor([[-2.0, float("nan")]]), kind, mask=mask)
    assert kl[0, 1].item() == 0.0
    kl.sum().backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 1].item() == 0.0


def test_k3_is_non_negative_and_zero_only_at_equal_log_probs():
    log_ratio = torch.linspace(-3, 3, 13)
    k3 = kl_penalty(log_ratio, torch.zeros(13), "k3")
    assert (k3 >= 0).all() and k3[6].item() == 0.0 and (k3[log_ratio != 0] > 0).all()


def test_unknown_estimator_and_shape_mismatch_are_errors():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; known: k1, k2, k3, abs"):
        kl_penalty(LOGPROBS, REF_LOGPROBS, "k4")
    with pytest.raises(ValueError, match="differ in shape"):
        kl_penalty(LOGPROBS, REF_LOGPROBS[:, :1])


def test_fixed_controller_never_moves():
    controller = FixedKLController(0.01)
    assert controller.update(current_kl=100.0, n_steps=1000) == 0.01


@pytest.mark.parametrize(
    "current_kl, expected",
    [
        (12.0, 0.2 * (1 + 0.2 * 100 / 10000)),  # error 1.0, clipped to +0.2
        (6.6, 0.2 * (1 + 0.1 * 100 / 10000)),  # error 0.1
        (3.0, 0.2 * (1 - 0.2 * 100 / 10000)),  # error -0.5, clipped to -0.2
        (torch.tensor(6.0), 0.2),  # on target: no change
    ],
)
def test_adaptive_controller_rule_by_hand(current_kl, expected):
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    assert controller.update(current_kl, n_steps=100) == pytest.approx(expected)
    assert controller.value == pytest.approx(expected)


def test_adaptive_controller_moves_the_kl_towards_target():
    """A KL that falls as the coefficient rises (a toy policy) settles near the target."""
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=100)
    assert 1.2 / controller.value == pytest.approx(12.0)  # twice the target at the start
    for _ in range(300):
        controller.update(current_kl=1.2 / controller.value, n_steps=10)
    assert 1.2 / controller.value == pytest.approx(6.0, rel=0.01)


def test_state_round_trip_resumes_with_the_same_coefficient():
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    controller.update(12.0, n_steps=500)
    resumed = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.value == controller.value != 0.2
    assert resumed.update(3.0, 10) == controller.update(3.0, 10)


def test_factory():
    assert isinstance(build_kl_controller("fixed", 0.01), FixedKLController)
    adaptive = build_kl_controller("adaptive", 0.2, target=6.0, horizon=10000)
    assert isinstance(adaptive, AdaptiveKLController) and adaptive.target == 6.0
    with pytest.raises(ValueError, match="needs target and horizon"):
        build_kl_controller("adaptive", 0.2)
    with pytest.raises(ValueError, match="takes no target"):
        build_kl_controller("fixed", 0.2, target=6.0)
    with pytest.raises(ValueError, match="unknown KL controller 'pid'"):
        build_kl_controller("pid", 0.2)


def test_sequence_kl_sums_the_estimate_over_each_responses_real_tokens():
    """Row 0: log-ratios (1, -1) -> k1 0, abs 2; row 1: only its first token (1) is real, NaN after."""
    logprobs = torch.tensor([[-1.0, -2.0], [-1.0, float("nan")]])
    ref_logprobs = torch.tensor([[-2.0, -1.0], [-2.0, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    assert sequence_kl(logprobs, ref_logprobs, mask, "k1").tolist() == [0.0, 1.0]
    assert sequence_kl(logprobs, ref_logprobs, mask, "abs").tolist() == [2.0, 1.0]


def exact_gradient_of_the_loss_term(kind: str, logits: torch.Tensor, ref_probs: torch.Tensor) -> torch.Tensor:
    """E_{y ~ pi}[grad kl(y)] over a 5-way softmax pi, exactly: every token weighted by its (constant) probability,
    as the loss term on sampled tokens is on average."""
    logits = logits.clone().requires_grad_(True)
    logprobs = torch.log_softmax(logits, dim=-1)
    estimate = kl_penalty(logprobs[None], ref_probs.log()[None], kind)[0]
    (logprobs.exp().detach() * estimate).sum().backward()
    return logits.grad


def kl_gradient(logits: torch.Tensor, divergence) -> torch.Tensor:
    logits = logits.clone().requires_grad_(True)
    divergence(torch.softmax(logits, dim=-1)).backward()
    return logits.grad


LOGITS = torch.tensor([0.3, -1.2, 0.8, 0.0, -0.4], dtype=torch.float64)
REF_PROBS = torch.softmax(torch.tensor([-0.5, 0.4, 0.1, 0.9, -1.0], dtype=torch.float64), dim=-1)


def test_as_a_loss_term_k1_regularises_nothing_k2_and_k3_give_the_two_kl_gradients():
    zero = exact_gradient_of_the_loss_term("k1", LOGITS, REF_PROBS)
    assert torch.allclose(zero, torch.zeros(5, dtype=torch.float64), atol=1e-15)
    forward_kl = kl_gradient(LOGITS, lambda pi: (pi * (pi.log() - REF_PROBS.log())).sum())  # KL(pi || ref)
    reverse_kl = kl_gradient(
        LOGITS, lambda pi: (REF_PROBS * (REF_PROBS.log() - pi.log())).sum()
    )  # KL(ref || pi)
    assert torch.allclose(exact_gradient_of_the_loss_term("k2", LOGITS, REF_PROBS), forward_kl)
    assert torch.allclose(exact_gradient_of_the_loss_term("k3", LOGITS, REF_PROBS), reverse_kl)
    assert not torch.allclose(forward_kl, torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["k1", "abs"])
def test_kl_in_the_loss_refuses_an_estimator_that_regularises_nothing(kind):
    with pytest.raises(ValueError, match=f"the {kind} estimate as a loss term .* use k3 .* or k2"):
        check_kl_loss_estimator(kind)
    with pytest.raises(ValueError, match=f"ppo.kl_estimator={kind} with ppo.kl_placement=loss: .*use k3"):
        PPOConfig(kl_placement="loss", kl_estimator=kind)
    with pytest.raises(ValueError, match="use k3"):
        kl_loss(LOGPROBS, REF_LOGPROBS, torch.ones(1, 2, dtype=torch.bool), kl_coef=0.1, estimator=kind)
    PPOConfig(kl_placement="reward", kl_estimator=kind)  # in the reward each is an estimate of the KL


def test_k3_overflows_without_a_clamp_and_is_finite_with_one():
    log_ratio = torch.tensor([[-95.0, -5.0, -2.0, 0.5]], requires_grad=True)
    assert torch.isinf(kl_penalty(log_ratio, torch.zeros(1, 4), "k3")[0, 0])
    clamped = kl_penalty(log_ratio, torch.zeros(1, 4), "k3", clamp=10.0)
    clamped.sum().backward()
    # k3(-5) = e^5 - 6 = 142 and k3(-95) are clamped to 10 with zero gradient; the others are untouched
    assert clamped[0].tolist() == pytest.approx([10.0, 10.0, math.exp(2) - 3, math.exp(-0.5) - 0.5])
    assert log_ratio.grad[0].tolist() == pytest.approx([0.0, 0.0, 1 - math.exp(2), 1 - math.exp(-0.5)])


@pytest.mark.parametrize("kind, expected", [("k1", [-3.0, 2.0]), ("k2", [3.0, 2.0]), ("abs", [3.0, 2.0])])
def test_the_clamp_bounds_every_estimator(kind, expected):
    assert (
        kl_penalty(torch.tensor([[-12.0, 2.0]]), torch.zeros(1, 2), kind, clamp=3.0)[0].tolist() == expected
    )


def test_a_clamp_must_be_positive():
    with pytest.raises(ValueError, match="ppo.kl_clamp: a KL clamp must be > 0"):
        PPOConfig(kl_clamp=0.0)
