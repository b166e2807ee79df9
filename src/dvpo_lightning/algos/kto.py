"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306): a loss on unpaired feedback, each completion labelled
desirable or not, as TRL's `KTOTrainer` computes it (`loss_type="kto"`).

With `r(x, y) = log pi(y|x) - log pi_ref(y|x)` (sequence log-probs summed over the completion's tokens) and a
reference point `z` (`kto_reference_point`), a desirable completion costs `w_D (1 - sigmoid(beta (r - z)))` and an
undesirable one `w_U (1 - sigmoid(beta (z - r)))`: the paper's `lambda_y - v(x, y)`, its value function `v`
weighted by `lambda_D = w_D` or `lambda_U = w_U`. A batch's loss is the mean over its completions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvpo_lightning.algos.distributed import all_reduce_sum, world_size


def kto_reference_point(kl_policy_logps: Tensor, kl_ref_logps: Tensor, distributed: bool = False) -> Tensor:
    """KTO's reference point `z` `[]`: the batch mean of `log pi(y'|x) - log pi_ref(y'|x)` over mismatched pairs
    (each prompt with another row's completion, `[B]` each), an estimate of `KL(pi || pi_ref)` that carries no
    gradient and is clamped at 0, as a KL cannot be negative (TRL's `KTOTrainer`). `distributed`: the mean of the
    ranks' batch means, as TRL gathers them, so every rank uses the same `z`."""
    batch_mean = (kl_policy_logps - kl_ref_logps).detach().mean()
    if distributed:
        batch_mean = all_reduce_sum(batch_mean) / world_size()
    return batch_mean.clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    reference_point: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """Per-completion KTO losses `[B]` (the module docstring's formula) from sequence log-probs `[B]` of the policy
    and the reference, `desirable` `[B]` bool, and the reference point `[]` (`kto_reference_point`).

    `desirable_weight` / `undesirable_weight` (`w_D`, `w_U`) rebalance unequal numbers of desirable and undesirable
    completions: the paper recommends `w_D n_D / (w_U n_U)` in [1, 4/3].
    """
    logratios = policy_logps - ref_logps.detach()  # [B]
    signed = torch.where(desirable, logratios - reference_point, reference_point - logratios)
    weights = torch.where(desirable, desirable_weight, undesirable_weight).to(logratios.dtype)
    return weights * (1 - torch.sigmoid(beta * signed))


def check_kto_options(beta: float, desirable_weight: float, undesirable_weight: float) -> None:
    """KTO's options, checked at start-up."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if weight <= 0:
            raise ValueError(f"{name} must be > 0, got {weight}")
