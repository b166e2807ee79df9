"""Per-token KL estimators and the controllers that set the KL coefficient.

With tokens sampled from `pi` and `log_ratio = log pi(y_t) - log pi_ref(y_t)`, each estimator is a
per-token sample whose mean estimates `KL(pi || pi_ref)` (Schulman, "Approximating KL divergence"):

- `k1 = log_ratio`: unbiased, but a single sample can be negative;
- `k2 = log_ratio**2 / 2`: non-negative, biased (low variance);
- `k3 = exp(-log_ratio) - 1 + log_ratio`: non-negative and unbiased;
- `abs = |log_ratio|`: non-negative, biased.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvpo_lightning.algos.masked import checked_mask

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
KL_CONTROLLERS = ("fixed", "adaptive")


def check_kl_estimator(kind: str) -> str:
    """`kind` if it names a KL estimator; an error listing the known ones otherwise."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; known: {', '.join(KL_ESTIMATORS)}")
    return kind


def kl_penalty(
    logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1", mask: Tensor | None = None
) -> Tensor:
    """The `kind` estimate of KL(pi || pi_ref) per token, `[B, T]`; 0 on padding when `mask` is given.

    Differentiable in both arguments; callers building rewards pass detached log-probs.
    """
    check_kl_estimator(kind)
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ in shape"
        )
    log_ratio = logprobs - ref_logprobs
    if mask is not None:  # before exp(): a NaN on padding must not reach a gradient either
        log_ratio = torch.where(checked_mask(mask, log_ratio=log_ratio), log_ratio, 0)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.exp(-log_ratio) - 1 + log_ratio
    return log_ratio.abs()  # "abs"


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kind: str = "k1") -> Tensor:
    """The `kind` estimate of each response's KL to the reference, summed over its real tokens, `[B]`."""
    real = checked_mask(mask, logprobs=logprobs)
    return torch.where(real, kl_penalty(logprobs, ref_logprobs, kind, real), 0).sum(dim=-1)


class KLController:
    """The KL coefficient `value`, saved in checkpoints so a resumed run continues with it."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        """Account for `n_steps` samples whose mean KL was `current_kl`; returns the new coefficient."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController(KLController):
    """A constant KL coefficient (PPO and RTO in the reference runs)."""

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        return self.value


class AdaptiveKLController(KLController):
    """Steers the measured KL towards `target` (Ziegler et al. 2019, as in TRL).

    After `n_steps` samples with mean KL `current_kl`:
    `error = clip(current_kl / target - 1, -0.2, 0.2)` and `value *= 1 + error * n_steps / horizon`.
    Too much KL raises the coefficient, too little lowers it, by at most 20% per `horizon` samples.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        super().__init__(init_kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def build_kl_controller(
    kind: str, kl_coef: float, target: float | None = None, horizon: float | None = None
) -> KLController:
    """`"fixed"` (uses `kl_coef` only) or `"adaptive"` (starts at `kl_coef`, needs `target` and `horizon`)."""
    if kind == "fixed":
        if target is not None or horizon is not None:
            raise ValueError("a fixed KL controller takes no target or horizon; use kind='adaptive'")
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("an adaptive KL controller needs target and horizon")
        return AdaptiveKLController(kl_coef, target, horizon)
    raise ValueError(f"unknown KL controller {kind!r}; known: {', '.join(KL_CONTROLLERS)}")
