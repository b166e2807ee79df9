"""The training losses, registered by name (`get_loss(name)`).

Every loss returns a tuple whose first element is the loss to minimise:

- per-token losses (`ppo_policy`, `value`) return `(loss, stats)`: `loss` is the scalar reduced by
  `aggregate_loss(mode, normalizers)` (pass the whole batch's `LossNormalizers` to make it
  independent of the micro-batch split and rank count), `stats` a dict of detached scalars over
  this batch's real tokens, for logging;
- pairwise losses (`dpo`, `bradley_terry`) return per-pair losses `[B]` first, then per-pair
  statistics; the caller averages (an offline stage's batch mean). `dpo` (in `preference_objective`)
  is the entry to the whole offline preference family of `preference_losses`.

The policy losses of the on-policy update (`ppo`, `gspo`, `gspo_token`, `cispo`) have their own registry,
`policy_losses.POLICY_LOSSES`; PPO's is also here as `ppo_policy`.

Gradients flow into what is being trained (new log-probs, values, policy log-probs, scores) and
never into old log-probs, reference log-probs, advantages or targets: those are detached here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dvpo_lightning.algos.advantages import td_lambda_returns
from dvpo_lightning.algos.aggregation import LossNormalizers, aggregate_loss
from dvpo_lightning.algos.kl import check_kl_loss_estimator, kl_penalty
from dvpo_lightning.algos.masked import checked_mask, last_token_mask, last_token_values, masked_mean
from dvpo_lightning.algos.policy_losses import ppo_policy_loss
from dvpo_lightning.algos.registry import Registry

LOSSES = Registry("loss")
register_loss = LOSSES.register
get_loss = LOSSES.get


register_loss("ppo_policy")(ppo_policy_loss)  # the PPO policy loss, also `POLICY_LOSSES["ppo"]`


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
    final_consistency_weight: float = 0.0,
    td_consistency_weight: float = 0.0,
    normalizers: LossNormalizers | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The Global Value Model's loss (docs/algorithms.md §4): the TD regression `value_loss(values, targets, mask)`
    on its states, plus, with `ranking_weight` w > 0, a Bradley-Terry ranking term on the complete responses' values

        L = 0.5 * mean_states (V(s) - R(s))^2  +  w * mean_pairs -log sigmoid(V_final(x, y_w) - V_final(x, y_l))

    values, targets, mask `[2B, S]` and final_values `[2B]` hold the chosen rows first, then the rejected ones (the
    GVM's pair layout). w = 0 is the paper's loss. The ranking term asks only that chosen outrank rejected, which
    the preference data says, where the TD term also asks for the terminal reward's scale.

    TCRM's per-prefix consistency terms (arXiv 2604.22981), each `0.5 * mean_states (V(s) - sg(target))^2` over the
    same states, so that every prefix's value carries the response's credit:
    `final_consistency_weight` times the term whose target is the last state's value V(s_last) (every prefix
    predicts the final value), `td_consistency_weight` times the term whose target is the next state's value
    V(s') (a TD target; s_last has itself as target). Both targets are the model's own values without gradient.

    Stats: the `value` loss's, `td_loss`, and each term in use: `ranking_loss` and `ranking_accuracy` (chosen's
    final value strictly higher), `final_consistency_loss`, `td_consistency_loss`.
    """
    weights = {
        "ranking_weight": ranking_weight,
        "final_consistency_weight": final_consistency_weight,
        "td_consistency_weight": td_consistency_weight,
    }
    for name, weight in weights.items():
        if weight < 0:
            raise ValueError(f"{name} must be >= 0; got {weight}")
    td, stats = value_loss(values, targets, mask, normalizers=normalizers)
    stats["td_loss"] = td.detach()
    loss = td
    if final_consistency_weight or td_consistency_weight:
        last = last_token_values(values.detach(), mask)  # [2B], V(s_last)
        consistency_targets = {  # [2B, S]: V(s_last) everywhere; V(s') (gamma = 1, lambda = 0), V(s_last) at s_last
            "final_consistency": (final_consistency_weight, last.unsqueeze(-1).expand_as(values)),
            "td_consistency": (td_consistency_weight, td_lambda_returns(last, values, mask, 1.0, 0.0)),
        }
        for name, (weight, consistency_target) in consistency_targets.items():
            if weight:
                term, _ = value_loss(values, consistency_target, mask, normalizers=normalizers)
                stats[f"{name}_loss"] = term.detach()
                loss = loss + weight * term
    if ranking_weight == 0:
        return loss, stats
    if final_values.shape[0] % 2:
        raise ValueError(
            f"final_values must hold chosen then rejected rows; got {final_values.shape[0]} rows"
        )
    ranking, accuracy = bradley_terry_loss(*final_values.chunk(2))
    stats["ranking_loss"], stats["ranking_accuracy"] = ranking.mean().detach(), accuracy.mean()
    return loss + ranking_weight * ranking.mean(), stats


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


def subset_return_values(values: Tensor, mask: Tensor, keep: Tensor, keep_probability: float) -> Tensor:
    """An earned value model's values `[B, T + 1]` with each complete response's value replaced by its randomized
    return decomposition (Ren et al., arXiv 2111.13485): the prompt's value plus the token rewards of a random
    subset of the response, each divided by its chance `p` of being in it.

    values `[B, T + 1]` (the earned form's running sums V(s_0)..V(s_T); the complete response's at state T_i),
    mask `[B, T]` real tokens, keep `[B, T]` the tokens drawn into the subset (each with probability p):

        V_subset = V(s_0) + sum_t keep_t * u_t / p,        u_t = V(s_{t+1}) - V(s_t)  (token t's reward)

    Its mean over subsets is the complete response's value, and its variance `(1 - p) / p * sum_t u_t^2`, so the
    squared error to a target R is, in expectation, the sum's own plus that multiple of every token reward squared:
    heaping the credit on a few tokens (the whole judgement on the last one) costs more than spreading it. RRD draws
    subsets of a fixed size; here each token is drawn on its own, which makes that expectation exact.
    """
    real = checked_mask(mask, keep=keep)
    if values.shape != (real.shape[0], real.shape[1] + 1):
        raise ValueError(f"values must have shape [B, T + 1] = {(real.shape[0], real.shape[1] + 1)}")
    if not 0 < keep_probability <= 1:
        raise ValueError(f"keep_probability must be in (0, 1]; got {keep_probability}")
    token_rewards = values[:, 1:] - values[:, :-1]  # [B, T]
    drawn = real & keep.bool()
    estimate = values[:, 0] + torch.where(drawn, token_rewards, 0).sum(dim=-1) / keep_probability  # [B]
    complete = last_token_mask(torch.cat([torch.ones_like(real[:, :1]), real], dim=-1))  # [B, T + 1]
    return torch.where(complete, estimate.unsqueeze(-1), values)
