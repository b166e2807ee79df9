"""The math of DVPO, PPO, DPO, RTO and reward modelling as pure tensor functions.

No Lightning, no `nn.Module`, no I/O: every function takes tensors and returns tensors, so it can
be read, imported in a notebook and unit-tested on its own. Per-token tensors are `[B, T]` with an
explicit `mask` of real tokens; padding never changes a number. `values[:, t]` is V(s_t), the value
of the state before token t. See docs/design.md and the shared algorithms reference.
"""

from dvpo_lightning.algos.aggregation import (
    AGGREGATION_MODES,
    LossNormalizers,
    aggregate_loss,
    loss_normalizers,
)
from dvpo_lightning.algos.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    KLController,
    build_kl_controller,
    kl_penalty,
)
from dvpo_lightning.algos.logprobs import entropy_from_logits, token_logprobs
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
from dvpo_lightning.algos.registry import Registry

__all__ = [
    "AGGREGATION_MODES",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "LossNormalizers",
    "Registry",
    "add_at_last_token",
    "aggregate_loss",
    "build_kl_controller",
    "entropy_from_logits",
    "kl_penalty",
    "last_token_mask",
    "last_token_values",
    "loss_normalizers",
    "masked_count",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "token_logprobs",
]
