"""Batches in the split layout of docs/design.md, and the two helpers every model call needs.

A batch is a prompt block, LEFT-padded (generation appends to its right edge), and response blocks,
RIGHT-padded (token `t` of every response sits in column `t`). Padding is dynamic: each block is as
wide as its longest row in this batch. Ids are `long`; masks are `bool` and mark real tokens only, so
the amount of padding never changes a number downstream.

Keys per mode (every batch also has `index` `[B]`, the rows' ids in their source):

- `sft`: `prompt_input_ids`, `prompt_attention_mask` `[B, P]`; `response_input_ids`, `response_mask` `[B, R]`.
- `pairs`: the prompt block; `chosen_input_ids`, `chosen_mask`, `rejected_input_ids`, `rejected_mask`,
  all `[B, R]` with ONE `R` for both, so a module can stack them into a `[2B, R]` batch; `chosen_score`,
  `rejected_score` `[B]` float32 when the data has scores.
- `unpaired`: the prompt block; `response_input_ids`, `response_mask` `[B, R]`; `label` `[B]` bool, true for a
  desirable response (KTO's feedback).
- `prompts`: the prompt block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MODES = ("sft", "pairs", "unpaired", "prompts")


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists to the longest one: `(ids [B, L] long, mask [B, L] bool)`.

    `side="left"` puts the padding before the tokens (prompts), `side="right"` after them (responses).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max((len(tokens) for tokens in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, tokens in enumerate(sequences):
        columns = slice(width - len(tokens), width) if side == "left" else slice(0, len(tokens))
        ids[row, columns] = torch.as_tensor(tokens, dtype=torch.long)
        mask[row, columns] = True
    return ids, mask


@dataclass(frozen=True)
class Collator:
    """Turns tokenised rows into one batch of the given mode (see the module docstring).

    A row is a dict with `row` (its id in the source), `prompt_ids`, and per mode `response_ids`
    (sft), `response_ids` and `label` (unpaired) or `chosen_ids`, `rejected_ids` and, when `scores`,
    `chosen_score` / `rejected_score` (pairs).
    A plain dataclass, so `DataLoader` workers can pickle it.
    """

    mode: str
    pad_id: int
    scores: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        batch = {"index": torch.tensor([row["row"] for row in rows], dtype=torch.long)}
        batch["prompt_input_ids"], batch["prompt_attention_mask"] = pad_sequences(
            [row["prompt_ids"] for row in rows], self.pad_id, "left"
        )
        if self.mode in ("sft", "unpaired"):
            batch["response_input_ids"], batch["response_mask"] = pad_sequences(
                [row["response_ids"] for row in rows], self.pad_id, "right"
            )
        if self.mode == "unpaired":
            batch["label"] = torch.tensor([row["label"] for row in rows], dtype=torch.bool)
        if self.mode == "pairs":
            # Padded together so both blocks share the same width R.
            ids, mask = pad_sequences(
                [row["chosen_ids"] for row in rows] + [row["rejected_ids"] for row in rows],
                self.pad_id,
                "right",
            )
            size = len(rows)
            batch["chosen_input_ids"], batch["rejected_input_ids"] = ids[:size], ids[size:]
            batch["chosen_mask"], batch["rejected_mask"] = mask[:size], mask[size:]
            if self.scores:
                for key in ("chosen_score", "rejected_score"):
                    batch[key] = torch.tensor([row[key] for row in rows], dtype=torch.float32)
        return batch


def concat_prompt_response(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Join a left-padded prompt block `[B, P]` and a right-padded response block `[B, R]`.

    Returns `(input_ids, attention_mask)`, both `[B, P + R]`; the mask has the prompt mask's dtype.
    Response column `t` lands at sequence column `P + t`, whatever the padding.
    """
    if prompt_ids.shape != prompt_mask.shape or response_ids.shape != response_mask.shape:
        raise ValueError(
            f"ids and masks must have the same shape; got prompt {tuple(prompt_ids.shape)} vs "
            f"{tuple(prompt_mask.shape)}, response {tuple(response_ids.shape)} vs {tuple(response_mask.shape)}"
        )
    input_ids = torch.cat([prompt_ids, response_ids], dim=-1)
    attention_mask = torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], dim=-1)
    return input_ids, attention_mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids `[B, L]` long: each real token's index among the real tokens of its row.

    `attention_mask.cumsum(-1) - 1`, clamped at 0 so left padding gets position 0; the positions of
    real tokens are thus the same however much padding surrounds them.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
