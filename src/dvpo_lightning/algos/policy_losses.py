"""The policy losses of the on-policy update, registered by name (`get_policy_loss(name)`, verl's `loss_mode`).

Every policy loss is called the same way, with keyword arguments:

    loss, stats = get_policy_loss(name)(
        logprobs=..., old_logprobs=..., advantages=..., mask=..., mode=..., normalizers=..., **options)

- `logprobs [B, T]` carry the gradient; `old_logprobs` (the rollout's) and `advantages` are detached here;
- `mode` and `normalizers` reduce the per-token loss to the scalar (`aggregate_loss`, docs/algorithms.md §8);
- its other keyword parameters are its options: the shared clip settings `clip_eps_low`, `clip_eps_high`,
  `dual_clip` (PPO's `ppo.clip_eps`, `ppo.clip_eps_high`, `ppo.dual_clip`) where the loss declares them, and its
  own (`ppo.policy_loss_options`).

It returns `(loss, stats)`: the scalar to minimise and detached statistics over the real tokens, at least
`approx_kl` (the k3 estimate of KL(old || new), which `ppo.target_kl` reads), `clip_fraction`, `ratio_mean` and
`ratio_max`. Padding never changes a number: its ratio is 1 and its advantage 0. A new policy loss is one function
decorated with `@register_policy_loss("name")` following this convention; `ppo.policy_loss: name` chooses it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvpo_lightning.algos.aggregation import LossNormalizers, aggregate_loss
from dvpo_lightning.algos.kl import kl_penalty
from dvpo_lightning.algos.masked import checked_mask, masked_mean
from dvpo_lightning.algos.registry import Registry

POLICY_LOSSES = Registry("policy loss")
register_policy_loss = POLICY_LOSSES.register
get_policy_loss = POLICY_LOSSES.get

#: the arguments every policy loss takes; its other keyword parameters are its options.
POLICY_LOSS_INPUTS = ("logprobs", "old_logprobs", "advantages", "mask", "mode", "normalizers")


@register_policy_loss("ppo")
def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    mode: str = "token-mean",
    normalizers: LossNormalizers | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, per token `-min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)`.

    `rho = exp(logprobs - old_logprobs)`, all `[B, T]`. `clip_eps_high=None` uses `clip_eps_low`; DAPO's
    clip-higher is `clip_eps_low=0.2, clip_eps_high=0.28`. `dual_clip = c > 1` (Ye et al. 2020) also bounds the
    loss of a negative-advantage token by `-c * A`, so a ratio far above 1 cannot make it arbitrarily large.

    Stats: `clip_fraction` (tokens where the clipped term is the one used), `approx_kl`, `ratio_mean`,
    `ratio_max`, and `dual_clip_fraction` with `dual_clip`.
    """
    high = _clip_range(clip_eps_low, clip_eps_high)
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    real, old_logprobs, advantages, log_ratio = _prepared(logprobs, old_logprobs, advantages, mask)
    ratio = torch.exp(log_ratio)
    loss_mat, clipped = _clipped_surrogate(ratio, advantages, clip_eps_low, high)
    stats = {"clip_fraction": masked_mean(clipped.float(), real)}
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual_clipped = (advantages < 0) & (loss_mat > bound)
        loss_mat = torch.where(dual_clipped, bound, loss_mat)
        stats["dual_clip_fraction"] = masked_mean(dual_clipped.float(), real)
    loss = aggregate_loss(loss_mat, real, mode, normalizers)
    return loss, {**stats, **_ratio_stats(ratio, old_logprobs, logprobs, real)}


@register_policy_loss("gspo")
def gspo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps_low: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
    mode: str = "token-mean",
    normalizers: LossNormalizers | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al., arXiv 2507.18071): PPO's clipped surrogate on one importance ratio per sequence,

        s_i = exp( mean_t (logprobs_it - old_logprobs_it) )      (the geometric mean of the token ratios)
        L_it = -min(s_i * A_it, clip(s_i, 1 - eps_low, 1 + eps_high) * A_it)

    so a whole response is clipped or not. The paper's ranges are 3e-4 and 4e-4 (a sequence ratio moves far less
    than a token's) and its aggregation the per-sequence mean (`mode="grpo"`); TRL's `importance_sampling_level=
    "sequence"`. Stats as `ppo`'s, the ratio being the sequence's (counted on each of its tokens).
    """
    return _sequence_ratio_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_eps_low,
        clip_eps_high,
        mode,
        normalizers,
        per_token=False,
    )


@register_policy_loss("gspo_token")
def gspo_token_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps_low: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
    mode: str = "token-mean",
    normalizers: LossNormalizers | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token (arXiv 2507.18071, section 4.3): the ratio of token t is `s_it = sg[s_i] * pi(y_t) / sg[pi(y_t)]`.

    Its value is the sequence ratio `s_i` (so clipping is `gspo`'s), its gradient that of token t's own
    log-probability scaled by `s_i`: a per-token advantage then reaches each token alone. With one advantage per
    sequence its gradient equals `gspo`'s (a test checks it). Stats as `gspo`'s.
    """
    return _sequence_ratio_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        clip_eps_low,
        clip_eps_high,
        mode,
        normalizers,
        per_token=True,
    )


