"""Advantage estimators and TD(lambda) targets: hand numbers, plain-loop references, padding layouts."""

from __future__ import annotations

import pytest
import torch

from dvpo_lightning.algos import (
    ADVANTAGE_ESTIMATORS,
    advantages_are_normalized,
    earned_values,
    gae,
    get_advantage,
    register_advantage,
    td_lambda_returns,
)
from tests.algos.test_layouts import compact, layout_mask, spread

NAN = float("nan")
LENGTHS = [5, 1, 3, 0, 7]  # one empty row, one full row
LENGTH = 7
PADDED_LAYOUTS = ("right", "left", "interior")


def _random_rows(seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(len(LENGTHS), LENGTH, generator=generator)


def _discounted_sums(deltas, discount):
    """sum_{k >= t} discount^(k - t) * deltas[k] for every t, written out."""
    return [sum(discount ** (k - t) * deltas[k] for k in range(t, len(deltas))) for t in range(len(deltas))]


def _reference_gae(rewards, values, gamma, lam):
    """GAE of one unpadded row as the sum of discounted TD errors (V after the last token = 0)."""
    next_values = values[1:] + [0.0]
    deltas = [r + gamma * nv - v for r, v, nv in zip(rewards, values, next_values)]
    advantages = _discounted_sums(deltas, gamma * lam)
    return advantages, [a + v for a, v in zip(advantages, values)]


def _reference_td_lambda(terminal, values, gamma, lam):
    """R_last = terminal reward; R_t = gamma * ((1 - lam) * V_{t+1} + lam * R_{t+1}), written out."""
    returns = [0.0] * len(values)
    for t in reversed(range(len(values))):
        last = t == len(values) - 1
        returns[t] = terminal if last else gamma * ((1 - lam) * values[t + 1] + lam * returns[t + 1])
    return returns


def _assert_rows_close(tensor, mask, expected_rows):
    for got, expected in zip(compact(tensor, mask), expected_rows):
        torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), atol=1e-5, rtol=1e-5)
    assert (tensor[~mask] == 0).all()


def test_gae_by_hand_with_interior_padding():
    # delta = (0.1, 0.1, 0.3); A_2 = 0.3, A_1 = 0.1 + 0.5 * 0.3 = 0.25, A_0 = 0.1 + 0.5 * 0.25 = 0.225
    mask = torch.tensor([[True, False, True, True, False]])
    rewards = torch.tensor([[0.0, NAN, 0.0, 1.0, NAN]])
    values = torch.tensor([[0.5, NAN, 0.6, 0.7, NAN]])
    advantages, returns = gae(rewards, values, mask, 1.0, 0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.225, 0.0, 0.25, 0.3, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.725, 0.0, 0.85, 1.0, 0.0]]))


def test_gae_discount_by_hand():
    # V = 0, lam = 1: A_1 = 2, A_0 = 1 + 0.5 * 2 = 2
    advantages, _ = gae(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 2), 0.5, 1.0)
    assert advantages.tolist() == [[2.0, 2.0]]


def test_a_perfect_critic_gives_zero_advantages():
    """V(s_t) is the return from *before* token t: with the terminal score 1, every V(s_t) = 1."""
    advantages, returns = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.ones(1, 3), torch.ones(1, 3), 1.0, 0.95)
    assert advantages.tolist() == [[0.0, 0.0, 0.0]]
    assert returns.tolist() == [[1.0, 1.0, 1.0]]


@pytest.mark.parametrize("layout", PADDED_LAYOUTS)
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.7), (1.0, 1.0)])
def test_gae_matches_the_reference_in_every_layout(layout, gamma, lam):
    rewards, values = _random_rows(1), _random_rows(2)
    mask = layout_mask(LENGTHS, LENGTH, layout, seed=4)
    advantages, returns = gae(spread(rewards, mask), spread(values, mask), mask, gamma, lam)
    references = [
        _reference_gae(rewards[row, :n].tolist(), values[row, :n].tolist(), gamma, lam)
        for row, n in enumerate(LENGTHS)
    ]
    _assert_rows_close(advantages, mask, [reference[0] for reference in references])
    _assert_rows_close(returns, mask, [reference[1] for reference in references])


