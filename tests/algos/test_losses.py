"""PPO policy, value, DPO and Bradley-Terry losses: hand numbers, statistics and where gradients go."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dvpo_lightning.algos import (
    LOSSES,
    bradley_terry_loss,
    dpo_loss,
    get_loss,
    gvm_loss,
    kl_loss,
    loss_normalizers,
    ppo_policy_loss,
    subset_return_values,
    value_loss,
)
from tests.algos.test_layouts import layout_mask, spread

NAN = float("nan")


def _softplus(x):
    """-log sigmoid(-x) = log(1 + e^x), written out."""
    return math.log1p(math.exp(x))


def _ppo_case():
    """Ratios (1.5, 0.5, 1.5, 0.5) with advantages (1, 1, -1, -1), then one NaN padded token."""
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5), NAN]])
    old_logprobs = torch.tensor([[0.0, 0.0, 0.0, 0.0, NAN]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, NAN]])
    mask = torch.tensor([[True, True, True, True, False]])
    return logprobs.requires_grad_(True), old_logprobs, advantages, mask


def test_ppo_policy_loss_by_hand():
    logprobs, old_logprobs, advantages, mask = _ppo_case()
    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask)
    # per token: max(-1.5, -1.2) = -1.2, max(-0.5, -0.8) = -0.5, max(1.5, 1.2) = 1.5, max(0.5, 0.8) = 0.8
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    # k3 of old vs new = ratio - 1 - log ratio
    approx_kl = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2
    assert stats["approx_kl"].item() == pytest.approx(approx_kl)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["ratio_max"].item() == pytest.approx(1.5)
    loss.backward()
    # clipped tokens get no gradient; unclipped ones -A * ratio / 4; the padded one exactly 0
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, -0.125, 0.375, 0.0, 0.0]]))


def test_ppo_asymmetric_clip():
    logprobs, old_logprobs, advantages, mask = _ppo_case()
    loss, _ = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps_low=0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.5 + 0.8) / 4)


def test_ppo_dual_clip_bounds_negative_advantage_losses():
    # ratios (5, 2, 5), advantages (-1, -1, 1); c = 3: min(5, 3) = 3, 2 stays, the positive one is -1.2
    logprobs = torch.tensor([[math.log(5.0), math.log(2.0), math.log(5.0)]], requires_grad=True)
    advantages = torch.tensor([[-1.0, -1.0, 1.0]])
    loss, stats = ppo_policy_loss(logprobs, torch.zeros(1, 3), advantages, torch.ones(1, 3), dual_clip=3.0)
    assert loss.item() == pytest.approx((3.0 + 2.0 - 1.2) / 3)
    assert stats["dual_clip_fraction"].item() == pytest.approx(1 / 3)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 2.0 / 3, 0.0]]))
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        ppo_policy_loss(logprobs, torch.zeros(1, 3), advantages, torch.ones(1, 3), dual_clip=0.5)


def _value_case():
    values = torch.tensor([[1.0, 2.0, 0.0, NAN]], requires_grad=True)
    old_values = torch.tensor([[0.5, 2.5, 0.0, NAN]])
    returns = torch.tensor([[2.0, 2.0, 1.0, NAN]])
    return values, old_values, returns, torch.tensor([[True, True, True, False]])


def test_clipped_value_loss_by_hand():
    values, old_values, returns, mask = _value_case()
    loss, stats = value_loss(values, returns, mask, old_values=old_values, clip=0.2)
    # V_clip = (0.7, 2.3, 0.0): max((0.7-2)^2, (1-2)^2) = 1.69, max(0.09, 0) = 0.09, 1
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09 + 1.0) / 3)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)
    assert stats["values_mean"].item() == pytest.approx(1.0)
    loss.backward()
    # the clipped values are saturated, so only the third token moves: 0.5 * 2 * (0 - 1) / 3
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.0, -1 / 3, 0.0]]))


def test_plain_value_loss_is_the_gvm_loss():
    values, _, returns, mask = _value_case()
    loss, stats = value_loss(values, returns, mask)
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.0 + 1.0) / 3)
    assert stats["abs_error_mean"].item() == pytest.approx(2 / 3)
    assert "clip_fraction" not in stats
    with pytest.raises(ValueError, match="needs both old_values and clip"):
        value_loss(values, returns, mask, clip=0.2)


def test_value_loss_micro_batches_with_global_normalizers_sum_to_the_batch_loss():
    values, returns = torch.randn(4, 5), torch.randn(4, 5)
    mask = layout_mask([5, 2, 0, 3], 5, "interior", seed=1)
    full, _ = value_loss(values, returns, mask, mode="seq-mean-token-mean")
    normalizers = loss_normalizers([mask[:1], mask[1:]])
    parts = [
        value_loss(
            values[rows], returns[rows], mask[rows], mode="seq-mean-token-mean", normalizers=normalizers
        )[0]
        for rows in (slice(0, 1), slice(1, 4))
    ]
    torch.testing.assert_close(sum(parts), full)


def test_gvm_loss_without_ranking_is_the_value_loss():
    values, _, returns, mask = _value_case()
    loss, stats = gvm_loss(values, returns, mask, torch.zeros(1))
    assert loss.item() == pytest.approx(value_loss(values, returns, mask)[0].item())
    assert "ranking_loss" not in stats


def test_gvm_ranking_term_by_hand():
    """Two pairs, final values chosen (1, 0) and rejected (0, 1): ranking losses softplus(-1) and softplus(1)."""
    values = torch.tensor([[0.0], [0.0], [0.0], [0.0]], requires_grad=True)
    targets = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])
    final = torch.tensor([1.0, 0.0, 0.0, 1.0], requires_grad=True)
    loss, stats = gvm_loss(values, targets, torch.ones(4, 1, dtype=torch.bool), final, ranking_weight=0.5)
    ranking = (_softplus(-1.0) + _softplus(1.0)) / 2
    assert stats["td_loss"].item() == pytest.approx(0.5)  # 0.5 * mean of four squared errors of 1
    assert stats["ranking_loss"].item() == pytest.approx(ranking)
    assert stats["ranking_accuracy"].item() == 0.5
    assert loss.item() == pytest.approx(0.5 + 0.5 * ranking)
    loss.backward()
    # d/d(V_w - V_l) of -log sigmoid(d) is -sigmoid(-d), halved by the pair mean and weighted by 0.5
    first = 0.25 * torch.sigmoid(torch.tensor(-1.0)).item()
    second = 0.25 * torch.sigmoid(torch.tensor(1.0)).item()
    torch.testing.assert_close(final.grad, torch.tensor([-first, -second, first, second]))


def test_gvm_consistency_terms_by_hand_with_interior_padding():
    """States V = (1, 2, 4) with a NaN padded slot inside, targets 0: TD loss 0.5 * (1 + 4 + 16) / 3 = 3.5.
    Every prefix towards V_last = 4: 0.5 * (9 + 4 + 0) / 3 = 13/6. Each towards the next: 0.5 * (1 + 4 + 0) / 3 = 5/6.
    The targets carry no gradient: d/dV = V/3 + (V - 4)/3 + 2 * (V - V_next)/3 = (-4/3, -4/3, 4/3)."""
    values = torch.tensor([[1.0, NAN, 2.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True, True]])
    loss, stats = gvm_loss(
        values,
        torch.zeros(1, 4),
        mask,
        torch.zeros(1),
        final_consistency_weight=1.0,
        td_consistency_weight=2.0,
    )
    assert stats["td_loss"].item() == pytest.approx(3.5)
    assert stats["final_consistency_loss"].item() == pytest.approx(13 / 6)
    assert stats["td_consistency_loss"].item() == pytest.approx(5 / 6)
    assert loss.item() == pytest.approx(3.5 + 13 / 6 + 2 * 5 / 6)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[-4 / 3, 0.0, -4 / 3, 4 / 3]]))


@pytest.mark.parametrize("weight", ["ranking_weight", "final_consistency_weight", "td_consistency_weight"])
def test_gvm_loss_refuses_a_negative_weight(weight):
    values, _, returns, mask = _value_case()
    with pytest.raises(ValueError, match=f"{weight} must be >= 0"):
        gvm_loss(values, returns, mask, torch.zeros(2), **{weight: -1.0})


def test_subset_return_values_by_hand():
    """Earned sums: row 0's rewards u = (2, -1, 4) after a prompt value of 1 (complete response V(s_3) = 6), row 1's
    u = (5) after -2 (V(s_1) = 3, then padding). Only each complete response's value changes."""
    values = torch.tensor([[1.0, 3.0, 2.0, 6.0], [-2.0, 3.0, 9.0, 9.0]])  # [B, T + 1]
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    keep = torch.tensor([[1, 0, 1], [0, 1, 1]])  # row 1 draws only padding: its sum is the prompt's value
    estimate = subset_return_values(values, mask, keep, 0.5)
    expected = torch.tensor([[1.0, 3.0, 2.0, 1 + (2 + 4) / 0.5], [-2.0, -2.0, 9.0, 9.0]])
    torch.testing.assert_close(estimate, expected)
    torch.testing.assert_close(subset_return_values(values, mask, torch.ones_like(mask), 1.0), values)


