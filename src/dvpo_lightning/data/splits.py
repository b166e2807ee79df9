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
    """`(train, validation)`, split by prompt: the rows of a prompt are all on one side, so a prompt repeated in
    the data (prompt-only data, several pairs per prompt) is never both trained on and validated on.

    The unique prompts are permuted from `seed`, and the first ones are held out with all their rows until at
    least `validation_count` rows are. Data without repeated prompts gets the row split it always had. Both keep
    the source order, and the same rows, seed and size always give the same split.
    """
    held_out = validation_count(len(rows), val_size)
    prompt_ids: dict[str, int] = {}
    group_of_row = np.array([prompt_ids.setdefault(prompt, len(prompt_ids)) for prompt in rows["prompt"]])
    order = np.random.default_rng(seed).permutation(len(prompt_ids))
    rows_held = np.cumsum(np.bincount(group_of_row, minlength=len(prompt_ids))[order])
    groups_held = int(np.searchsorted(rows_held, held_out)) + 1 if held_out else 0
    if groups_held >= len(prompt_ids):
        raise ValueError(
            f"val_size={val_size} holds out {held_out} of {len(rows)} rows ({len(prompt_ids)} distinct prompts, each "
            "kept on one side of the split), leaving none to train on"
        )
    validation = np.isin(group_of_row, order[:groups_held])
    return rows.select(np.flatnonzero(~validation)), rows.select(np.flatnonzero(validation))


def unique_prompts(rows: datasets.Dataset) -> datasets.Dataset:
    """The rows whose prompt text appears for the first time (pair data repeats prompts)."""
    seen: set[str] = set()
    first = []
    for index, prompt in enumerate(rows["prompt"]):
        if prompt not in seen:
            seen.add(prompt)
            first.append(index)
    return rows.select(first)