@pytest.mark.parametrize("layout", PADDED_LAYOUTS)
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5)])
def test_td_lambda_returns_match_the_reference_in_every_layout(layout, gamma, lam):
    terminal, values = _random_rows(3)[:, 0], _random_rows(4)
    mask = layout_mask(LENGTHS, LENGTH, layout, seed=5)
    returns = td_lambda_returns(terminal, spread(values, mask), mask, gamma, lam)
    expected = [
        _reference_td_lambda(terminal[row].item(), values[row, :n].tolist(), gamma, lam)
        for row, n in enumerate(LENGTHS)
    ]
    _assert_rows_close(returns, mask, expected)


def test_td_lambda_returns_by_hand():
    # Last state: 1. Before it: 1 * (0.5 * 0.2 + 0.5 * 1) = 0.6. First: 0.5 * 0.4 + 0.5 * 0.6 = 0.5.
    returns = td_lambda_returns(
        torch.tensor([1.0]), torch.tensor([[0.0, 0.4, 0.2]]), torch.ones(1, 3), 1.0, 0.5
    )
    torch.testing.assert_close(returns, torch.tensor([[0.5, 0.6, 1.0]]))


def test_td_lambda_with_lambda_one_is_the_terminal_reward_everywhere():
    terminal = torch.tensor([1.0, -1.0])
    mask = layout_mask([3, 2], 4, "interior", seed=6)
    returns = td_lambda_returns(terminal, spread(torch.randn(2, 4), mask), mask, 1.0, 1.0)
    _assert_rows_close(returns, mask, [[1.0] * 3, [-1.0] * 2])


def test_td_lambda_targets_carry_no_gradient():
    values = torch.randn(2, 3, requires_grad=True)
    returns = td_lambda_returns(torch.tensor([1.0, -1.0]), values, torch.ones(2, 3), 1.0, 0.95)
    assert not returns.requires_grad


def _gvm(rewards, values, mask, final_values, bootstrap, gamma, lam):
    return get_advantage("gvm")(
        token_rewards=rewards,
        values=values,
        mask=mask,
        gamma=gamma,
        lam=lam,
        final_values=final_values,
        bootstrap=bootstrap,
    )


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gvm_bootstraps_differ_by_the_discounted_final_value(gamma, lam):
    rewards, values, final_values = _random_rows(5), _random_rows(6), _random_rows(7)[:, 0]
    mask = layout_mask(LENGTHS, LENGTH, "interior", seed=7)
    rewards, values = spread(rewards, mask), spread(values, mask)
    principled, principled_returns = _gvm(rewards, values, mask, final_values, "final_value", gamma, lam)
    reference, reference_returns = _gvm(rewards, values, mask, final_values, "zero", gamma, lam)
    real_tokens_after = mask.sum(dim=1, keepdim=True) - mask.long().cumsum(dim=1)  # [B, T]
    # the final value is the value of the state after the last token: one discounted step away from it
    expected = torch.where(mask, gamma * final_values.unsqueeze(1) * (gamma * lam) ** real_tokens_after, 0)
    torch.testing.assert_close(principled - reference, expected)
    torch.testing.assert_close(principled_returns - reference_returns, expected)


def test_gvm_with_gamma_and_lambda_one_is_final_value_minus_value_plus_rewards_to_go():
    rewards, values, final_values = _random_rows(8), _random_rows(9), _random_rows(10)[:, 0]
    mask = layout_mask(LENGTHS, LENGTH, "interior", seed=8)
    advantages, _ = _gvm(
        spread(rewards, mask), spread(values, mask), mask, final_values, "final_value", 1.0, 1.0
    )
    expected = [
        [final_values[row].item() - values[row, t].item() + rewards[row, t:n].sum().item() for t in range(n)]
        for row, n in enumerate(LENGTHS)
    ]
    _assert_rows_close(advantages, mask, expected)


