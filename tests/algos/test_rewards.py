"""Token reward pieces and their assembly for DVPO, PPO, RTO and RS-PPO, by hand."""

from __future__ import annotations

import pytest
import torch

from dvpo_lightning.algos import (
    assemble_token_rewards,
    clamp_scores,
    dpo_token_reward,
    kl_reward,
    overlong_penalty,
    penalize_unfinished,
    rs_ppo_shaping,
)

NAN = float("nan")
# One left-padded row and one right-padded row; NaN stands on every padded position.
MASK = torch.tensor([[False, True, True, True], [True, True, False, False]])
KL = torch.tensor([[NAN, 0.2, -0.1, 0.4], [0.3, 0.1, NAN, NAN]])
DPO_LOG_RATIO = torch.tensor([[NAN, 0.4, -0.2, 1.0], [0.6, -0.04, NAN, NAN]])
REF_LOGPROBS = torch.tensor([[NAN, -1.0, -2.0, -0.5], [-1.0, -3.0, NAN, NAN]])
DPO_LOGPROBS = REF_LOGPROBS + DPO_LOG_RATIO


def _close(got, expected):
    torch.testing.assert_close(got, torch.tensor(expected))


def test_kl_reward_is_minus_coefficient_times_kl():
    _close(kl_reward(KL, 0.1, MASK), [[0.0, -0.02, 0.01, -0.04], [-0.03, -0.01, 0.0, 0.0]])


def test_score_clamp_and_unfinished_penalty():
    _close(clamp_scores(torch.tensor([-12.0, 3.0, 15.0]), 10.0), [-10.0, 3.0, 10.0])
    _close(penalize_unfinished(torch.tensor([1.0, 2.0]), torch.tensor([True, False]), 0.5), [1.0, 1.5])
    with pytest.raises(ValueError, match="limit must be > 0"):
        clamp_scores(torch.zeros(2), 0.0)


def test_dpo_term_with_and_without_clip():
    _close(
        dpo_token_reward(DPO_LOGPROBS, REF_LOGPROBS, MASK, beta1=0.05),
        [[0.0, 0.02, -0.01, 0.05], [0.03, -0.002, 0.0, 0.0]],
    )
    # clip 0.05 bounds the scaled term: beta1 * (0.4, -0.2, 1.0 | 0.6, -0.04) lies inside +-0.05
    _close(
        dpo_token_reward(DPO_LOGPROBS, REF_LOGPROBS, MASK, beta1=0.05, clip=0.05),
        [[0.0, 0.02, -0.01, 0.05], [0.03, -0.002, 0.0, 0.0]],
    )


def test_dpo_term_is_scaled_first_and_clipped_second():
    """The reference code's `clamp(beta1 * log-ratio, -clip, clip)`: with beta1 = clip = 0.05 the reward
    saturates at +-0.05 once |log-ratio| > 1 (clipping the log-ratio first would cap it at +-0.0025)."""
    log_ratios = torch.tensor([[0.0, 0.5, 2.0, -3.0, 0.02]])
    reward = dpo_token_reward(
        log_ratios, torch.zeros_like(log_ratios), torch.ones_like(log_ratios), 0.05, 0.05
    )
    _close(reward, [[0.0, 0.025, 0.05, -0.05, 0.001]])


def test_beta1_zero_turns_the_dpo_term_off_without_a_dpo_model():
    off = dpo_token_reward(None, REF_LOGPROBS, MASK, beta1=0.0)
    assert off.tolist() == [[0.0] * 4, [0.0] * 4]
    with pytest.raises(ValueError, match="beta1=0.05 needs dpo_logprobs"):
        dpo_token_reward(None, REF_LOGPROBS, MASK, beta1=0.05)


def test_rs_ppo_shaping_moves_the_row_sum_to_the_last_token():
    dense = torch.tensor([[NAN, 0.1, 0.2, 0.3], [0.5, 0.25, NAN, NAN]])
    shaped = rs_ppo_shaping(dense, MASK)
    _close(shaped, [[0.0, 0.1, 0.2, -0.3], [0.5, -0.5, 0.0, 0.0]])


def test_dvpo_rewards_are_the_kl_part_only():
    _close(
        assemble_token_rewards(MASK, kl_reward(KL, 0.1, MASK)),
        [[0.0, -0.02, 0.01, -0.04], [-0.03, -0.01, 0, 0]],
    )


def test_ppo_rewards_add_the_clamped_score_at_the_last_token():
    scores = clamp_scores(torch.tensor([15.0, -2.0]), 10.0)
    rewards = assemble_token_rewards(MASK, kl_reward(KL, 0.1, MASK), scores=scores)
    _close(rewards, [[0.0, -0.02, 0.01, 9.96], [-0.03, -2.01, 0.0, 0.0]])


def test_rto_rewards_combine_dpo_term_kl_and_score():
    dense = dpo_token_reward(DPO_LOGPROBS, REF_LOGPROBS, MASK, beta1=0.05)
    rewards = assemble_token_rewards(MASK, kl_reward(KL, 0.01, MASK), dense, scores=torch.tensor([2.0, 1.0]))
    # dense (0.02, -0.01, 0.05 | 0.03, -0.002) - 0.01 * kl (0.2, -0.1, 0.4 | 0.3, 0.1), + score at the end
    _close(rewards, [[0.0, 0.018, -0.009, 2.046], [0.027, 0.997, 0.0, 0.0]])


def test_rs_ppo_total_is_score_plus_kl_part():
    dense = rs_ppo_shaping(dpo_token_reward(DPO_LOGPROBS, REF_LOGPROBS, MASK, beta1=0.05), MASK)
    kl_part = kl_reward(KL, 0.01, MASK)
    scores = torch.tensor([2.0, 1.0])
    rewards = assemble_token_rewards(MASK, kl_part, dense, scores=scores)
    torch.testing.assert_close(rewards.sum(dim=1), scores + kl_part.sum(dim=1))
    without_dense_term = assemble_token_rewards(MASK, kl_part, scores=scores)
    assert not torch.allclose(rewards, without_dense_term)  # the credit still moved between tokens


def test_assembly_checks_shapes():
    with pytest.raises(ValueError, match=r"reward term 1 has shape \(2, 3\)"):
        assemble_token_rewards(MASK, KL, KL[:, :3])


def test_overlong_penalty_falls_linearly_over_the_buffer_before_the_maximum_length():
    """DAPO: L_max = 20, L_cache = 4: free up to 16 tokens, -1/4 per token after, -factor at 20 and beyond."""
    lengths = torch.tensor([3, 16, 17, 19, 20, 25])
    assert overlong_penalty(lengths, 20, 4).tolist() == [0.0, 0.0, -0.25, -0.75, -1.0, -1.0]
    assert overlong_penalty(lengths, 20, 4, factor=0.5).tolist() == [0.0, 0.0, -0.125, -0.375, -0.5, -0.5]
    for buffer, factor in ((0, 1.0), (21, 1.0), (4, -1.0)):
        with pytest.raises(ValueError, match="0 < buffer <= max_length and factor >= 0"):
            overlong_penalty(lengths, 20, buffer, factor)