def test_subset_return_loss_is_the_sums_plus_a_penalty_on_every_token_reward_in_expectation():
    """Over all 2^3 subsets, weighted by their chance: E[(V_subset - R)^2] = (V_final - R)^2 + (1 - p) / p * sum u^2."""
    values = torch.tensor([[1.0, 3.0, 2.0, 6.0]])
    mask, target, p = torch.ones(1, 3), 2.0, 0.3
    expected_loss = 0.0
    for drawn in itertools.product((0, 1), repeat=3):
        chance = math.prod(p if kept else 1 - p for kept in drawn)
        final = subset_return_values(values, mask, torch.tensor([drawn]), p)[0, -1]
        expected_loss += chance * (final.item() - target) ** 2
    assert expected_loss == pytest.approx((6 - target) ** 2 + (1 - p) / p * (2**2 + 1**2 + 4**2))


@pytest.mark.parametrize(
    "values, probability, message",
    [
        (torch.zeros(1, 3), 0.5, r"values must have shape \[B, T \+ 1\]"),
        (torch.zeros(1, 4), 0.0, r"in \(0, 1\]"),
    ],
)
def test_subset_return_values_refuses_bad_inputs(values, probability, message):
    with pytest.raises(ValueError, match=message):
        subset_return_values(values, torch.ones(1, 3), torch.ones(1, 3), probability)