def test_gvm_final_value_bootstrap_discounts_it_by_one_step():
    """gamma = 0.9, lam = 1, V(s_0) = 0.5, V(s_1) = 0.2, V_final = 1, no token reward:
    delta_1 = 0.9 * 1 - 0.2 = 0.7, delta_0 = 0.9 * 0.2 - 0.5 = -0.32, A = (-0.32 + 0.9 * 0.7, 0.7)."""
    advantages, returns = _gvm(
        torch.zeros(1, 2),
        torch.tensor([[0.5, 0.2]]),
        torch.ones(1, 2),
        torch.tensor([1.0]),
        "final_value",
        0.9,
        1.0,
    )
    torch.testing.assert_close(advantages, torch.tensor([[0.31, 0.7]]))
    torch.testing.assert_close(returns, torch.tensor([[0.81, 0.9]]))


@pytest.mark.parametrize("gamma, lam", [(0.9, 0.8), (0.9, 1.0), (1.0, 0.95)])
def test_dvpo_returns_are_the_gvms_training_targets_on_the_same_values(gamma, lam):
    """The GVM is trained on the states s_0..s_T and the complete response, with the terminal reward after the
    latter (`td_lambda_returns`); DVPO's `final_value` bootstrap must read its values the same way. On the GVM's own values
    and with the final value as the terminal reward, DVPO's returns equal the GVM's targets on s_0..s_{T-1}."""
    mask = layout_mask(LENGTHS, LENGTH, "right", seed=9)  # [B, T]
    values = spread(_random_rows(11), mask)  # [B, T], V(s_t)
    final = _random_rows(12)[:, 0]  # [B], the complete response's value
    lengths = mask.sum(-1)
    states = torch.cat([values, torch.zeros(len(LENGTHS), 1)], dim=1)  # [B, T + 1]
    states[torch.arange(len(LENGTHS)), lengths] = final
    state_mask = torch.cat([mask, torch.zeros(len(LENGTHS), 1, dtype=torch.bool)], dim=1)
    state_mask[torch.arange(len(LENGTHS)), lengths] = True
    targets = td_lambda_returns(final, states, state_mask, gamma, lam)[:, :LENGTH]
    _, returns = _gvm(torch.zeros_like(values), values, mask, final, "final_value", gamma, lam)
    torch.testing.assert_close(returns, torch.where(mask, targets, 0))


def test_gvm_with_a_perfect_gvm_gives_zero_advantages_only_with_the_final_value_bootstrap():
    """Every prefix and the full response are worth 1: no token is better than expected."""
    ones, zeros = torch.ones(1, 3), torch.zeros(1, 3)
    principled, _ = _gvm(zeros, ones, ones, torch.tensor([1.0]), "final_value", 1.0, 0.5)
    reference, _ = _gvm(zeros, ones, ones, torch.tensor([1.0]), "zero", 1.0, 0.5)
    assert principled.tolist() == [[0.0, 0.0, 0.0]]
    # "zero": delta = (0, 0, -1), so A = (-0.25, -0.5, -1): the good ending is penalised
    assert reference.tolist() == [[-0.25, -0.5, -1.0]]


# ------------------------------------------------------------------ decoupled lambdas, whitened GVM values
@pytest.mark.parametrize("name", ["gae", "gvm"])
def test_value_lam_sets_the_returns_lambda_apart_from_the_advantages(name):
    """V = (0.5, 0.6), rewards (0, 1), gamma = 1, "gvm" bootstrapping from V_final = 0 (the same TD errors):
    deltas (0.1, 0.4); advantages with lam = 0: (0.1, 0.4); returns with value_lam = 1: (1, 1)."""
    rewards, values, mask = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.6]]), torch.ones(1, 2)
    gvm_inputs = {"final_values": torch.zeros(1)} if name == "gvm" else {}
    advantages, returns = get_advantage(name)(
        token_rewards=rewards, values=values, mask=mask, gamma=1.0, lam=0.0, value_lam=1.0, **gvm_inputs
    )
    torch.testing.assert_close(advantages, torch.tensor([[0.1, 0.4]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0]]))


