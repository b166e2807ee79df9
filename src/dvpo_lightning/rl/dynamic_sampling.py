"""DAPO's dynamic sampling (Yu et al., arXiv 2503.14476, docs/algorithms.md §10): groups whose rewards are all equal
have every group-relative advantage 0, so they only shrink the batch's gradient; they are dropped, and the groups
kept from further rollouts fill the batch before the update.

    sampler = DynamicSampling(group_size=4, max_generations=3)
    experience = sampler.make(maker, responses)    # None: keep sampling (next prompts), no update yet
    experience = sampler.around(maker).make(responses)           # the same, where an experience maker is expected

One generation is one call; the batch is full once `rollout_size` rows (the size of a rollout) are kept, then cut
to exactly that. After `max_generations` generations without filling it, the rows of the last generation that
were dropped fill the rest, so every update has a full batch. Under DDP every rank updates only when all ranks are
ready (one all-reduce per generation), so their optimiser steps stay in step. What is kept lives in memory only: a
run resumed from a checkpoint starts collecting afresh.
"""

from __future__ import annotations

from dataclasses import fields
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from dvpo_lightning.algos import varied_groups
from dvpo_lightning.algos.distributed import all_reduce_sum, world_size
from dvpo_lightning.rl.experience import Experience, ExperienceMaker
from dvpo_lightning.rl.sequences import Responses


class DynamicSampling:
    """Collects the groups of `group_size` responses whose rewards differ, across generations, into full batches."""

    def __init__(self, group_size: int, max_generations: int):
        if group_size < 2 or max_generations < 1:
            raise ValueError(
                "dynamic sampling needs groups (ppo.samples_per_prompt >= 2) and max_generations >= 1; got "
                f"samples_per_prompt={group_size}, max_generations={max_generations}"
            )
        self.group_size, self.max_generations = group_size, max_generations
        self.kept: list[Experience] = []
        self.generations = self.dropped_groups = 0
        self.stats: dict[str, float] = {}  # of the last full batch: generations it took, groups dropped

    def around(self, maker: ExperienceMaker) -> SimpleNamespace:
        """`maker` as the engine calls it, `make(responses)`, with this sampling in between."""
        return SimpleNamespace(make=partial(self.make, maker))

    def make(self, maker: ExperienceMaker, responses: Responses) -> Experience | None:
        """The experience of `responses` (scored by `maker`) joined to the groups kept so far: a full batch, or None
        while more generations are needed."""
        experience = maker.make(responses)
        rollout_size = len(experience)
        kept_rows = varied_groups(experience.reward, self.group_size)  # [B]
        self.generations += 1
        self.dropped_groups += int((~kept_rows).sum()) // self.group_size
        if bool(kept_rows.any()):
            self.kept.append(experience.select(kept_rows.nonzero().squeeze(-1)))
        filled = (
            sum(len(part) for part in self.kept) >= rollout_size or self.generations >= self.max_generations
        )
        device = experience.mask.device
        if int(all_reduce_sum(torch.tensor(float(filled), device=device))) < world_size():
            return None
        dropped = (~kept_rows).nonzero().squeeze(-1)
        parts = [*self.kept, experience.select(dropped)] if len(dropped) else self.kept
        batch = concat_experiences(parts)
        batch = batch.select(torch.arange(min(rollout_size, len(batch)), device=device))
        self.stats = {
            "rollout/generations": float(self.generations),
            "rollout/dropped_groups": float(self.dropped_groups),
        }
        self.kept, self.generations, self.dropped_groups = [], 0, 0
        return batch


def concat_experiences(parts: list[Experience]) -> Experience:
    """The rows of `parts` one after another: prompt blocks left-padded, response blocks and per-token tensors
    right-padded to the widest part, with 0 (masked out, so no number changes)."""
    responses = [part.responses for part in parts]
    prompt_width = max(r.prompt_input_ids.shape[1] for r in responses)
    width = max(r.response_length for r in responses)

    def joined_block(name: str, left: bool) -> torch.Tensor:
        blocks = [getattr(r, name) for r in responses]
        return torch.cat(
            [F.pad(b, (prompt_width - b.shape[1], 0) if left else (0, width - b.shape[1])) for b in blocks]
        )

    joined = {
        "responses": Responses(
            joined_block("prompt_input_ids", left=True),
            joined_block("prompt_attention_mask", left=True),
            joined_block("response_input_ids", left=False),
            joined_block("response_mask", left=False),
            torch.cat([r.finished for r in responses]),
        )
    }
    for item in fields(Experience):
        values = [getattr(part, item.name) for part in parts]
        if item.name == "responses" or values[0] is None:
            joined.setdefault(item.name, None)
        elif values[0].dim() == 2:
            joined[item.name] = torch.cat([F.pad(value, (0, width - value.shape[1])) for value in values])
        else:
            joined[item.name] = torch.cat(values)
    return Experience(**joined)
