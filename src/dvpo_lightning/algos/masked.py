"""Reductions over the real tokens of a padded batch.

Every per-token tensor comes with a `mask` of the same shape (bool, or float holding 0 and 1) that
marks its real tokens. Padding is removed with `torch.where(mask, x, 0)`, never `x * mask`: a NaN or
inf at a padded position (attention over padding can produce one) times 0 is still NaN, whereas
`where` drops it. So any padding layout (left, right, interior, none) gives the same numbers.

An empty mask (or an empty row, for row-wise reductions) has mean 0 and variance 0, so a batch or
micro-batch made only of padding contributes nothing instead of NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvpo_lightning.algos.distributed import all_reduce_sum


def checked_mask(mask: Tensor, **tensors: Tensor) -> Tensor:
    """`mask` as a bool tensor, after checking that each named tensor has its shape."""
    for name, tensor in tensors.items():
        if tensor.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but mask has shape {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` over real tokens: everything (`dim=None`) or along `dim`."""
    kept = torch.where(checked_mask(mask, x=x), x, 0)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_count(mask: Tensor, dim: int | None = None) -> Tensor:
    """Number of real tokens (a float tensor, ready to divide by)."""
    real = mask.bool().float()
    return real.sum() if dim is None else real.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over real tokens; 0 where there are none."""
    return masked_sum(x, mask, dim) / masked_count(mask, dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = False) -> Tensor:
    """Variance of `x` over all real tokens; `unbiased` divides by (n - 1) (by 1 when n = 1)."""
    real = checked_mask(mask, x=x)
    x = torch.where(real, x, 0)  # a NaN on padding would otherwise reach the gradient of the mean
    count = masked_count(real)
    squared_deviation = (x - masked_mean(x, real)) ** 2
    return masked_sum(squared_deviation, real) / (count - 1 if unbiased else count).clamp(min=1)


def masked_moments(x: Tensor, mask: Tensor, distributed: bool = False) -> tuple[Tensor, Tensor]:
    """(mean, unbiased variance) of `x` over its real tokens, scalars; with `distributed=True` and a process group
    initialised, over every rank's real tokens (sums and counts are all-reduced; the statistics from other ranks
    carry no gradient)."""
    real = checked_mask(mask, x=x)
    x = torch.where(real, x, 0)  # a NaN on padding would otherwise reach the gradient of the mean
    reduce = all_reduce_sum if distributed else (lambda total: total)
    count = reduce(masked_count(real))
    mean = reduce(masked_sum(x, real)) / count.clamp(min=1)
    squared_deviation = reduce(masked_sum((x - mean) ** 2, real))
    return mean, squared_deviation / (count - 1).clamp(min=1)


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, distributed: bool = False, eps: float = 1e-8
) -> Tensor:
    """`(x - mean) / sqrt(var + eps)` over real tokens, 0 on padding.

    The variance is the unbiased one. With `shift_mean=False` the mean is added back, so only the
    scale changes (used for advantages whose sign must be kept). With `distributed=True` and a
    process group initialised, the mean and variance are those of every rank's real tokens
    (`masked_moments`).
    """
    real = checked_mask(mask, x=x)
    mean, var = masked_moments(x, real, distributed)
    whitened = (torch.where(real, x, 0) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(real, whitened, 0)


def last_token_mask(mask: Tensor) -> Tensor:
    """Bool `[B, T]`, True at the last real token of each row (any padding layout; none for an empty row)."""
    real = mask.bool()
    positions = torch.arange(real.shape[-1], device=real.device)  # [T]
    last = torch.where(real, positions, -1).amax(dim=-1, keepdim=True)  # [B, 1]
    return positions == last


def last_token_values(x: Tensor, mask: Tensor) -> Tensor:
    """`x [B, T]` at the last real token of each row -> `[B]` (0 for an empty row)."""
    return masked_sum(x, last_token_mask(checked_mask(mask, x=x)), dim=-1)


def add_at_last_token(x: Tensor, scores: Tensor, mask: Tensor) -> Tensor:
    """`x [B, T]` plus `scores [B]` at the last real token of each row, 0 on padding."""
    real = checked_mask(mask, x=x)
    if scores.shape != x.shape[:1]:
        raise ValueError(f"scores must have shape [B] = {tuple(x.shape[:1])}, got {tuple(scores.shape)}")
    with_scores = x + torch.where(last_token_mask(real), scores.unsqueeze(-1), 0)
    return torch.where(real, with_scores, 0)