def test_length_adaptive_lambda_is_one_minus_one_over_alpha_times_the_length():
    """alpha = 0.5: a 4-token response gets lambda 1 - 1/2 = 0.5, a 2-token one 1 - 1/1 = 0, a 1-token one
    1 - 1/0.5 < 0, clamped to 0. V = 0 and a reward of 1 on the last token: A_t = lambda^(T - t); the returns keep
    `lam` = 1: 1 everywhere."""
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 0, 1], [1, 0, 0, 0]]).bool()
    rewards = torch.zeros(3, 4).masked_fill(
        torch.tensor([[0, 0, 0, 1], [0, 0, 0, 1], [1, 0, 0, 0]]).bool(), 1.0
    )
    advantages, returns = get_advantage("gae")(
        token_rewards=rewards,
        values=torch.zeros(3, 4),
        mask=mask,
        gamma=1.0,
        lam=1.0,
        length_adaptive_alpha=0.5,
    )
    expected = torch.tensor([[0.125, 0.25, 0.5, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, mask.float())
    with pytest.raises(ValueError, match="length_adaptive_alpha must be > 0"):
        get_advantage("gae")(
            token_rewards=rewards, values=rewards, mask=mask, gamma=1.0, lam=1.0, length_adaptive_alpha=0.0
        )


@pytest.mark.parametrize(
    "bootstrap, expected", [("zero", [[1.0, -1.0], [0.0, 0.0]]), ("final_value", [[4.0, 2.0], [0.0, 0.0]])]
)
def test_whitened_gvm_values_share_one_affine_map_with_the_final_values(bootstrap, expected):
    """Real V(s_t) = 1, 3 | 2 (a padded NaN): mean 2, unbiased std 1, so V -> (-1, 1 | 0), and V_final (5 | 2) ->
    (3 | 0) by the same map. gamma = lam = 1, no reward: A_t = V_after_last - V(s_t), V_after_last 0 or V_final."""
    values, mask = torch.tensor([[1.0, 3.0], [2.0, NAN]]), torch.tensor([[True, True], [True, False]])
    advantages, _ = get_advantage("gvm")(
        token_rewards=torch.zeros(2, 2),
        values=values,
        mask=mask,
        gamma=1.0,
        lam=1.0,
        final_values=torch.tensor([5.0, 2.0]),
        bootstrap=bootstrap,
        whiten_values=True,
    )
    torch.testing.assert_close(advantages, torch.tensor(expected))


def test_earned_values_by_hand_with_interior_padding():
    # token rewards (1, -0.5, 0.25): earned before each token (0, 1, 0.5), in all 0.75
    mask = torch.tensor([[True, False, True, True]])
    values, final = earned_values(torch.tensor([[1.0, NAN, -0.5, 0.25]]), mask)
    assert values.tolist() == [[0.0, 0.0, 1.0, 0.5]]
    assert final.tolist() == [0.75]


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_gvm_on_earned_values_is_the_lambda_discounted_return_to_go_of_the_token_rewards(lam):
    """The oracle critic: its TD errors are the token rewards, so DVPO's advantage is their (gamma * lam)-return."""
    gold, kl = _random_rows(13), _random_rows(14)
    mask = layout_mask(LENGTHS, LENGTH, "interior", seed=13)
    values, final = earned_values(spread(gold, mask), mask)
    advantages, _ = _gvm(spread(kl, mask), values, mask, final, "final_value", 1.0, lam)
    expected = [
        _discounted_sums((gold[row, :n] + kl[row, :n]).tolist(), lam) for row, n in enumerate(LENGTHS)
    ]
    _assert_rows_close(advantages, mask, expected)


def test_reinforce_is_the_discounted_return_to_go():
    # G = (1 + 0.5 * 0 + 0.25 * 2, 0 + 0.5 * 2, 2)
    rewards = torch.tensor([[1.0, NAN, 0.0, 2.0]])
    mask = torch.tensor([[True, False, True, True]])
    advantages, returns = get_advantage("reinforce")(
        token_rewards=rewards, values=None, mask=mask, gamma=0.5, lam=1.0
    )
    assert advantages.tolist() == returns.tolist() == [[1.5, 0.0, 1.0, 2.0]]


def test_rloo_by_hand():
    """TRL's form: sequence rewards (1, 3 | 2, 2), leave-one-out baselines (3, 1 | 2, 2), one advantage per
    response."""
    rewards = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, NAN], [1.0, 1.0]])
    mask = ~torch.isnan(rewards)
    advantages, returns = get_advantage("rloo")(
        token_rewards=rewards, values=None, mask=mask, gamma=1.0, lam=1.0, group_size=2
    )
    assert returns.tolist() == [[1.0, 1.0], [3.0, 3.0], [2.0, 0.0], [2.0, 2.0]]
    assert advantages.tolist() == [[-2.0, -2.0], [2.0, 2.0], [0.0, 0.0], [0.0, 0.0]]


