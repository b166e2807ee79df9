"""Prompts with room for a response in the policy's context, kept equal in number on every process.

Past its context a model with learned positions fails with an index error deep inside its embedding, and one with
rotary positions answers from positions it never saw, so a prompt is only answered when a whole response of
`max_new_tokens` fits after it. Every process then keeps as many prompts as the process that kept the fewest: equal
rollouts give every process the same mini-batches, optimiser steps and collectives, which would otherwise pair up
wrongly or hang.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from dvpo_lightning.rl import SamplingConfig


def prompts_with_room(
    module: pl.LightningModule,
    batch: dict,
    sampling: SamplingConfig,
    context: int | None,
    option: str,
    prefix: str,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The batch's prompt ids and mask `[B', P]`, without the prompts that leave no room in a `context`-token
    policy for a response of `sampling.max_new_tokens` (`option` names that setting); None when no prompt is left
    on some process.

    The dropped prompts are warned about and counted in `<prefix>/prompts_without_room`; those dropped to match the
    process with the fewest (its last ones) in `<prefix>/prompts_dropped_to_balance`. A batch left empty on any
    process is thus skipped by every process.
    """
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    if context is None:
        return ids, mask
    if sampling.max_new_tokens >= context:
        raise ValueError(
            f"{option}.max_new_tokens={sampling.max_new_tokens} leaves no room for a prompt in the policy's "
            f"context of {context} tokens (max_position_embeddings): lower {option}.max_new_tokens"
        )
    fits = mask.sum(-1) + sampling.max_new_tokens <= context  # [B]
    dropped = int((~fits).sum())
    module.log(f"{prefix}/prompts_without_room", float(dropped), batch_size=len(fits), sync_dist=True)
    if dropped:
        rank_zero_warn(
            f"Prompts that leave no room for a response of {option}.max_new_tokens={sampling.max_new_tokens} "
            f"tokens in the policy's context of {context} tokens are dropped (counted in "
            f"{prefix}/prompts_without_room); lower data.max_prompt_length or {option}.max_new_tokens to keep them"
        )
    kept = fewest_on_any_rank(module, fits)
    module.log(
        f"{prefix}/prompts_dropped_to_balance",
        float(fits.sum() - kept.sum()),
        batch_size=len(fits),
        sync_dist=True,
    )
    if not bool(kept.any()):
        rank_zero_warn(
            f"A {prefix} batch has no prompt with room for a response of {option}.max_new_tokens="
            f"{sampling.max_new_tokens} tokens in the policy's context of {context} tokens (on at least one "
            "process): the batch is skipped"
        )
        return None
    return ids[kept], mask[kept]


def fewest_on_any_rank(module: pl.LightningModule, rows: torch.Tensor) -> torch.Tensor:
    """`rows [B]` (bool) less its last true rows, so that it has as many as the process with the fewest."""
    count = rows.sum()
    fewest = (
        module.trainer.strategy.reduce(count.clone(), reduce_op="min")
        if module._trainer is not None
        else count
    )
    return rows & (rows.long().cumsum(0) <= fewest)


class EmptyBatches:
    """Counts training batches in a row that had no prompt with room; an epoch's worth means none ever will."""

    def __init__(self) -> None:
        self.in_a_row = 0

    def reset(self) -> None:
        self.in_a_row = 0

    def count(self, trainer: pl.Trainer, sampling: SamplingConfig, context: int | None) -> None:
        self.in_a_row += 1
        if self.in_a_row >= trainer.num_training_batches:
            raise ValueError(
                f"{self.in_a_row} training batches in a row (an epoch's worth) had no prompt with room for a response "
                f"of sampling.max_new_tokens={sampling.max_new_tokens} tokens in the policy's context of {context} "
                "tokens: lower data.max_prompt_length or sampling.max_new_tokens"
            )
