"""How much work a training step did: samples and tokens, and the time and FLOPs it took, added up.

The counting rule (`count_work`):

- If `training_step` returned a dict with `num_samples` / `num_tokens` (the on-policy modules do: prompts, and
  tokens generated + processed), those numbers are used.
- Otherwise samples = the first dimension of the first tensor in the batch (a dict's values in order, a
  list/tuple's items, or the batch itself), and tokens = the sum of every tensor in the batch whose key ends
  with `_mask` (`attention_mask`, `prompt_attention_mask`, `response_mask`, `chosen_mask`, ...): real tokens
  in the batch, padding excluded, each counted once even if the model reads it twice (a DPO prompt, once with
  each response). A module that wants another count returns `num_tokens`. A batch without such a key (and no
  `num_tokens`) has an unknown token count: no token rate is reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


def _whole_number(value: Any, what: str) -> int:
    """`value` (a number or a one-element tensor) as an int >= 0, or a clear error naming `what`."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be a single number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
        raise ValueError(f"{what} must be a non-negative whole number, got {value!r}")
    return int(value)


def batch_samples(batch: Any) -> int:
    """The first dimension of the first tensor in the batch."""
    items = (
        batch.values()
        if isinstance(batch, Mapping)
        else batch
        if isinstance(batch, (list, tuple))
        else [batch]
    )
    for item in items:
        if isinstance(item, torch.Tensor) and item.ndim > 0:
            return item.shape[0]
    raise ValueError(
        f"cannot count the samples of a batch of type {type(batch).__name__}: it holds no tensor with a batch "
        "dimension; return `num_samples` from training_step"
    )


def batch_tokens(batch: Any) -> int | None:
    """The sum of the batch's `*_mask` tensors (None if it has none)."""
    if not isinstance(batch, Mapping):
        return None
    masks = {
        key: value
        for key, value in batch.items()
        if str(key).endswith("_mask") and isinstance(value, torch.Tensor)
    }
    if not masks:
        return None
    return sum(_whole_number(mask.sum(), f"the sum of the batch's {key!r}") for key, mask in masks.items())


def count_work(outputs: Any, batch: Any) -> tuple[int, int | None]:
    """(samples, tokens) of one training step, by the rule in the module docstring."""
    reported = outputs if isinstance(outputs, Mapping) else {}
    if "num_samples" in reported:
        samples = _whole_number(reported["num_samples"], "training_step's num_samples")
    else:
        samples = batch_samples(batch)
    if "num_tokens" in reported:
        tokens = _whole_number(reported["num_tokens"], "training_step's num_tokens")
    else:
        tokens = batch_tokens(batch)
    return samples, tokens


@dataclass
class Tally:
    """Work and time added up over some training steps; a count becomes None once one step's is unknown."""

    seconds: float = 0.0
    samples: int = 0
    tokens: int | None = 0
    flops: float | None = 0.0

    def add(self, seconds: float, samples: int, tokens: int | None, flops: float | None) -> None:
        self.seconds += seconds
        self.samples += samples
        self.tokens = None if self.tokens is None or tokens is None else self.tokens + tokens
        self.flops = None if self.flops is None or flops is None else self.flops + flops

    def rates(self, available_flops: float | None) -> dict[str, float]:
        """samples_per_sec, tokens_per_sec when tokens are known, mfu when FLOPs and the device's peak are known."""
        if self.seconds <= 0:
            return {}
        rates = {"samples_per_sec": self.samples / self.seconds}
        if self.tokens is not None:
            rates["tokens_per_sec"] = self.tokens / self.seconds
        if self.flops is not None and available_flops:
            rates["mfu"] = self.flops / self.seconds / available_flops
        return rates