def test_dpo_sigmoid_ipo_and_label_smoothing_by_hand():
    # pair 0: chosen log-ratio -1 - (-2) = 1, rejected -3 - (-2) = -1, h = 2
    # pair 1: chosen log-ratio -2 - (-1) = -1, rejected -1 - (-1) = 0, h = -1
    policy_chosen, policy_rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    ref_chosen, ref_rejected = torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -1.0])
    args = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)

    losses, chosen_rewards, rejected_rewards = dpo_loss(*args, beta=0.1)
    assert losses.tolist() == pytest.approx([_softplus(-0.2), _softplus(0.1)])
    assert chosen_rewards.tolist() == pytest.approx([0.1, -0.1])
    assert rejected_rewards.tolist() == pytest.approx([-0.1, 0.0])

    smoothed, _, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.1)
    expected = [0.9 * _softplus(-0.2) + 0.1 * _softplus(0.2), 0.9 * _softplus(0.1) + 0.1 * _softplus(-0.1)]
    assert smoothed.tolist() == pytest.approx(expected)

    ipo, _, _ = dpo_loss(*args, beta=0.1, loss_type="ipo")  # (h - 1 / 0.2)^2
    assert ipo.tolist() == pytest.approx([(2 - 5) ** 2, (-1 - 5) ** 2])


def test_dpo_bad_arguments():
    pair = (torch.zeros(1),) * 4
    with pytest.raises(ValueError, match="unknown preference loss 'hnge'"):
        dpo_loss(*pair, beta=0.1, loss_type="hnge")
    with pytest.raises(ValueError, match=r"label_smoothing=0.1 is read by none of loss_type \['ipo'\]"):
        dpo_loss(*pair, beta=0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(*pair, beta=0.0)


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    losses, accuracies = bradley_terry_loss(chosen, rejected)
    assert losses.tolist() == pytest.approx([_softplus(-1.0), _softplus(1.0)])
    assert accuracies.tolist() == [1.0, 0.0]
    with_margin, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.5, 0.5]))
    assert with_margin.tolist() == pytest.approx([_softplus(-0.5), _softplus(1.5)])


