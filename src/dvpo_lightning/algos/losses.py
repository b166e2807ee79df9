"""The training losses, registered by name (`get_loss(name)`).

Every loss returns a tuple whose first element is the loss to minimise:

- per-token losses (`ppo_policy`, `value`) return `(loss, stats)`: `loss` is the scalar reduced by
  `aggregate_loss(mode, normalizers)` (pass the whole batch's `LossNormalizers` to make it
  independent of the micro-batch split and rank count), `stats` a dict of detached scalars over
  this batch's real tokens, for logging;
- pairwise losses (`dpo`, `bradley_terry`) return per-pair losses `[B]` first, then per-pair
  statistics; the caller averages (an offline stage's batch mean). `dpo` (in `preference_objective`)
  is the entry to the whole offline preference family of `preference_losses`.

Gradients flow into what is being trained (new log-probs, values, policy log-probs, scores) and
never into old log-probs, reference log-probs, advantages or targets: those are detached here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dvpo_lightning.algos.aggregation import LossNormalizers, aggregate_loss
from dvpo_lightning.algos.kl import check_kl_loss_estimator, kl_penalty
from dvpo_lightning.algos.masked import checked_mask, masked_mean
from dvpo_lightning.algos.registry import Registry

LOSSES = Registry("loss")
register_loss = LOSSES.register
get_loss = LOSSES.get


@register_loss("ppo_policy")
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

    `rho = exp(logprobs - old_logprobs)`, all `[B, T]`. `clip_eps_high=None` uses `clip_eps_low`.
    `dual_clip = c > 1` (Ye et al. 2020) also bounds the loss of a negative-advantage token by
    `-c * A`, so a ratio far above 1 cannot make it arbitrarily large.

    Stats: `clip_fraction` (tokens where the clipped term is the one used), `approx_kl`
    (k3 estimate of KL(old || new)), `ratio_mean`, `ratio_max`, and `dual_clip_fraction` with
    `dual_clip`.
    """
    high = clip_eps_low if clip_eps_high is None else clip_eps_high
    if clip_eps_low < 0 or high < 0:
        raise ValueError(f"clip ranges must be >= 0, got clip_eps_low={clip_eps_low}, clip_eps_high={high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    real = checked_mask(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    old_logprobs = torch.where(real, old_logprobs.detach(), 0)
    advantages = torch.where(real, advantages.detach(), 0)
    log_ratio = torch.where(real, logprobs - old_logprobs, 0)  # padding: ratio 1, advantage 0

    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps_low, 1 + high)
    loss_mat = torch.maximum(unclipped, clipped)
    stats = {"clip_fraction": masked_mean((clipped > unclipped).float(), real)}
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual_clipped = (advantages < 0) & (loss_mat > bound)
        loss_mat = torch.where(dual_clipped, bound, loss_mat)
        stats["dual_clip_fraction"] = masked_mean(dual_clipped.float(), real)

    loss = aggregate_loss(loss_mat, real, mode, normalizers)
    ratio = ratio.detach()
    stats["approx_kl"] = masked_mean(kl_penalty(old_logprobs, logprobs.detach(), "k3", real), real)
    stats["ratio_mean"] = masked_mean(ratio, real)
    stats["ratio_max"] = torch.where(real, ratio, -torch.inf).amax()
    return loss, stats


