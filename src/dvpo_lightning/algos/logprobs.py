"""Per-token log-probabilities and entropies from logits, a chunk of tokens at a time.

`log_softmax(logits)` would materialise a second `[B, T, V]` tensor (and in float32 when the logits
are bf16): with a 150k vocabulary and 4k tokens that is gigabytes for numbers of which we keep one
per token. Instead, `log p(y) = logit_y - logsumexp(logits)`, computed on `chunk_size` tokens at a
time in float32: the extra memory is about `chunk_size * V * 4` bytes, and the result is float32.
Under autograd the float32 copy of each chunk is kept for the backward pass when the logits are
in half precision (float32 logits are used as they are).

`logits[:, t]` must already be the logits that predict `labels[:, t]` (for a causal LM, the
output at the position before the token: slice before calling).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dvpo_lightning.algos.masked import checked_mask

DEFAULT_CHUNK_SIZE = 512


def token_logprobs(
    logits: Tensor, labels: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE, mask: Tensor | None = None
) -> Tensor:
    """`log softmax(logits)[labels]` per token: logits `[B, T, V]`, labels `[B, T]` -> float32 `[B, T]`.

    With `mask`, padded positions give 0 and their labels may be anything (e.g. -100).
    """
    _check_logits(logits, labels.shape, chunk_size)
    real = None if mask is None else checked_mask(mask, labels=labels)
    if real is not None:
        labels = torch.where(real, labels, 0)
    _check_labels(labels, logits.shape[-1])

    def logprobs_of(chunk: Tensor, rows: slice, columns: slice) -> Tensor:
        picked = chunk.gather(-1, labels[rows, columns].unsqueeze(-1)).squeeze(-1)
        return picked - chunk.logsumexp(dim=-1)

    result = _chunked(logprobs_of, logits, chunk_size)
    return result if real is None else torch.where(real, result, 0)


def entropy_from_logits(
    logits: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE, mask: Tensor | None = None
) -> Tensor:
    """Entropy of `softmax(logits)` per token: `[B, T, V]` -> float32 `[B, T]`; 0 on padding with `mask`.

    `H = logsumexp(z) - sum_v softmax(z)_v * z_v`, which needs no log of a probability.
    """
    _check_logits(logits, logits.shape[:2], chunk_size)

    def entropy_of(chunk: Tensor, _rows: slice, _columns: slice) -> Tensor:
        log_normaliser = chunk.logsumexp(dim=-1, keepdim=True)
        probs = torch.exp(chunk - log_normaliser)
        return log_normaliser.squeeze(-1) - (probs * chunk).sum(dim=-1)

    result = _chunked(entropy_of, logits, chunk_size)
    return result if mask is None else torch.where(checked_mask(mask, result=result), result, 0)


def _chunked(per_chunk, logits: Tensor, chunk_size: int) -> Tensor:
    """Apply `per_chunk(float32 logits [r, c, V], rows, columns) -> [r, c]` to about `chunk_size` tokens at a time.

    Short sequences go in blocks of whole rows (`logits[rows]`), long ones a piece of one row at a time
    (`logits[row:row+1, columns]`): both slices are views even when `logits` is itself a slice of the model's
    output, where a reshape to `[B*T, V]` would copy it all.
    """
    batch, length, _ = logits.shape
    if batch == 0 or length == 0:  # no tokens at all
        return torch.zeros((batch, length), dtype=torch.float32, device=logits.device)
    if length <= chunk_size:
        step = chunk_size // length
        blocks = [slice(start, start + step) for start in range(0, batch, step)]
        return torch.cat([per_chunk(logits[rows].float(), rows, slice(None)) for rows in blocks])
    rows = []
    for row in range(batch):
        pieces = []
        for start in range(0, length, chunk_size):
            block, columns = slice(row, row + 1), slice(start, start + chunk_size)
            pieces.append(per_chunk(logits[block, columns].float(), block, columns))
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows)


def _check_logits(logits: Tensor, token_shape: torch.Size, chunk_size: int) -> None:
    if logits.dim() != 3 or logits.shape[:-1] != token_shape:
        raise ValueError(
            f"logits must have shape [B, T, V] with [B, T] = {tuple(token_shape)}, got {tuple(logits.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")


def _check_labels(labels: Tensor, vocab_size: int) -> None:
    """A label outside the vocabulary is named by its position (gather would fail without saying where)."""
    outside = (labels < 0) | (labels >= vocab_size)
    if outside.any():
        position = tuple(outside.nonzero()[0].tolist())
        raise ValueError(
            f"label {labels[position].item()} at position {position} is outside the vocabulary "
            f"[0, {vocab_size}); mask padded positions with `mask=`"
        )
