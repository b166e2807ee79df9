"""Turning a per-token loss `[B, T]` into the scalar to back-propagate, independent of how the batch is split.

Modes:

- `token-mean`: every real token of the batch weighs the same: `sum(loss) / num_tokens`.
- `seq-mean-token-mean`: every sequence weighs the same, its tokens averaged within it:
  `sum_i mean_t(loss_i) / num_sequences`.
- `seq-mean-token-sum`: every sequence weighs the same, its tokens summed:
  `sum_i sum_t(loss_i) / num_sequences`.

A mean taken per micro-batch (or per rank) and then averaged is not the mean of the whole batch
when micro-batches hold different numbers of tokens. So the denominators are *global*: a
`LossNormalizers` counts the real tokens and sequences of the whole batch, across its micro-batches
and ranks (`loss_normalizers` builds one, all-reduced when distributed). Then:

- summing `aggregate_loss` over micro-batches (gradient accumulation: call `backward` on each and
  step once) gives exactly the full-batch value;
- under DDP, which *averages* gradients over the `W` ranks, each rank's loss is multiplied by
  `normalizers.world_size` here, so the average over ranks of the per-rank sums is again the
  full-batch value. The caller does not scale anything, but must not divide by the number of
  micro-batches either (Lightning's `accumulate_grad_batches` does, under automatic optimisation:
  there, leave `normalizers=None` and use equal-sized micro-batches).

Without `normalizers`, the counts are taken from `mask` alone: the plain mean of this batch.
A sequence counts only if it has at least one real token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dvpo_lightning.algos.distributed import all_reduce_sum, world_size
from dvpo_lightning.algos.masked import checked_mask, masked_count, masked_mean, masked_sum

AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def check_aggregation(mode: str) -> str:
    """`mode` if it names an aggregation mode; an error listing the known ones otherwise."""
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; known: {', '.join(AGGREGATION_MODES)}")
    return mode


@dataclass(frozen=True)
class LossNormalizers:
    """Denominators of the whole batch (all micro-batches, all ranks) and the number of ranks."""

    num_tokens: Tensor  # real tokens, float scalar
    num_sequences: Tensor  # rows with at least one real token, float scalar
    world_size: int = 1


def loss_normalizers(masks: Tensor | Sequence[Tensor], distributed: bool = False) -> LossNormalizers:
    """Count the real tokens and sequences of the whole batch on this rank.

    `masks` is the mask of the batch (`[B, T]`) or the list of its micro-batches' masks (they may
    differ in `T`). With `distributed=True` and a process group initialised, the counts are summed
    over ranks and `world_size` is the number of ranks.
    """
    masks = [masks] if isinstance(masks, Tensor) else list(masks)
    if not masks:
        raise ValueError("loss_normalizers needs at least one mask")
    num_tokens = sum(masked_count(mask) for mask in masks)
    num_sequences = sum((masked_count(mask, dim=-1) > 0).float().sum() for mask in masks)
    if not distributed:
        return LossNormalizers(num_tokens, num_sequences, world_size=1)
    return LossNormalizers(all_reduce_sum(num_tokens), all_reduce_sum(num_sequences), world_size())


def aggregate_loss(
    loss_mat: Tensor, mask: Tensor, mode: str = "token-mean", normalizers: LossNormalizers | None = None
) -> Tensor:
    """The scalar loss of `loss_mat [B, T]` over real tokens (see the module docstring for `mode`)."""
    check_aggregation(mode)
    real = checked_mask(mask, loss_mat=loss_mat)
    if normalizers is None:
        normalizers = loss_normalizers(real)
    if mode == "token-mean":
        total, count = masked_sum(loss_mat, real), normalizers.num_tokens
    elif mode == "seq-mean-token-mean":
        total, count = masked_mean(loss_mat, real, dim=-1).sum(), normalizers.num_sequences
    else:  # "seq-mean-token-sum"
        total, count = masked_sum(loss_mat, real, dim=-1).sum(), normalizers.num_sequences
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)  # a plain number is fine too
    return total / count.clamp(min=1) * normalizers.world_size