def test_rloo_openrlhf_form_baselines_the_score_alone_and_keeps_the_return_to_go():
    """Scores (1, 3 | 2, 1): baselines (3, 1 | 1, 2); return-to-go (1, 0 | 3, 3 | 2 | 2, 1)."""
    rewards = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, NAN], [1.0, 1.0]])
    mask = ~torch.isnan(rewards)
    advantages, returns = get_advantage("rloo")(
        token_rewards=rewards,
        values=None,
        mask=mask,
        gamma=1.0,
        lam=1.0,
        group_size=2,
        scores=torch.tensor([1.0, 3.0, 2.0, 1.0]),
        form="openrlhf",
    )
    assert returns.tolist() == [[1.0, 0.0], [3.0, 3.0], [2.0, 0.0], [2.0, 1.0]]
    assert advantages.tolist() == [[-2.0, -3.0], [2.0, 2.0], [1.0, 0.0], [0.0, -1.0]]
    with pytest.raises(ValueError, match="openrlhf form baselines the sequence scores"):
        get_advantage("rloo")(
            token_rewards=rewards, values=None, mask=mask, gamma=1.0, lam=1.0, group_size=2, form="openrlhf"
        )


# Two groups of three: sequence rewards (1, 2, 3 | 2, 2, 2), rows of 2, 1, 2 | 1, 1, 2 real tokens.
GROUP_REWARDS = torch.tensor([[0.0, 1.0], [2.0, NAN], [3.0, 0.0], [2.0, NAN], [2.0, NAN], [1.0, 1.0]])
GROUP_MASK = ~torch.isnan(GROUP_REWARDS)


def _rows(tensor: torch.Tensor) -> list[list[float]]:
    return [[round(value, 4) for value in row] for row in tensor.tolist()]  # eps = 1e-6 moves the 6th digit


