"""Per-token rewards, built from pieces so each algorithm takes the ones it uses.

    DVPO: assemble_token_rewards(mask, kl_reward(kl, beta, mask))
    PPO:  assemble_token_rewards(mask, kl_reward(kl, beta, mask),
                                 scores=clamp_scores(penalize_unfinished(score, finished, p), 10.0))
    RTO:  assemble_token_rewards(mask, kl_reward(kl, beta2, mask),
                                 dpo_token_reward(dpo_logprobs, ref_logprobs, mask, beta1, clip),
                                 scores=beta3 * clamp_scores(penalize_unfinished(score, finished, p), 10.0))
    RS-PPO: as RTO with the DPO term passed through `rs_ppo_shaping` first.

Here `kl` is the per-token estimate of `kl_penalty(old_logprobs, ref_logprobs, kind)` (k1 in the
papers). Scores are sequence-level `[B]` and land on the last real token of each row; all
functions give 0 on padding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvpo_lightning.algos.masked import add_at_last_token, checked_mask, last_token_mask, masked_sum


def kl_reward(kl: Tensor, kl_coef: float, mask: Tensor) -> Tensor:
    """The KL penalty as a reward, `-kl_coef * kl` per token, `[B, T]`."""
    return torch.where(checked_mask(mask, kl=kl), -kl_coef * kl, 0)


def clamp_scores(scores: Tensor, limit: float) -> Tensor:
    """Scores `[B]` clipped to `[-limit, limit]` (PPO clamps the reward model's score to +-10)."""
    if limit <= 0:
        raise ValueError(f"the score clamp limit must be > 0, got {limit}")
    return scores.clamp(-limit, limit)


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's overlong reward shaping (Yu et al., arXiv 2503.14476, eq. 13): `[B]` rewards for response lengths
    `[B]`, 0 up to `max_length - buffer` tokens, then falling linearly to `-factor` at `max_length` (and staying
    there beyond it):

        R_length(y) = -factor * clamp(|y| - (max_length - buffer), 0, buffer) / buffer
    """
    if not 0 < buffer <= max_length or factor < 0:
        raise ValueError(
            f"overlong shaping needs 0 < buffer <= max_length and factor >= 0; got buffer={buffer}, "
            f"max_length={max_length}, factor={factor}"
        )
    excess = (lengths.float() - (max_length - buffer)).clamp(0, buffer)
    return -factor * excess / buffer


def penalize_unfinished(scores: Tensor, finished: Tensor, penalty: float) -> Tensor:
    """`scores - penalty` for responses that did not end with EOS (`finished [B]` bool is False)."""
    if finished.shape != scores.shape:
        raise ValueError(f"finished has shape {tuple(finished.shape)}, scores {tuple(scores.shape)}")
    return torch.where(finished.bool(), scores, scores - penalty)


def dpo_token_reward(
    dpo_logprobs: Tensor | None, ref_logprobs: Tensor, mask: Tensor, beta1: float, clip: float | None = None
) -> Tensor:
    """RTO's dense reward `clip(beta1 * (log pi_dpo(y_t) - log pi_ref(y_t)), -clip, clip)`, `[B, T]`.

    Scaled first, clipped second, as in the reference code (OpenRLHF fork, `dpo_reward_clip`): the
    clip bounds the reward itself. `beta1 = 0` turns the term off: zeros, and no DPO model is needed
    (`dpo_logprobs=None`). `clip=None` means no clipping (the paper); with the reference code's
    `beta1 = clip = 0.05` the term saturates once |log-ratio| exceeds 1.
    """
    if beta1 == 0:
        checked_mask(mask, ref_logprobs=ref_logprobs)
        return torch.zeros_like(ref_logprobs)
    if dpo_logprobs is None:
        raise ValueError(f"beta1={beta1} needs dpo_logprobs (set beta1=0 to run RTO without a DPO model)")
    real = checked_mask(mask, dpo_logprobs=dpo_logprobs, ref_logprobs=ref_logprobs)
    if clip is not None and clip <= 0:
        raise ValueError(f"the DPO reward clip must be > 0 or None, got {clip}")
    reward = beta1 * torch.where(real, dpo_logprobs - ref_logprobs, 0)
    return reward if clip is None else reward.clamp(-clip, clip)


def rs_ppo_shaping(dense_rewards: Tensor, mask: Tensor) -> Tensor:
    """RS-PPO: subtract each row's sum of `dense_rewards` at its last real token.

    The row then sums to 0, so the term only moves credit between tokens (pure reward shaping)
    and the total reward of a response is unchanged by it.
    """
    real = checked_mask(mask, dense_rewards=dense_rewards)
    row_sums = masked_sum(dense_rewards, real, dim=-1)  # [B]
    shaped = dense_rewards - torch.where(last_token_mask(real), row_sums.unsqueeze(-1), 0)
    return torch.where(real, shaped, 0)


def assemble_token_rewards(mask: Tensor, *per_token: Tensor, scores: Tensor | None = None) -> Tensor:
    """The sum of the `per_token [B, T]` reward terms plus `scores [B]` at the last real token, `[B, T]`."""
    real = mask.bool()
    total = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for index, term in enumerate(per_token):
        if term.shape != mask.shape:
            raise ValueError(f"reward term {index} has shape {tuple(term.shape)}, mask {tuple(mask.shape)}")
        total = total + torch.where(real, term, 0)
    if scores is not None:
        total = add_at_last_token(total, scores, real)
    return total
