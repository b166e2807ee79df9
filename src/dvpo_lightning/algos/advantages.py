"""Advantage estimators, and the TD(lambda) targets that train the Global Value Model.

Alignment: `values[:, t]` is V(s_t), the value of the state *before* token t, and
`token_rewards[:, t]` is the reward for emitting token t. The value after the last real token is 0:
a reward for the whole response (a score, a terminal value) is placed on the last real token.

Every estimator is registered under a name and called the same way, with keyword arguments only:

    advantages, returns = get_advantage(name)(
        token_rewards=..., values=..., mask=..., gamma=..., lam=..., **estimator_specific)

- `token_rewards [B, T]`, `mask [B, T]`: the per-token rewards and the real response tokens;
- `values [B, T] | None`: the critic's V(s_t); estimators with a critic require it, the critic-free
  ones (`reinforce`, `rloo`, `grpo`) require `None`, so a misconfiguration is an error, not a silent
  no-op;
- `gamma`, `lam`: discount and GAE lambda (the critic-free estimators take `lam` for the uniform
  call but have no use for it: lambda interpolates between critic values they do not have);
- the rollout's other facts, taken by the estimators that declare them (`ROLLOUT_INPUTS`):
  `final_values [B]` (the value of each complete response; `gvm`), `group_size` (responses per
  prompt, consecutive rows; `rloo`, `grpo`, `reinforce`) and `scores [B] | None` (the sequence score
  placed at the last token, without the KL and dense terms; `rloo`'s OpenRLHF form);
- the estimator's own options, from the config (`gvm`'s `bootstrap`, `grpo`'s `scale_by_std`, ...).

Each returns `(advantages [B, T], returns [B, T])`, detached (nothing here is differentiated), 0 on
padding. The recursions skip padded positions without breaking the chain, so left, right, interior
or no padding give the same numbers on the real tokens. A new estimator is one function decorated
with `@register_advantage("name")` following this convention; a config then chooses it by name.
An estimator whose advantages are already normalised within each group (`grpo`, `rloo`) says so with
`@normalized_advantages`: the batch whitening (`ppo.whiten_advantages`) is then off unless asked for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dvpo_lightning.algos.masked import (
    add_at_last_token,
    checked_mask,
    masked_count,
    masked_moments,
    masked_sum,
)
from dvpo_lightning.algos.registry import F, Registry

ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
register_advantage = ADVANTAGE_ESTIMATORS.register
get_advantage = ADVANTAGE_ESTIMATORS.get

GVM_BOOTSTRAPS = ("final_value", "zero")
RLOO_FORMS = ("trl", "openrlhf")
#: keyword arguments an estimator may declare to receive the rollout's facts beyond its rewards and values.
ROLLOUT_INPUTS = ("final_values", "group_size", "scores")


def normalized_advantages(estimator: F) -> F:
    """Declares that `estimator`'s advantages are already normalised within each group, so that whitening them
    over the batch is off unless the config asks for it (`advantages_are_normalized`)."""
    estimator.advantages_are_normalized = True
    return estimator


def advantages_are_normalized(estimator: Callable) -> bool:
    """Whether `estimator` declared its advantages normalised (`normalized_advantages`)."""
    return getattr(estimator, "advantages_are_normalized", False)


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the real tokens of each row.

    Backwards over the real tokens t of a row, with t' the next real token (none after the last):

        delta_t = r_t + gamma * V(s_t') - V(s_t)      (V after the last real token = 0)
        A_t     = delta_t + gamma * lam * A_t'        (A after the last real token = 0)

    and `returns = A + V` on real tokens: the lambda-returns, the critic's regression targets.
    `lam` is one lambda or one per row (`[B]`, the length-adaptive lambda of `policy_lambdas`).
    rewards, values, mask `[B, T]` -> (advantages, returns) `[B, T]`, detached, 0 on padding,
    computed in float32 at least (a bf16 critic's values are upcast before the long sums).
    """
    check_discounts(gamma, lam)
    real = checked_mask(mask, rewards=rewards, values=values)
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    rewards = torch.where(real, rewards.detach().to(dtype), 0)
    values = torch.where(real, values.detach().to(dtype), 0)

    next_value = torch.zeros_like(values[:, 0])  # [B], V of the next real state
    next_advantage = torch.zeros_like(values[:, 0])  # [B], A of the next real token
    advantages = torch.zeros_like(values)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage  # lam: a float or [B]
        is_real = real[:, t]
        advantages[:, t] = torch.where(is_real, advantage, 0)
        next_value = torch.where(is_real, values[:, t], next_value)  # padding: carry over
        next_advantage = torch.where(is_real, advantage, next_advantage)
    returns = torch.where(real, advantages + values, 0)
    return advantages, returns


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Return-to-go `G_t = sum_{k >= t} gamma^(k - t) r_k` over real tokens, `[B, T]`, 0 on padding."""
    advantages, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0)
    return advantages  # with V = 0 and lambda = 1, A_t is the return-to-go


def td_lambda_returns(
    terminal_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> Tensor:
    """TD(lambda) targets on a chain of states whose only reward comes after the last real one.

    terminal_rewards `[B]`, values `[B, S]` (detached here: no gradient through targets),
    mask `[B, S]` -> returns `[B, S]`, 0 on padding. The last real state's target is exactly its
    terminal reward; an earlier state s gets `gamma * ((1 - lam) * V(s') + lam * R(s'))` from the
    next real state s'. `lam = 1` (and `gamma = 1`) gives the terminal reward at every state.

    The GVM module calls it on the `T + 1` states s_1..s_T and the complete response (the value
    model's `[B, R + 1]` output, see docs/design.md "Value alignment"), so the complete response is
    trained towards the terminal reward itself and earlier prefixes towards lambda-returns.
    """
    if terminal_rewards.shape != values.shape[:1]:
        raise ValueError(
            f"terminal_rewards must have shape [B] = {tuple(values.shape[:1])}, "
            f"got {tuple(terminal_rewards.shape)}"
        )
    rewards = add_at_last_token(torch.zeros_like(values), terminal_rewards.detach(), mask)
    _, returns = gae(rewards, values, mask, gamma, lam)
    return returns


def earned_values(token_rewards: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The values of an oracle that knows every token's reward and expects no more: what each prefix has earned.

    token_rewards, mask `[B, T]` -> (values `[B, T]`, 0 on padding; final_values `[B]`):

        V(s_t)  = sum_{k < t} r_k         (0 before the first token)
        V_final = sum_k r_k               (the complete response's reward)

    In DVPO's convention a value is the expected terminal reward of the whole response (docs/algorithms.md §4),
    so these are the values of a critic that has seen the token rewards. With gamma = 1 their TD errors
    `V(s_t') - V(s_t)` (`V_final` after the last token) are exactly the token rewards, and the `gvm` estimator on
    them gives the lambda-discounted return-to-go of those rewards: dense credit assignment with no value error.
    """
    real = checked_mask(mask, token_rewards=token_rewards)
    rewards = torch.where(real, token_rewards.detach().float(), 0)
    earned_through = rewards.cumsum(dim=-1)  # [B, T], rewards up to and including token t
    return torch.where(real, earned_through - rewards, 0), rewards.sum(dim=-1)


@register_advantage("gae")
def gae_advantages(
    *,
    token_rewards: Tensor,
    values: Tensor | None,
    mask: Tensor,
    gamma: float,
    lam: float,
    value_lam: float | None = None,
    length_adaptive_alpha: float | None = None,
) -> tuple[Tensor, Tensor]:
    """GAE with a critic's values (PPO, RTO); see `gae`. The lambdas of the advantages and of the returns can be
    decoupled (`decoupled_gae`)."""
    _require_values("gae", values)
    return decoupled_gae(token_rewards, values, mask, gamma, lam, value_lam, length_adaptive_alpha)


@register_advantage("gvm")
def gvm_advantages(
    *,
    token_rewards: Tensor,
    values: Tensor | None,
    mask: Tensor,
    gamma: float,
    lam: float,
    final_values: Tensor,
    bootstrap: str = "final_value",
    whiten_values: bool = False,
    value_lam: float | None = None,
    length_adaptive_alpha: float | None = None,
) -> tuple[Tensor, Tensor]:
    """DVPO: GAE on the frozen Global Value Model's values.

    `final_values [B]` is the GVM's value of the complete response, V(x, y_<=T): the state after the
    last token. With `bootstrap="final_value"` (default) it is that state's value, one discounted step after
    the last token, exactly as the GVM was trained (`td_lambda_returns` on s_1..s_T and the complete
    response): the last real token's TD error is `delta_T = r_T + gamma * V_final - V(s_T)`. With
    `bootstrap="zero"` (the reference code) the value after the last token is 0:
    `delta_T = r_T - V(s_T)`, which penalises every good ending by its own value. The two differ by
    exactly `gamma * V_final * (gamma * lam)^(number of real tokens after t)` at real token t. With
    gamma = lam = 1, "gvm" gives `A_t = V_final - V(s_t) + sum_{k >= t} r_k`.

    `whiten_values=True` (the reference code's `whiten(values)`) first maps every value to `(V - mean) / std`,
    the mean and (unbiased) standard deviation of V(s_t) over the real tokens of the whole batch (all ranks);
    `V_final` goes through the same map, so that it keeps its place on the values' scale (the returns are then on
    that scale too: no critic is trained on them in DVPO). `value_lam` and
    `length_adaptive_alpha` decouple the lambdas (`decoupled_gae`).
    """
    _require_values("gvm", values)
    if bootstrap not in GVM_BOOTSTRAPS:
        raise ValueError(f"unknown bootstrap {bootstrap!r}; known: {', '.join(GVM_BOOTSTRAPS)}")
    if final_values.shape != token_rewards.shape[:1]:
        raise ValueError(f"final_values must have shape [B], got {tuple(final_values.shape)}")
    if whiten_values:
        values, final_values = _whitened_values(values, final_values, mask)
    if bootstrap == "final_value":
        # V_final bootstraps the step after the last token: a reward of gamma * V_final on it is the same TD error
        token_rewards = add_at_last_token(token_rewards, gamma * final_values.detach(), mask)
    return decoupled_gae(token_rewards, values, mask, gamma, lam, value_lam, length_adaptive_alpha)


def decoupled_gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
    value_lam: float | None = None,
    length_adaptive_alpha: float | None = None,
) -> tuple[Tensor, Tensor]:
    """`gae` with the policy's lambda and the critic's apart (VAPO, arXiv 2504.05118; NeMo-RL's `gae_lambda_policy`,
    `gae_lambda_value`, `length_adaptive_alpha`): the advantages use `lam`, or with `length_adaptive_alpha` the
    per-response `policy_lambdas`; the returns (the critic's targets) use `value_lam` (None: `lam`).
    Neither option given, this is `gae(rewards, values, mask, gamma, lam)`."""
    if length_adaptive_alpha is None and value_lam in (None, lam):
        return gae(rewards, values, mask, gamma, lam)
    policy_lam = lam if length_adaptive_alpha is None else policy_lambdas(mask, length_adaptive_alpha)
    advantages, _ = gae(rewards, values, mask, gamma, policy_lam)
    _, returns = gae(rewards, values, mask, gamma, lam if value_lam is None else value_lam)
    return advantages, returns


