"""The math of DVPO, PPO, DPO (and its offline family), RTO and reward modelling as pure tensor functions.

No Lightning, no `nn.Module`, no I/O: every function takes tensors and returns tensors, so it can
be read, imported in a notebook and unit-tested on its own. Per-token tensors are `[B, T]` with an
explicit `mask` of real tokens; padding never changes a number. `values[:, t]` is V(s_t), the value
of the state before token t. See docs/design.md and docs/algorithms.md.
"""

from dvpo_lightning.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    ROLLOUT_INPUTS,
    check_discounts,
    discounted_returns,
    earned_values,
    gae,
    gae_advantages,
    get_advantage,
    grpo_advantages,
    gvm_advantages,
    register_advantage,
    reinforce_advantages,
    rloo_advantages,
    td_lambda_returns,
)
from dvpo_lightning.algos.aggregation import (
    AGGREGATION_MODES,
    LossNormalizers,
    aggregate_loss,
    check_aggregation,
    loss_normalizers,
)
from dvpo_lightning.algos.kl import (
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    KLController,
    build_kl_controller,
    check_kl_estimator,
    kl_penalty,
    sequence_kl,
)
from dvpo_lightning.algos.logprobs import entropy_from_logits, head_token_logprobs, token_logprobs
from dvpo_lightning.algos.losses import (
    LOSSES,
    bradley_terry_loss,
    get_loss,
    gvm_loss,
    kl_loss,
    ppo_policy_loss,
    register_loss,
    value_loss,
)
from dvpo_lightning.algos.masked import (
    add_at_last_token,
    last_token_mask,
    last_token_values,
    masked_count,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from dvpo_lightning.algos.preference_losses import (
    PREFERENCE_LOSSES,
    get_preference_loss,
    register_preference_loss,
)
from dvpo_lightning.algos.preference_objective import PreferenceLosses, PreferenceObjective, dpo_loss
from dvpo_lightning.algos.registry import Registry
from dvpo_lightning.algos.rewards import (
    assemble_token_rewards,
    clamp_scores,
    dpo_token_reward,
    kl_reward,
    penalize_unfinished,
    rs_ppo_shaping,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATION_MODES",
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "LOSSES",
    "ROLLOUT_INPUTS",
    "PREFERENCE_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "LossNormalizers",
    "PreferenceLosses",
    "PreferenceObjective",
    "Registry",
    "add_at_last_token",
    "aggregate_loss",
    "assemble_token_rewards",
    "bradley_terry_loss",
    "build_kl_controller",
    "check_aggregation",
    "check_discounts",
    "check_kl_estimator",
    "clamp_scores",
    "discounted_returns",
    "dpo_loss",
    "dpo_token_reward",
    "earned_values",
    "entropy_from_logits",
    "gae",
    "gae_advantages",
    "get_advantage",
    "get_loss",
    "grpo_advantages",
    "get_preference_loss",
    "gvm_advantages",
    "gvm_loss",
    "kl_loss",
    "kl_penalty",
    "kl_reward",
    "last_token_mask",
    "last_token_values",
    "loss_normalizers",
    "masked_count",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "penalize_unfinished",
    "ppo_policy_loss",
    "register_advantage",
    "register_loss",
    "register_preference_loss",
    "reinforce_advantages",
    "rloo_advantages",
    "rs_ppo_shaping",
    "sequence_kl",
    "td_lambda_returns",
    "head_token_logprobs",
    "token_logprobs",
    "value_loss",
]
