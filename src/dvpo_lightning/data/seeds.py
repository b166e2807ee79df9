"""The run's seed, which the seeds a run draws its initial weights and its data from follow by default.

Lightning's `seed_everything` (the CLI's `--seed_everything`) records the run's seed in `PL_GLOBAL_SEED`. The
seeds of a model's random initialisation (`ModelSpec.init_seed`: an `arch` model, LoRA adapters, a new value head)
and of the data (`RLHFDataModule.seed`: a built-in task's rows, the validation split, the training order) default
to it, so two run seeds give two runs, not copies of one; set either to pin it. Without a run seed they are 0.
Every process of a run has the same run seed when it is given (every config in `configs/` gives one), so FSDP2's
processes build identical weights; `RLHFModule` checks it.
"""

from __future__ import annotations

import os

RUN_SEED_VARIABLE = "PL_GLOBAL_SEED"


def run_seed() -> int | None:
    """The seed Lightning's `seed_everything` set for this run, or None."""
    seed = os.environ.get(RUN_SEED_VARIABLE)
    return int(seed) if seed is not None else None


def seed_or_run_seed(seed: int | None) -> int:
    """`seed` when one is pinned, else the run's seed, else 0."""
    if seed is not None:
        return seed
    found = run_seed()
    return found if found is not None else 0
