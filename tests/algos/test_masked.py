"""Masked reductions, whitening and last-token helpers: hand-computed numbers, padding and NaN safety."""

from __future__ import annotations

import pytest
import torch

from dvpo_lightning.algos import (
    add_at_last_token,
    last_token_mask,
    last_token_values,
    masked_count,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

NAN = float("nan")
# Real values 1, 2, 4, 6: mean 3.25, squared deviations 5.0625 + 1.5625 + 0.5625 + 7.5625 = 14.75.
X = torch.tensor([[1.0, 2.0, NAN], [NAN, 4.0, 6.0]])
MASK = torch.tensor([[True, True, False], [False, True, True]])


def test_masked_sum_and_mean_skip_nan_padding():
    assert masked_sum(X, MASK).item() == 13.0
    assert masked_sum(X, MASK, dim=-1).tolist() == [3.0, 10.0]
    assert masked_mean(X, MASK).item() == 3.25
    assert masked_mean(X, MASK, dim=-1).tolist() == [1.5, 5.0]
    assert masked_count(MASK).item() == 4.0


def test_float_mask_gives_the_same_numbers_as_bool_mask():
    assert masked_mean(X, MASK.float()).item() == 3.25
    assert torch.equal(masked_whiten(X, MASK.float()), masked_whiten(X, MASK))


def test_masked_var_biased_and_unbiased():
    assert masked_var(X, MASK).item() == pytest.approx(14.75 / 4)
    assert masked_var(X, MASK, unbiased=True).item() == pytest.approx(14.75 / 3)


def test_masked_whiten_uses_unbiased_variance_and_zeroes_padding():
    deviations = torch.tensor([-2.25, -1.25, 0.75, 2.75])
    expected = deviations / (14.75 / 3) ** 0.5
    whitened = masked_whiten(X, MASK)
    torch.testing.assert_close(whitened[MASK], expected)
    assert whitened[~MASK].tolist() == [0.0, 0.0]


def test_masked_whiten_without_shift_keeps_the_mean():
    kept = masked_whiten(X, MASK, shift_mean=False)
    torch.testing.assert_close(
        kept[MASK], torch.tensor([-2.25, -1.25, 0.75, 2.75]) / (14.75 / 3) ** 0.5 + 3.25
    )
    assert masked_mean(kept, MASK).item() == pytest.approx(3.25)


def test_empty_mask_gives_zero_not_nan():
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert masked_mean(X, empty).item() == 0.0
    assert masked_var(X, empty, unbiased=True).item() == 0.0
    assert masked_whiten(X, empty).tolist() == [[0.0] * 3, [0.0] * 3]
    assert masked_mean(X, torch.tensor([[True, False, False], [False] * 3]), dim=-1).tolist() == [1.0, 0.0]


def test_nan_on_padding_does_not_reach_gradients():
    for reduce in (masked_mean, masked_var, lambda x, m: masked_whiten(x, m).pow(2).sum()):
        x = X.clone().requires_grad_(True)
        reduce(x, MASK).backward()
        assert torch.isfinite(x.grad).all()
        assert x.grad[~MASK].tolist() == [0.0, 0.0]
    x = X.clone().requires_grad_(True)
    masked_mean(x, MASK).backward()
    assert x.grad[MASK].tolist() == [0.25] * 4


def test_whiten_is_the_same_in_every_padding_layout():
    right = torch.tensor([[1.0, 2.0, 0.0, 0.0], [4.0, 6.0, 9.0, 0.0]])
    right_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    interior = torch.tensor([[1.0, NAN, 2.0, NAN], [NAN, 4.0, 6.0, 9.0]])
    interior_mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(
        masked_whiten(right, right_mask)[right_mask], masked_whiten(interior, interior_mask)[interior_mask]
    )


def test_last_token_in_any_layout():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert last_token_mask(mask).int().tolist() == [[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]
    x = torch.arange(16.0).reshape(4, 4)
    assert last_token_values(x, mask).tolist() == [1.0, 7.0, 10.0, 0.0]


def test_add_at_last_token_adds_scores_there_and_zeroes_padding():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    x = torch.tensor([[1.0, 2.0, NAN], [NAN, 3.0, 4.0]])
    out = add_at_last_token(x, torch.tensor([10.0, 20.0]), mask)
    assert out.tolist() == [[1.0, 12.0, 0.0], [0.0, 3.0, 24.0]]


def test_shape_mismatch_names_the_tensor():
    with pytest.raises(ValueError, match=r"x has shape \(2, 3\) but mask has shape \(2, 4\)"):
        masked_sum(X, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores must have shape"):
        add_at_last_token(X, torch.ones(3), MASK)
