"""Deterministic train/validation splits and prompt de-duplication over canonical rows."""

from __future__ import annotations

import datasets
import numpy as np


def validation_count(total: int, val_size: int | float) -> int:
    """Rows held out for validation: `val_size` rows (an int) or that fraction of `total` (a float in
    [0, 1), rounded, at least one when positive)."""
    if isinstance(val_size, bool) or val_size < 0:
        raise ValueError(
            f"val_size must be a row count (int) or a fraction in [0, 1) (float), got {val_size!r}"
        )
    if isinstance(val_size, int):
        return val_size
    if val_size >= 1:
        raise ValueError(
            f"val_size {val_size} is a float, so a fraction, and must be < 1; pass an int for a count"
        )
    return max(1, round(val_size * total)) if val_size > 0 else 0


def split_rows(
    rows: datasets.Dataset, val_size: int | float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """`(train, validation)`: a random subset of `validation_count` rows drawn from `seed` is held out.

    Both keep the source order, and the same rows, seed and size always give the same split.
    """
    held_out = validation_count(len(rows), val_size)
    if held_out >= len(rows):
        raise ValueError(
            f"val_size={val_size} holds out {held_out} of {len(rows)} rows, leaving none to train on"
        )
    order = np.random.default_rng(seed).permutation(len(rows))
    return rows.select(np.sort(order[held_out:])), rows.select(np.sort(order[:held_out]))


def unique_prompts(rows: datasets.Dataset) -> datasets.Dataset:
    """The rows whose prompt text appears for the first time (pair data repeats prompts)."""
    seen: set[str] = set()
    first = []
    for index, prompt in enumerate(rows["prompt"]):
        if prompt not in seen:
            seen.add(prompt)
            first.append(index)
    return rows.select(first)
