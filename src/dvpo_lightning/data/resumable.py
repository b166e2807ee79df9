"""A training loader that resumes mid-epoch exactly where a checkpoint left it.

Lightning stores the `state_dict()` of a stateful training loader in each checkpoint and hands it back through
`load_state_dict()` on resume; the loader must then continue from the next batch itself. Two things make that
exact: the shuffle order of an epoch depends only on the seed and the epoch number (`EpochShuffle`; Lightning
calls `set_epoch` at every epoch start, as it does for `DistributedSampler`), and the loader skips the batches
the interrupted run already consumed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized

import torch
from torch.utils.data import DataLoader, Sampler


class EpochShuffle(Sampler[int]):
    """Random order of `len(data_source)` indices, a function of `(seed, epoch)` alone."""

    def __init__(self, data_source: Sized, seed: int = 0):
        self.data_source = data_source
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=generator).tolist())

    def __len__(self) -> int:
        return len(self.data_source)


class LengthGroupedShuffle(EpochShuffle):
    """An epoch's random order rearranged so that each batch holds rows of similar lengths (TRL's and HF's
    `group_by_length`): less padding, the same rows. A function of `(seed, epoch)` alone, like `EpochShuffle`.

    The shuffled indices are cut into mega-batches of `mega_batches` batches of `batch_size`; each mega-batch is sorted
    by length and cut into batches; the whole batches are shuffled (so that lengths do not trend over the epoch), and
    a partial batch, if any, comes last, where a loader expects it.

    In the split layout a batch is as wide as its longest prompt plus its longest response, so rows given as
    `(prompt, response)` lengths are grouped on both: each mega-batch is sorted by prompt length, then each window of
    `response_window` batches of it by response length, so that a batch's prompts and responses are both alike.

    Args:
        lengths: each row's length in tokens, or its `(prompt, longest response)` lengths.
        batch_size: rows per batch, over all processes (a distributed loader deals each process every
            world_size-th index).
    """

    def __init__(
        self,
        lengths: Sequence[int] | Sequence[tuple[int, int]],
        batch_size: int,
        seed: int = 0,
        mega_batches: int = 50,
        response_window: int = 4,
    ):
        super().__init__(lengths, seed)
        self.lengths = torch.as_tensor(lengths).reshape(len(lengths), -1)  # [N, 1] or [N, 2]
        self.batch_size, self.mega_batches, self.response_window = batch_size, mega_batches, response_window

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        batches = []
        for mega_batch in order.split(self.batch_size * self.mega_batches):
            by_length = self._sorted(mega_batch, 0)
            if self.lengths.shape[1] == 2:
                windows = by_length.split(self.batch_size * self.response_window)
                by_length = torch.cat([self._sorted(window, 1) for window in windows])
            batches += by_length.split(self.batch_size)
        whole = [batch for batch in batches if len(batch) == self.batch_size]
        partial = [batch for batch in batches if len(batch) < self.batch_size]
        shuffled = [whole[index] for index in torch.randperm(len(whole), generator=generator)]
        return iter(torch.cat(shuffled + partial).tolist() if batches else [])

    def _sorted(self, rows: torch.Tensor, column: int) -> torch.Tensor:
        """`rows` from the longest to the shortest in length column `column`."""
        return rows[torch.argsort(self.lengths[rows, column], descending=True, stable=True)]


class ResumableDataLoader(DataLoader):
    """A `DataLoader` that counts the batches it yields in the current epoch and can skip that many on resume.

    It takes exactly `DataLoader`'s arguments, so Lightning can re-create it with a distributed sampler.
    """

    def __iter__(self):
        skip = getattr(self, "_skip_batches", 0)
        self._skip_batches = 0
        self._batches_yielded = 0
        for index, batch in enumerate(super().__iter__()):
            if index < skip:
                continue  # consumed by the run that wrote the checkpoint
            self._batches_yielded = index + 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_yielded": getattr(self, "_batches_yielded", 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        yielded = int(state.get("batches_yielded", 0))
        # A checkpoint written after the last batch of an epoch resumes with the next epoch, which Lightning has
        # already counted: skipping the finished epoch's batches again would empty that next epoch instead.
        self._skip_batches = yielded if yielded < len(self) else 0
