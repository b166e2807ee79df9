"""Padding layouts for the algos tests: the same real tokens placed left, right or in between pads.

Other `test_algos_*` files import `layout_mask`, `spread` and `compact` from here; the tests below
check the helpers themselves, so a broken helper cannot make the other tests pass vacuously.
"""

from __future__ import annotations

import torch

LAYOUTS = ("right", "left", "interior", "none")


def layout_mask(lengths: list[int], length: int, layout: str, seed: int = 0) -> torch.Tensor:
    """Bool `[B, length]` with `lengths[i]` real positions in row i, placed as `layout` says.

    "none" means no padding at all (every length must equal `length`); "interior" scatters the
    real positions at random (seeded) among the pads.
    """
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), length, dtype=torch.bool)
    for row, n in enumerate(lengths):
        if layout == "right":
            mask[row, :n] = True
        elif layout == "left":
            mask[row, length - n :] = True
        elif layout == "interior":
            mask[row, torch.randperm(length, generator=generator)[:n]] = True
        elif layout == "none":
            assert n == length, "layout 'none' needs full-length rows"
            mask[row] = True
        else:
            raise ValueError(layout)
    return mask


def spread(rows: torch.Tensor, mask: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
    """Put the first `mask[i].sum()` values of `rows[i]` at the real positions of row i, `fill` elsewhere."""
    out = torch.full(mask.shape, fill, dtype=rows.dtype)
    for row in range(mask.shape[0]):
        out[row, mask[row]] = rows[row, : int(mask[row].sum())]
    return out


def compact(x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The values of `x` at the real positions of each row, in order."""
    return [x[row][mask[row]] for row in range(x.shape[0])]


def test_layouts_place_the_same_values_in_order():
    rows = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    for layout in ("right", "left", "interior"):
        mask = layout_mask([3, 2], 6, layout, seed=3)
        x = spread(rows, mask)
        assert mask.sum(dim=1).tolist() == [3, 2]
        assert [row.tolist() for row in compact(x, mask)] == [[1.0, 2.0, 3.0], [4.0, 5.0]]
        assert torch.isnan(x[~mask]).all()


def test_left_and_right_layouts_put_padding_where_named():
    assert layout_mask([2], 4, "right").tolist() == [[True, True, False, False]]
    assert layout_mask([2], 4, "left").tolist() == [[False, False, True, True]]
    assert layout_mask([4], 4, "none").tolist() == [[True, True, True, True]]
