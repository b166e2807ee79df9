"""Turning a per-token loss `[B, T]` into the scalar to back-propagate, independent of how the batch is split.

Modes:

- `token-mean`: every real token of the batch weighs the same: `sum(loss) / num_tokens`.
- `seq-mean-token-mean`: every sequence weighs the same, its tokens averaged within it:
  `sum_i mean_t(loss_i) / num_sequences`.
- `seq-mean-token-sum`: every sequence weighs the same, its tokens summed:
  `sum_i sum_t(loss_i) / num_sequences`.

and TRL's `GRPOConfig.loss_type` names, with TRL's normalisers:

- `grpo`: `seq-mean-token-mean` (DeepSeekMath's per-sequence mean);
- `dapo`: `token-mean` over the whole batch (DAPO's token-level loss; TRL's default);
- `dr_grpo`: `sum(loss) / (num_rows * max_response_length)`, a constant denominator (Dr. GRPO): the rows of the
  whole batch (empty ones too) times the longest response sampling allows (`sampling.max_new_tokens`);
- `bnpo`: the token mean of *this* micro-batch, divided by the number of micro-batches: TRL's mean over its local
  batch, so, unlike the others, it depends on the split (on one micro-batch it is `token-mean`).

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

AGGREGATION_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "grpo",
    "bnpo",
    "dr_grpo",
    "dapo",
)
#: TRL's names of the modes above.
TRL_ALIASES = {"grpo": "seq-mean-token-mean", "dapo": "token-mean"}


def check_aggregation(mode: str) -> str:
    """`mode` if it names an aggregation mode; an error listing the known ones otherwise."""
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; known: {', '.join(AGGREGATION_MODES)}")
    return mode


@dataclass(frozen=True)
class LossNormalizers:
    """Denominators of the whole batch (all micro-batches, all ranks), the number of ranks and the constants of
    `dr_grpo` and `bnpo`."""

    num_tokens: Tensor  # real tokens, float scalar
    num_sequences: Tensor  # rows with at least one real token, float scalar
    world_size: int = 1
    num_rows: Tensor | None = None  # every row, float scalar; None = num_sequences
    num_micro_batches: int = 1  # of this rank's batch (`bnpo`)
    max_response_length: int | None = None  # the longest response sampling allows (`dr_grpo`)


def loss_normalizers(
    masks: Tensor | Sequence[Tensor], distributed: bool = False, max_response_length: int | None = None
) -> LossNormalizers:
    """Count the real tokens, sequences and rows of the whole batch on this rank.

    `masks` is the mask of the batch (`[B, T]`) or the list of its micro-batches' masks (they may
    differ in `T`). With `distributed=True` and a process group initialised, the counts are summed
    over ranks and `world_size` is the number of ranks. `max_response_length` is `dr_grpo`'s constant.
    """
    masks = [masks] if isinstance(masks, Tensor) else list(masks)
    if not masks:
        raise ValueError("loss_normalizers needs at least one mask")
    counts = torch.stack(
        [
            sum(masked_count(mask) for mask in masks),
            sum((masked_count(mask, dim=-1) > 0).float().sum() for mask in masks),
            torch.tensor(float(sum(mask.shape[0] for mask in masks)), device=masks[0].device),
        ]
    )  # tokens, sequences, rows
    ranks = 1
    if distributed:
        counts, ranks = all_reduce_sum(counts), world_size()
    num_tokens, num_sequences, num_rows = counts.unbind()
    return LossNormalizers(num_tokens, num_sequences, ranks, num_rows, len(masks), max_response_length)


def aggregate_loss(
    loss_mat: Tensor, mask: Tensor, mode: str = "token-mean", normalizers: LossNormalizers | None = None
) -> Tensor:
    """The scalar loss of `loss_mat [B, T]` over real tokens (see the module docstring for `mode`)."""
    mode = TRL_ALIASES.get(check_aggregation(mode), mode)
    real = checked_mask(mask, loss_mat=loss_mat)
    if normalizers is None:
        normalizers = loss_normalizers(real)
    if mode == "bnpo":  # DDP's average over ranks is TRL's too: no world-size factor
        return masked_sum(loss_mat, real) / masked_count(real).clamp(min=1) / normalizers.num_micro_batches
    if mode == "dr_grpo":
        if normalizers.max_response_length is None:
            raise ValueError("loss aggregation 'dr_grpo' needs normalizers.max_response_length")
        rows = normalizers.num_sequences if normalizers.num_rows is None else normalizers.num_rows
        total, count = masked_sum(loss_mat, real), rows * normalizers.max_response_length
    elif mode == "token-mean":
        total, count = masked_sum(loss_mat, real), normalizers.num_tokens
    elif mode == "seq-mean-token-mean":
        total, count = masked_mean(loss_mat, real, dim=-1).sum(), normalizers.num_sequences
    else:  # "seq-mean-token-sum"
        total, count = masked_sum(loss_mat, real, dim=-1).sum(), normalizers.num_sequences
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)  # a plain number is fine too
    return total / count.clamp(min=1) * normalizers.world_size