def test_grpo_by_hand():
    """Group 1: mean 2, sample std 1, so (-1, 0, 1) / (1 + eps); group 2: no spread, every advantage 0."""
    advantages, returns = get_advantage("grpo")(
        token_rewards=GROUP_REWARDS, values=None, mask=GROUP_MASK, gamma=1.0, lam=1.0, group_size=3
    )
    assert _rows(advantages) == [[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    assert returns.tolist() == [[1.0, 1.0], [2.0, 0.0], [3.0, 3.0], [2.0, 0.0], [2.0, 0.0], [2.0, 2.0]]


def test_dr_grpo_does_not_divide_by_the_groups_spread():
    rewards = GROUP_REWARDS * 4  # group 1: (4, 8, 12), mean 8, std 4
    advantages, _ = get_advantage("grpo")(
        token_rewards=rewards,
        values=None,
        mask=GROUP_MASK,
        gamma=1.0,
        lam=1.0,
        group_size=3,
        scale_by_std=False,
    )
    assert _rows(advantages)[:3] == [[-4.0, -4.0], [0.0, 0.0], [4.0, 4.0]]
    scaled, _ = get_advantage("grpo")(
        token_rewards=rewards, values=None, mask=GROUP_MASK, gamma=1.0, lam=1.0, group_size=3
    )
    assert _rows(scaled)[:3] == [[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]


def test_reinforce_group_baseline_subtracts_the_groups_mean_reward_from_the_return_to_go():
    """Return-to-go (1, 1 | 2 | 3, 0 || 2 | 2 | 2, 1) less the group means 2 and 2."""
    advantages, returns = get_advantage("reinforce")(
        token_rewards=GROUP_REWARDS,
        values=None,
        mask=GROUP_MASK,
        gamma=1.0,
        lam=1.0,
        group_size=3,
        group_baseline=True,
    )
    assert returns.tolist() == [[1.0, 1.0], [2.0, 0.0], [3.0, 0.0], [2.0, 0.0], [2.0, 0.0], [2.0, 1.0]]
    assert advantages.tolist() == [[-1.0, -1.0], [0.0, 0.0], [1.0, -2.0], [0.0, 0.0], [0.0, 0.0], [0.0, -1.0]]


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_group_estimators_refuse_a_discount_that_would_make_outcome_rewards_depend_on_length(name):
    with pytest.raises(ValueError, match=f"{name} compares whole responses' rewards.*set ppo.gamma: 1.0"):
        get_advantage(name)(
            token_rewards=GROUP_REWARDS, values=None, mask=GROUP_MASK, gamma=0.9, lam=1.0, group_size=3
        )


def test_group_estimators_declare_their_advantages_normalised():
    normalized = {name for name in ADVANTAGE_ESTIMATORS if advantages_are_normalized(get_advantage(name))}
    assert normalized == {"grpo", "rloo"}


# Keyword arguments each registered estimator needs besides the common ones; a new estimator must add
# its case here (test_every_estimator_has_a_case) so the properties below are checked for it.
CRITIC_FREE = {"reinforce", "rloo", "grpo"}
EXTRA_KEYWORDS = {
    "gae": {},
    "gvm": {"final_values": torch.tensor([0.5, -1.0, 2.0, 0.3, 1.5, 0.7])},
    "reinforce": {"group_size": 3, "group_baseline": True},
    "rloo": {"group_size": 3},
    "grpo": {"group_size": 3},
}
CASE_LENGTHS = [5, 1, 3, 0, 6, 2]


def _call(name, rewards, values, mask, gamma=1.0, lam=0.95, **options):
    return get_advantage(name)(
        token_rewards=rewards,
        values=None if name in CRITIC_FREE else values,
        mask=mask,
        gamma=gamma,
        lam=lam,
        **EXTRA_KEYWORDS[name],
        **options,
    )


def test_every_estimator_has_a_case():
    assert set(ADVANTAGE_ESTIMATORS) == set(EXTRA_KEYWORDS)


@pytest.mark.parametrize("name", sorted(EXTRA_KEYWORDS))
def test_every_estimator_gives_the_same_numbers_in_every_layout(name):
    rewards, values = torch.randn(6, 6), torch.randn(6, 6)
    outputs = {}
    for layout in ("right", "left", "interior"):
        mask = layout_mask(CASE_LENGTHS, 6, layout, seed=10)
        advantages, returns = _call(name, spread(rewards, mask), spread(values, mask), mask)
        assert torch.isfinite(advantages).all() and torch.isfinite(returns).all()  # NaN padding did not leak
        assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()
        outputs[layout] = (compact(advantages, mask), compact(returns, mask))
    for layout in ("left", "interior"):
        for got, expected in zip(outputs[layout], outputs["right"]):
            for got_row, expected_row in zip(got, expected):
                torch.testing.assert_close(got_row, expected_row)


@pytest.mark.parametrize(
    "name, options",
    [
        ("gae", {"value_lam": 1.0, "length_adaptive_alpha": 0.5}),
        ("gvm", {"whiten_values": True, "value_lam": 0.5, "length_adaptive_alpha": 0.3}),
    ],
)
def test_the_lambda_and_whitening_options_give_the_same_numbers_in_every_layout(name, options):
    rewards, values = torch.randn(6, 6), torch.randn(6, 6)
    outputs = {}
    for layout in ("right", "left", "interior"):
        mask = layout_mask(CASE_LENGTHS, 6, layout, seed=11)
        got = _call(name, spread(rewards, mask), spread(values, mask), mask, **options)
        outputs[layout] = [compact(tensor, mask) for tensor in got]
    for layout in ("left", "interior"):
        for got, expected in zip(outputs[layout], outputs["right"]):
            for got_row, expected_row in zip(got, expected):
                torch.testing.assert_close(got_row, expected_row)


@pytest.mark.parametrize("name", sorted(EXTRA_KEYWORDS))
def test_every_estimator_without_padding_matches_right_padding(name):
    rewards, values = torch.randn(6, 4), torch.randn(6, 4)
    full = torch.ones(6, 4, dtype=torch.bool)
    padded_mask = torch.cat([full, torch.zeros(6, 2, dtype=torch.bool)], dim=1)
    unpadded = _call(name, rewards, values, full)
    padded = _call(name, spread(rewards, padded_mask), spread(values, padded_mask), padded_mask)
    for got, expected in zip(padded, unpadded):
        torch.testing.assert_close(got[:, :4], expected)


@pytest.mark.parametrize("name", sorted(EXTRA_KEYWORDS))
def test_every_estimator_returns_detached_tensors(name):
    rewards = torch.randn(6, 4, requires_grad=True)
    values = torch.randn(6, 4, requires_grad=True)
    advantages, returns = _call(name, rewards, values, torch.ones(6, 4))
    assert not advantages.requires_grad and not returns.requires_grad


def test_estimators_refuse_missing_or_unused_values():
    rewards, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="'gae' needs values"):
        get_advantage("gae")(token_rewards=rewards, values=None, mask=mask, gamma=1.0, lam=0.95)
    with pytest.raises(ValueError, match="'reinforce' uses no critic"):
        get_advantage("reinforce")(token_rewards=rewards, values=rewards, mask=mask, gamma=1.0, lam=0.95)


def test_bad_arguments_are_clear_errors():
    rewards, mask = torch.zeros(4, 3), torch.ones(4, 3)
    with pytest.raises(
        ValueError, match="group_size >= 2 responses per prompt dividing the batch size 4 .* got 3"
    ):
        get_advantage("rloo")(token_rewards=rewards, values=None, mask=mask, gamma=1.0, lam=1.0, group_size=3)
    with pytest.raises(ValueError, match="unknown bootstrap 'last'"):
        _gvm(rewards, rewards, mask, torch.zeros(4), "last", 1.0, 0.95)
    with pytest.raises(ValueError, match="gamma and lam must lie in"):
        gae(rewards, rewards, mask, 1.5, 0.95)
    with pytest.raises(ValueError, match="values has shape"):
        gae(rewards, rewards[:, :2], mask, 1.0, 0.95)


def test_unknown_estimator_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown advantage estimator 'vtrace'; known: gae, grpo, gvm, reinforce, rloo"
    ):
        get_advantage("vtrace")


def test_a_newly_registered_estimator_is_callable_by_name():
    @register_advantage("one_step_td")
    def one_step_td(*, token_rewards, values, mask, gamma, lam):
        """lam = 0 GAE: the TD error alone."""
        return gae(token_rewards, values, mask, gamma, 0.0)

    try:
        advantages, _ = get_advantage("one_step_td")(
            token_rewards=torch.tensor([[0.0, 1.0]]),
            values=torch.tensor([[0.5, 0.25]]),
            mask=torch.ones(1, 2),
            gamma=1.0,
            lam=0.95,
        )
        assert advantages.tolist() == [[-0.25, 0.75]]
        with pytest.raises(ValueError, match="already registered"):
            register_advantage("one_step_td")(one_step_td)
    finally:
        ADVANTAGE_ESTIMATORS.unregister("one_step_td")
    assert "one_step_td" not in ADVANTAGE_ESTIMATORS