def policy_lambdas(mask: Tensor, alpha: float) -> Tensor:
    """VAPO's length-adaptive lambda of each response, `[B]`: `1 - 1 / (alpha * l)` with `l` its number of real
    tokens, clamped to [0, 1] (a response of at most `1 / alpha` tokens gets 0: one-step TD errors)."""
    if alpha <= 0:
        raise ValueError(f"length_adaptive_alpha must be > 0; got {alpha}")
    lengths = masked_count(checked_mask(mask), dim=-1).float()  # [B]
    return (1 - 1 / (alpha * lengths.clamp(min=1))).clamp(0.0, 1.0)


def _whitened_values(values: Tensor, final_values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """values `[B, T]` and final_values `[B]` through the one affine map that whitens V(s_t) over the real tokens
    of every rank; padding stays 0."""
    real = checked_mask(mask, values=values)
    values = values.detach().float()
    mean, var = masked_moments(values, real, distributed=True)
    scale = torch.rsqrt(var + 1e-8)
    return torch.where(real, (values - mean) * scale, 0), (final_values.detach().float() - mean) * scale


@register_advantage("reinforce")
def reinforce_advantages(
    *,
    token_rewards: Tensor,
    values: Tensor | None,
    mask: Tensor,
    gamma: float,
    lam: float,
    group_size: int = 1,
    group_baseline: bool = False,
) -> tuple[Tensor, Tensor]:
    """No critic: the advantage is the discounted return-to-go `G_t` (returns are `G_t` too).

    REINFORCE++ (Hu 2025) is this estimator with the KL penalty in the token rewards and the
    advantages whitened over the whole global batch (`whiten_advantages`). `group_baseline=True` is its
    "baseline" variant: each response's return-to-go less the mean sequence reward of its group of
    `group_size` consecutive samples of one prompt (itself included), before whitening.
    """
    _require_no_values("reinforce", values)
    check_discounts(gamma, lam)
    returns = discounted_returns(token_rewards, mask, gamma)
    if not group_baseline:
        return returns, returns
    real = checked_mask(mask, token_rewards=token_rewards)
    groups = _sequence_rewards(token_rewards, real, gamma).view(
        -1, _group_size(group_size, real, "reinforce")
    )
    baselines = groups.mean(dim=-1, keepdim=True).expand_as(groups).reshape(-1)  # [B]
    return torch.where(real, returns - baselines.unsqueeze(-1), 0), returns


@normalized_advantages
@register_advantage("rloo")
def rloo_advantages(
    *,
    token_rewards: Tensor,
    values: Tensor | None,
    mask: Tensor,
    gamma: float,
    lam: float,
    group_size: int,
    scores: Tensor | None = None,
    form: str = "trl",
) -> tuple[Tensor, Tensor]:
    """REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024); no critic.

    The batch is made of groups of `group_size` consecutive samples of the same prompt; sample i's baseline is
    the mean over the *other* samples of its group, which does not depend on its own actions, so the estimate
    stays unbiased. Two forms:

    - `"trl"` (default; TRL's `RLOOTrainer`, the paper): `R_i` is the sum of response i's token rewards (its
      score less its KL penalty, when the KL is in the reward); every token gets `A_i = R_i - mean_{j != i} R_j`,
      and returns are `R_i`;
    - `"openrlhf"` (OpenRLHF's `rloo`): the baseline is the other samples' mean *score* only, the KL staying per
      token: `A_t = G_t - mean_{j != i} score_j` with `G_t` the return-to-go of the token rewards (returns).

    Outcome rewards are not discounted: gamma must be 1.
    """
    _require_no_values("rloo", values)
    check_discounts(gamma, lam)
    if form not in RLOO_FORMS:
        raise ValueError(f"unknown rloo form {form!r}; known: {', '.join(RLOO_FORMS)}")
    real = checked_mask(mask, token_rewards=token_rewards)
    groups = _outcome_groups("rloo", token_rewards, real, gamma, group_size)  # [B / k, k]
    if form == "trl":
        advantages = torch.where(real, (groups.reshape(-1) - _others_mean(groups)).unsqueeze(-1), 0)
        return advantages, torch.where(real, groups.reshape(-1, 1), 0)
    if scores is None:
        raise ValueError("rloo's openrlhf form baselines the sequence scores, and this algorithm has none")
    baselines = _others_mean(scores.detach().float().view(groups.shape))  # [B]
    returns = discounted_returns(token_rewards, real, gamma)  # [B, T]
    return torch.where(real, returns - baselines.unsqueeze(-1), 0), returns


@normalized_advantages
@register_advantage("grpo")
def grpo_advantages(
    *,
    token_rewards: Tensor,
    values: Tensor | None,
    mask: Tensor,
    gamma: float,
    lam: float,
    group_size: int,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """GRPO (Shao et al. 2024): every token of response i gets `(r_i - mean(r)) / (std(r) + eps)` over its group.

    The batch is made of groups of `group_size` consecutive samples of one prompt; `r_i` is the sum of sample
    i's token rewards (the score, plus the KL penalty when the KL is in the reward; not discounted: gamma must be
    1). `std` is the group's sample standard deviation (n - 1), as in the paper's code. `scale_by_std=False` is
    Dr. GRPO (Liu et al. 2025), which drops the division (it favours groups whose rewards barely differ). Returns
    are `r_i` on every real token.
    """
    _require_no_values("grpo", values)
    check_discounts(gamma, lam)
    real = checked_mask(mask, token_rewards=token_rewards)
    groups = _outcome_groups("grpo", token_rewards, real, gamma, group_size)
    centred = groups - groups.mean(dim=-1, keepdim=True)  # [B / k, k]
    if scale_by_std:
        centred = centred / (groups.std(dim=-1, keepdim=True) + eps)
    advantages = torch.where(real, centred.reshape(-1, 1), 0)  # [B, T]
    returns = torch.where(real, groups.reshape(-1, 1), 0)  # [B, T]
    return advantages, returns


def varied_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Rows `[B]` (bool) of the groups of `group_size` consecutive responses whose rewards `[B]` are not all equal:
    DAPO's dynamic sampling keeps those, the others having every group-relative advantage 0."""
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"group_size {group_size} does not divide the batch size {rewards.shape[0]}")
    groups = rewards.view(-1, group_size)  # [B / k, k]
    varied = (groups != groups[:, :1]).any(dim=-1)  # [B / k]
    return varied.repeat_interleave(group_size)


def _outcome_groups(name: str, token_rewards: Tensor, real: Tensor, gamma: float, group_size: int) -> Tensor:
    """Each row's sum of token rewards, `[B / k, k]` by group; gamma < 1 is refused: it would discount a score
    placed at the last token by gamma^(T - 1), so that an outcome reward would depend on the response's length."""
    if gamma != 1:
        raise ValueError(
            f"{name} compares whole responses' rewards, which gamma = {gamma} < 1 would discount by their length "
            "(gamma^(T - 1) on the score); set ppo.gamma: 1.0 (OpenRLHF forces it too)"
        )
    return masked_sum(token_rewards.detach().float(), real, dim=-1).view(
        -1, _group_size(group_size, real, name)
    )


def _others_mean(groups: Tensor) -> Tensor:
    """For each member, the mean of the other members of its group: `[B / k, k]` -> `[B]`."""
    return ((groups.sum(dim=-1, keepdim=True) - groups) / (groups.shape[-1] - 1)).reshape(-1)


def _sequence_rewards(token_rewards: Tensor, real: Tensor, gamma: float) -> Tensor:
    """Each row's discounted sum of token rewards from its first real token, `[B]`."""
    steps_from_start = real.long().cumsum(dim=-1) - 1  # [B, T], real tokens before t
    discounts = torch.pow(
        torch.as_tensor(gamma, dtype=torch.float32), steps_from_start.to(torch.float32)
    )  # [B, T]
    return masked_sum(token_rewards.detach().float() * discounts, real, dim=-1)


def _group_size(group_size: int, real: Tensor, name: str) -> int:
    batch = real.shape[0]
    if group_size < 2 or batch % group_size != 0:
        raise ValueError(
            f"{name} needs groups of group_size >= 2 responses per prompt dividing the batch size {batch} "
            f"(set samples_per_prompt); got {group_size}"
        )
    return group_size


def check_discounts(gamma: float, lam: float | Tensor) -> None:
    """An error unless `gamma` and `lam` (one lambda or one per row) lie in [0, 1]."""
    lams = torch.as_tensor(lam)
    if not (0.0 <= gamma <= 1.0 and bool(((lams >= 0) & (lams <= 1)).all())):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")


def _require_values(name: str, values: Tensor | None) -> None:
    if values is None:
        raise ValueError(f"advantage estimator {name!r} needs values (a critic's V(s_t)); got values=None")


def _require_no_values(name: str, values: Tensor | None) -> None:
    if values is not None:
        raise ValueError(
            f"advantage estimator {name!r} uses no critic: pass values=None "
            f"(or choose an estimator that uses values, e.g. 'gae')"
        )
