"""Per-token KL estimators and the controllers that set the KL coefficient.

With tokens sampled from `pi` and `log_ratio = log pi(y_t) - log pi_ref(y_t)`, each estimator is a
per-token sample whose mean estimates `KL(pi || pi_ref)` (Schulman, "Approximating KL divergence"):

- `k1 = log_ratio`: unbiased, but a single sample can be negative;
- `k2 = log_ratio**2 / 2`: non-negative, biased (low variance);
- `k3 = exp(-log_ratio) - 1 + log_ratio`: non-negative and unbiased;
- `abs = |log_ratio|`: non-negative, biased.

As a loss term on the new log-probs (`kl_loss`) what counts is the estimate's gradient, averaged over tokens sampled
from `pi`: k2's is the gradient of KL(pi || pi_ref), k3's that of KL(pi_ref || pi) (GRPO, TRL), but k1's is
`sum_y grad pi(y) = 0` (it regularises nothing) and abs's that of the total variation `sum_y |pi(y) - pi_ref(y)|`,
not of a KL: `check_kl_loss_estimator` refuses those two there.

`clamp` bounds every estimate to [-clamp, clamp] (OpenRLHF clamps to 10): k3's `exp(-log_ratio)` overflows float32
below a log-ratio of about -88, which without a clamp gives an infinite estimate (the step is then skipped).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvpo_lightning.algos.masked import checked_mask

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
KL_CONTROLLERS = ("fixed", "adaptive")
#: the estimators whose mean gradient as a loss term is that of a KL (see the module docstring)
KL_LOSS_ESTIMATORS = ("k2", "k3")


def check_kl_estimator(kind: str) -> str:
    """`kind` if it names a KL estimator; an error listing the known ones otherwise."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; known: {', '.join(KL_ESTIMATORS)}")
    return kind


def check_kl_loss_estimator(kind: str) -> str:
    """`kind` if its gradient as a loss term is that of a KL (k2, k3); an error naming those otherwise."""
    check_kl_estimator(kind)
    if kind not in KL_LOSS_ESTIMATORS:
        why = (
            "averages to zero over sampled tokens"
            if kind == "k1"
            else "is that of the total variation, not a KL"
        )
        raise ValueError(
            f"the {kind} estimate as a loss term regularises nothing towards the reference (its gradient {why}): "
            "use k3 (the gradient of KL(ref || pi), as GRPO and TRL) or k2 (that of KL(pi || ref)), or put the KL "
            "in the reward"
        )
    return kind


def check_kl_clamp(clamp: float | None) -> float | None:
    if clamp is not None and not clamp > 0:
        raise ValueError(f"a KL clamp must be > 0 (or None for none); got {clamp}")
    return clamp


def kl_penalty(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    kind: str = "k1",
    mask: Tensor | None = None,
    clamp: float | None = None,
) -> Tensor:
    """The `kind` estimate of KL(pi || pi_ref) per token, `[B, T]`, within [-clamp, clamp] when `clamp` is given;
    0 on padding when `mask` is given.

    Differentiable in both arguments (0 where clamped); callers building rewards pass detached log-probs.
    """
    check_kl_estimator(kind)
    check_kl_clamp(clamp)
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ in shape"
        )
    log_ratio = logprobs - ref_logprobs
    if mask is not None:  # before exp(): a NaN on padding must not reach a gradient either
        log_ratio = torch.where(checked_mask(mask, log_ratio=log_ratio), log_ratio, 0)
    if clamp is not None and kind == "k3":
        # Below -(clamp + 1) k3 exceeds clamp (e^x >= 2x), so this changes no clamped value and keeps exp() finite
        # (an inf there would make the clamp's zero gradient 0 * inf = NaN).
        log_ratio = log_ratio.clamp(min=-min(clamp + 1, 80.0))
    if kind == "k1":
        estimate = log_ratio
    elif kind == "k2":
        estimate = 0.5 * log_ratio**2
    elif kind == "k3":
        estimate = torch.exp(-log_ratio) - 1 + log_ratio
    else:
        estimate = log_ratio.abs()  # "abs"
    return estimate if clamp is None else estimate.clamp(-clamp, clamp)


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