@register_loss("value")
def value_loss(
    values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    old_values: Tensor | None = None,
    clip: float | None = None,
    mode: str = "token-mean",
    normalizers: LossNormalizers | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Regression of values on returns, per token `0.5 * (V - R)^2`, all `[B, T]`.

    With `clip` (PPO's critic), `0.5 * max((V_clip - R)^2, (V - R)^2)` where
    `V_clip = old_values + clip(V - old_values, -clip, clip)` keeps the critic near the values of
    the rollout. Without it (`clip=None`, no `old_values`), this is the GVM's loss
    `0.5 * masked mean (V - R)^2`.

    Stats: `clip_fraction` (with `clip`; tokens where the clipped error is the one used),
    `values_mean`, `abs_error_mean` (mean |V - R|).
    """
    if (old_values is None) != (clip is None):
        raise ValueError("value clipping needs both old_values and clip (or neither)")
    real = checked_mask(mask, values=values, returns=returns)
    returns = torch.where(real, returns.detach(), 0)
    values = torch.where(real, values, 0)
    loss_mat = (values - returns) ** 2
    stats = {}
    if clip is not None:
        old_values = torch.where(checked_mask(mask, old_values=old_values), old_values.detach(), 0)
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        clipped_loss_mat = (clipped_values - returns) ** 2
        stats["clip_fraction"] = masked_mean((clipped_loss_mat > loss_mat).float(), real)
        loss_mat = torch.maximum(loss_mat, clipped_loss_mat)

    loss = 0.5 * aggregate_loss(loss_mat, real, mode, normalizers)
    stats["values_mean"] = masked_mean(values.detach(), real)
    stats["abs_error_mean"] = masked_mean((values.detach() - returns).abs(), real)
    return loss, stats


@register_loss("gvm")
def gvm_loss(
    values: Tensor,
    targets: Tensor,
    mask: Tensor,
    final_values: Tensor,
    *,
    ranking_weight: float = 0.0,
    normalizers: LossNormalizers | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The Global Value Model's loss (docs/algorithms.md §4): the TD regression `value_loss(values, targets, mask)`
    on its states, plus, with `ranking_weight` w > 0, a Bradley-Terry ranking term on the complete responses' values

        L = 0.5 * mean_states (V(s) - R(s))^2  +  w * mean_pairs -log sigmoid(V_final(x, y_w) - V_final(x, y_l))

    values, targets, mask `[2B, S]` and final_values `[2B]` hold the chosen rows first, then the rejected ones (the
    GVM's pair layout). w = 0 is the paper's loss. The ranking term asks only that chosen outrank rejected, which
    the preference data says, where the TD term also asks for the terminal reward's scale.

    Stats: the `value` loss's, `td_loss`, and with w > 0 `ranking_loss` and `ranking_accuracy` (chosen's final
    value strictly higher).
    """
    if ranking_weight < 0:
        raise ValueError(f"ranking_weight must be >= 0; got {ranking_weight}")
    td, stats = value_loss(values, targets, mask, normalizers=normalizers)
    stats["td_loss"] = td.detach()
    if ranking_weight == 0:
        return td, stats
    if final_values.shape[0] % 2:
        raise ValueError(
            f"final_values must hold chosen then rejected rows; got {final_values.shape[0]} rows"
        )
    ranking, accuracy = bradley_terry_loss(*final_values.chunk(2))
    stats["ranking_loss"], stats["ranking_accuracy"] = ranking.mean().detach(), accuracy.mean()
    return td + ranking_weight * ranking.mean(), stats


@register_loss("kl")
def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kl_coef: float,
    estimator: str = "k3",
    mode: str = "token-mean",
    normalizers: LossNormalizers | None = None,
    clamp: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The KL to the reference as a loss term, `kl_coef * kl_t` per token (GRPO puts it here, k3, rather than in the
    reward); `logprobs` carry the gradient, `ref_logprobs` are detached. All `[B, T]`. `estimator` is k2 or k3
    (`check_kl_loss_estimator`), each estimate within [-clamp, clamp] when `clamp` is given.

    Stats: `kl_mean`, the mean per-token estimate over real tokens.
    """
    check_kl_loss_estimator(estimator)
    real = checked_mask(mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    kl = kl_penalty(logprobs, ref_logprobs.detach(), estimator, real, clamp)
    loss = kl_coef * aggregate_loss(kl, real, mode, normalizers)
    return loss, {"kl_mean": masked_mean(kl.detach(), real)}


@register_loss("bradley_terry")
def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None
) -> tuple[Tensor, Tensor]:
    """Reward-model loss `-log sigmoid(r_chosen - r_rejected - margin)` per pair, scores `[B]`.

    `margin` (a number or `[B]`, e.g. Llama 2's preference strength) asks the chosen score to win
    by at least that much. Returns `(losses [B], accuracies [B])`, accuracy 1.0 where the chosen
    score is strictly higher (without the margin).
    """
    if chosen_scores.shape != rejected_scores.shape:
        raise ValueError(
            f"chosen_scores {tuple(chosen_scores.shape)} and rejected_scores {tuple(rejected_scores.shape)} differ"
        )
    difference = chosen_scores - rejected_scores
    losses = -F.logsigmoid(difference if margin is None else difference - margin)
    return losses, (difference.detach() > 0).float()
