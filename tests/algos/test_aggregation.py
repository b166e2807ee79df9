"""Loss aggregation modes: hand numbers, and independence of the micro-batch split and rank count."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dvpo_lightning.algos import AGGREGATION_MODES, LossNormalizers, aggregate_loss, loss_normalizers
from tests.algos.test_layouts import layout_mask, spread

NAN = float("nan")
# Row 0: 1, 2, 3; row 1: 4; row 2: empty (not counted as a sequence).
LOSS = torch.tensor([[1.0, 2.0, 3.0, NAN], [4.0, NAN, NAN, NAN], [NAN, NAN, NAN, NAN]])
MASK = ~torch.isnan(LOSS)
#: every mode but `bnpo`, TRL's mean over the local batch, which depends on the split by design
SPLIT_FREE = [mode for mode in AGGREGATION_MODES if mode != "bnpo"]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 10 / 4),
        ("seq-mean-token-mean", (2 + 4) / 2),
        ("seq-mean-token-sum", (6 + 4) / 2),
        ("dapo", 10 / 4),
        ("grpo", (2 + 4) / 2),
        ("bnpo", 10 / 4),
        ("dr_grpo", 10 / (3 * 7)),  # every row, the empty one too, times the longest response allowed
    ],
)
def test_modes_by_hand(mode, expected):
    normalizers = loss_normalizers(MASK, max_response_length=7)
    assert aggregate_loss(LOSS, MASK, mode, normalizers).item() == pytest.approx(expected)


def test_bnpo_is_each_micro_batchs_token_mean_over_the_number_of_micro_batches():
    """TRL's `bnpo`: the mean over the local batch, divided by the gradient-accumulation steps."""
    normalizers = loss_normalizers([MASK[:1], MASK[1:]])
    first = aggregate_loss(LOSS[:1], MASK[:1], "bnpo", normalizers)
    second = aggregate_loss(LOSS[1:], MASK[1:], "bnpo", normalizers)
    assert (first + second).item() == pytest.approx((6 / 3 + 4 / 1) / 2)


def test_dr_grpo_needs_the_longest_response_allowed():
    with pytest.raises(ValueError, match="dr_grpo' needs normalizers.max_response_length"):
        aggregate_loss(LOSS, MASK, "dr_grpo")


def test_normalizers_count_tokens_and_non_empty_sequences():
    normalizers = loss_normalizers([MASK[:2], MASK[2:, :3]])
    assert normalizers.num_tokens.item() == 4
    assert normalizers.num_sequences.item() == 2
    assert normalizers.num_rows.item() == 3 and normalizers.num_micro_batches == 2
    assert normalizers.world_size == 1


def test_plain_numbers_as_normalizers():
    assert aggregate_loss(LOSS, MASK, "token-mean", LossNormalizers(8, 4)).item() == pytest.approx(10 / 8)


def test_unknown_mode_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown loss aggregation mode 'mean'; known: token-mean"):
        aggregate_loss(LOSS, MASK, "mean")


def _batch():
    """Parameters `[8, 6]` (the loss is their square) and a right-padded mask with one empty row."""
    params = torch.randn(8, 6, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    mask = layout_mask([6, 1, 4, 0, 3, 5, 2, 6], 6, "right")
    return params, mask


def _loss(params, mask, rows, mode, normalizers):
    """The loss of the micro-batch `rows`, trimmed to its longest row (micro-batches differ in T)."""
    length = max(int(mask[rows].sum(dim=1).max()), 1)
    return aggregate_loss(params[rows, :length] ** 2, mask[rows, :length], mode, normalizers)


@pytest.mark.parametrize("mode", SPLIT_FREE)
def test_sum_over_micro_batches_equals_the_full_batch(mode):
    params, mask = _batch()
    full = aggregate_loss(params**2, mask, mode, loss_normalizers(mask, max_response_length=9))
    (full_grad,) = torch.autograd.grad(full, params)

    micro_batches = [slice(0, 3), slice(3, 4), slice(4, 8)]
    normalizers = loss_normalizers([mask[rows] for rows in micro_batches], max_response_length=9)
    accumulated = sum(_loss(params, mask, rows, mode, normalizers) for rows in micro_batches)
    (accumulated_grad,) = torch.autograd.grad(accumulated, params)

    torch.testing.assert_close(accumulated, full)
    torch.testing.assert_close(accumulated_grad, full_grad)


@pytest.mark.parametrize("mode", SPLIT_FREE)
def test_ddp_average_over_ranks_equals_the_full_batch(mode):
    """Two simulated ranks with two micro-batches each; DDP averages their gradients."""
    params, mask = _batch()
    full = aggregate_loss(params**2, mask, mode, loss_normalizers(mask, max_response_length=9))
    (full_grad,) = torch.autograd.grad(full, params)

    ranks = [[slice(0, 2), slice(2, 5)], [slice(5, 6), slice(6, 8)]]
    counted = loss_normalizers(
        [mask[rows] for micro_batches in ranks for rows in micro_batches], max_response_length=9
    )
    normalizers = replace(counted, world_size=2)
    rank_losses = [sum(_loss(params, mask, rows, mode, normalizers) for rows in micro) for micro in ranks]
    rank_grads = [torch.autograd.grad(loss, params)[0] for loss in rank_losses]

    torch.testing.assert_close(sum(rank_losses) / 2, full)
    torch.testing.assert_close(sum(rank_grads) / 2, full_grad)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_padding_layout_and_nan_do_not_change_the_loss(mode):
    values = torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.0], [4.0, 5.0, 0.0, 0.0, 0.0]])
    right = layout_mask([3, 2], 5, "right")
    interior = layout_mask([3, 2], 5, "interior", seed=1)
    normalizers = loss_normalizers(right, max_response_length=5)
    assert aggregate_loss(spread(values, right), right, mode, normalizers) == aggregate_loss(
        spread(values, interior), interior, mode, normalizers
    )