# For each registered loss: a call with small inputs, which inputs are trained, which are not.
# A new loss must add its case here (test_every_loss_has_a_case).
def _loss_cases():
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    mask = layout_mask([4, 2, 3], 4, "interior", seed=2)
    return {
        "ppo_policy": (
            dict(logprobs=rand(3, 4) - 2, old_logprobs=rand(3, 4) - 2, advantages=rand(3, 4), mask=mask),
            ["logprobs"],
            ["old_logprobs", "advantages"],
        ),
        "kl": (
            dict(logprobs=rand(3, 4) - 2, ref_logprobs=rand(3, 4) - 2, mask=mask, kl_coef=0.1),
            ["logprobs"],
            ["ref_logprobs"],
        ),
        "value": (
            dict(values=rand(3, 4), returns=rand(3, 4), mask=mask, old_values=rand(3, 4), clip=0.2),
            ["values"],
            ["returns", "old_values"],
        ),
        "gvm": (
            dict(
                values=rand(4, 4),
                targets=rand(4, 4),
                mask=mask[[0, 1, 2, 0]],
                final_values=rand(4),
                ranking_weight=1.0,
            ),
            ["values", "final_values"],
            ["targets"],
        ),
        "dpo": (
            dict(
                policy_chosen_logps=rand(3),
                policy_rejected_logps=rand(3),
                ref_chosen_logps=rand(3),
                ref_rejected_logps=rand(3),
                beta=0.1,
            ),
            ["policy_chosen_logps", "policy_rejected_logps"],
            ["ref_chosen_logps", "ref_rejected_logps"],
        ),
        "bradley_terry": (
            dict(chosen_scores=rand(3), rejected_scores=rand(3)),
            ["chosen_scores", "rejected_scores"],
            [],
        ),
    }


def test_every_loss_has_a_case():
    assert set(LOSSES) == set(_loss_cases())


@pytest.mark.parametrize("name", sorted(_loss_cases()))
def test_every_loss_sends_gradients_only_into_what_is_trained(name):
    kwargs, trained, frozen = _loss_cases()[name]
    for key in trained + frozen:
        kwargs[key] = kwargs[key].clone().requires_grad_(True)
    loss = get_loss(name)(**kwargs)[0]
    loss.sum().backward()
    for key in trained:
        assert kwargs[key].grad is not None and kwargs[key].grad.abs().sum() > 0, key
    for key in frozen:
        assert kwargs[key].grad is None, key


@pytest.mark.parametrize("name", ["ppo_policy", "value"])
def test_per_token_losses_ignore_nan_padding_and_layout(name):
    """The same real tokens right-, left- and interior-padded (NaN on padding) give the same loss."""
    kwargs, trained, _ = _loss_cases()[name]
    lengths = kwargs["mask"].sum(dim=1).tolist()
    per_token = [key for key, value in kwargs.items() if key != "mask" and isinstance(value, torch.Tensor)]
    results = {}
    for layout in ("right", "left", "interior"):
        mask = layout_mask(lengths, 4, layout, seed=3)
        call = dict(kwargs, mask=mask, **{key: spread(kwargs[key], mask) for key in per_token})
        for key in trained:
            call[key].requires_grad_(True)
        loss, stats = get_loss(name)(**call)
        loss.backward()
        for key in trained:
            assert torch.isfinite(call[key].grad).all() and (call[key].grad[~mask] == 0).all()
        results[layout] = (loss, stats)
    for layout in ("left", "interior"):
        torch.testing.assert_close(results[layout][0], results["right"][0])
        for key, value in results["right"][1].items():
            torch.testing.assert_close(results[layout][1][key], value)


def test_unknown_loss_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown loss 'kto'; known: bradley_terry, dpo, gvm, kl, ppo_policy, value"
    ):
        get_loss("kto")


def test_kl_loss_is_the_coefficient_times_the_mean_k3_estimate():
    """pi = 1/2, pi_ref = 1/4 on every real token: log-ratio ln 2, k3 = 1/2 - 1 + ln 2."""
    mask = torch.tensor([[True, True, False]])
    logprobs = torch.full((1, 3), math.log(0.5))
    ref_logprobs = torch.tensor([[math.log(0.25), math.log(0.25), float("nan")]])
    loss, stats = kl_loss(logprobs, ref_logprobs, mask, kl_coef=0.1)
    k3 = 0.5 - 1 + math.log(2)
    assert loss.item() == pytest.approx(0.1 * k3)
    assert stats["kl_mean"].item() == pytest.approx(k3)