@register_policy_loss("cispo")
def cispo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    max_weight: float = 5.0,
    min_weight: float | None = None,
    mode: str = "token-mean",
    normalizers: LossNormalizers | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): REINFORCE weighted by clipped, stop-gradient importance weights,

        L_it = -sg[ clip(rho_it, min_weight, max_weight) ] * A_it * logprobs_it

    Every token keeps its gradient `-w * A * grad log pi` (PPO's clip zeroes it outside the trust region); only the
    weight is bounded. `max_weight` is the paper's `1 + eps_high` and TRL's `epsilon_high` for `cispo` (5.0, the
    ScaleRL value TRL recommends); `min_weight=None` is no lower bound, as the paper sets it.

    Stats: `clip_fraction` (tokens whose weight was clipped), `approx_kl`, `ratio_mean`, `ratio_max`.
    """
    if max_weight <= 0 or (min_weight is not None and not 0 <= min_weight < max_weight):
        raise ValueError(
            f"need 0 <= min_weight < max_weight; got min_weight={min_weight}, max_weight={max_weight}"
        )
    real, old_logprobs, advantages, log_ratio = _prepared(logprobs, old_logprobs, advantages, mask)
    ratio = torch.exp(log_ratio)
    weight = ratio.detach().clamp(min=min_weight, max=max_weight)
    loss_mat = -weight * advantages * torch.where(real, logprobs, 0)
    loss = aggregate_loss(loss_mat, real, mode, normalizers)
    clipped = (weight != ratio.detach()).float()
    return loss, {
        "clip_fraction": masked_mean(clipped, real),
        **_ratio_stats(ratio, old_logprobs, logprobs, real),
    }


def _sequence_ratio_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps_low: float,
    clip_eps_high: float | None,
    mode: str,
    normalizers: LossNormalizers | None,
    per_token: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    high = _clip_range(clip_eps_low, clip_eps_high)
    real, old_logprobs, advantages, log_ratio = _prepared(logprobs, old_logprobs, advantages, mask)
    sequence_log_ratio = masked_mean(log_ratio, real, dim=-1).unsqueeze(-1)  # [B, 1]
    if per_token:
        own = torch.where(real, logprobs, 0)
        log_weight = sequence_log_ratio.detach() + own - own.detach()  # [B, T], value log s_i
    else:
        log_weight = sequence_log_ratio.expand_as(log_ratio)  # [B, T]
    ratio = torch.exp(log_weight)
    loss_mat, clipped = _clipped_surrogate(ratio, advantages, clip_eps_low, high)
    loss = aggregate_loss(loss_mat, real, mode, normalizers)
    return loss, {
        "clip_fraction": masked_mean(clipped.float(), real),
        **_ratio_stats(ratio, old_logprobs, logprobs, real),
    }


def _clip_range(clip_eps_low: float, clip_eps_high: float | None) -> float:
    """The upper clip range (`clip_eps_high`, else `clip_eps_low`), after checking both are >= 0."""
    high = clip_eps_low if clip_eps_high is None else clip_eps_high
    if clip_eps_low < 0 or high < 0:
        raise ValueError(f"clip ranges must be >= 0, got clip_eps_low={clip_eps_low}, clip_eps_high={high}")
    return high


def _prepared(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The bool mask, the detached old log-probs and advantages (0 on padding) and the log-ratio (0 on padding)."""
    real = checked_mask(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    old_logprobs = torch.where(real, old_logprobs.detach(), 0)
    advantages = torch.where(real, advantages.detach(), 0)
    log_ratio = torch.where(real, logprobs - old_logprobs, 0)  # padding: ratio 1, advantage 0
    return real, old_logprobs, advantages, log_ratio


def _clipped_surrogate(ratio: Tensor, advantages: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """PPO's `max(-A * ratio, -A * clip(ratio, 1 - low, 1 + high))` `[B, T]`, and where the clipped term is used."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - low, 1 + high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def _ratio_stats(ratio: Tensor, old_logprobs: Tensor, logprobs: Tensor, real: Tensor) -> dict[str, Tensor]:
    ratio = ratio.detach()
    return {
        "approx_kl": masked_mean(kl_penalty(old_logprobs, logprobs.detach(), "k3", real), real),
        "ratio_mean": masked_mean(ratio, real),
        "ratio_max": torch.where(real, ratio, -torch.inf).amax(),
    }
