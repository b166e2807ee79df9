"""Per-token log-probabilities and entropies from logits, a chunk of tokens at a time.

`log_softmax(logits)` would materialise a second `[B, T, V]` tensor (and in float32 when the logits
are bf16): with a 150k vocabulary and 4k tokens that is gigabytes for numbers of which we keep one
per token. Instead, `log p(y) = logit_y - logsumexp(logits)`, computed on `chunk_size` tokens at a
time in float32: the extra memory is about `chunk_size * V * 4` bytes, and the result is float32.
Under autograd the float32 copy of each chunk is kept for the backward pass when the logits are
in half precision (float32 logits are used as they are).

`logits[:, t]` must already be the logits that predict `labels[:, t]` (for a causal LM, the
output at the position before the token: slice before calling).

`head_token_logprobs` goes one step further and never builds the logits whole, in the forward or the backward:
it takes the final hidden states and the LM head, and projects a chunk of tokens at a time (the idea of Liger
Kernel's fused linear cross-entropy). With a 49k vocabulary, 8 rows of 512 tokens have 800 MB of float32 logits;
a chunk has `DEFAULT_CHUNK_BYTES`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dvpo_lightning.algos.masked import checked_mask

DEFAULT_CHUNK_SIZE = 512
#: float32 logits of one chunk of `head_token_logprobs`: 64 MiB is 341 tokens of a 49k vocabulary, and a whole
#: batch for the small vocabularies of toy models (one chunk: no overhead).
DEFAULT_CHUNK_BYTES = 64 * 2**20


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
        return _picked_logprobs(chunk, labels[rows, columns])

    result = _chunked(logprobs_of, logits, chunk_size)
    return result if real is None else torch.where(real, result, 0)


def _picked_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """`log softmax(logits)[labels]`: float32 logits `[..., V]`, labels `[...]`."""
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - logits.logsumexp(dim=-1)


def _entropy(logits: Tensor) -> Tensor:
    """`H = logsumexp(z) - sum_v softmax(z)_v * z_v` (no log of a probability): float32 `[..., V]` -> `[...]`."""
    log_normaliser = logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.exp(logits - log_normaliser)
    return log_normaliser.squeeze(-1) - (probs * logits).sum(dim=-1)


def entropy_from_logits(
    logits: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE, mask: Tensor | None = None
) -> Tensor:
    """Entropy of `softmax(logits)` per token: `[B, T, V]` -> float32 `[B, T]`; 0 on padding with `mask`.

    `H = logsumexp(z) - sum_v softmax(z)_v * z_v`, which needs no log of a probability.
    """
    _check_logits(logits, logits.shape[:2], chunk_size)

    def entropy_of(chunk: Tensor, _rows: slice, _columns: slice) -> Tensor:
        return _entropy(chunk)

    result = _chunked(entropy_of, logits, chunk_size)
    return result if mask is None else torch.where(checked_mask(mask, result=result), result, 0)


def head_token_logprobs(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    labels: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    head_trains: bool = False,
    chunk_bytes: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`token_logprobs(head(hidden) / temperature, labels)` (and, with `with_entropy`, `entropy_from_logits` of the
    same logits, without gradient), computed a chunk of tokens at a time so that the `[B, T, V]` logits never exist.

    hidden `[B, T, H]` (the final hidden states that predict `labels` `[B, T]`), `head` maps `[n, H]` to logits
    `[n, V]`; results float32 `[B, T]`, 0 on padding. Only the real tokens of `mask` go through the head.
    Under autograd, `head_trains` says whether the head has parameters that train: their gradient needs each
    chunk's logits again, so each chunk is recomputed in the backward (activation checkpointing, one more head
    projection); a frozen head (LoRA, a frozen model) instead has the gradient with respect to its input taken
    in the forward, chunk by chunk, so the backward is one multiplication. `chunk_bytes`: the float32 logits of
    one chunk (None: `DEFAULT_CHUNK_BYTES`).
    """
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"hidden must have shape [B, T, H] with [B, T] = {tuple(labels.shape)}, got {tuple(hidden.shape)}"
        )
    real = torch.ones_like(labels, dtype=torch.bool) if mask is None else checked_mask(mask, labels=labels)
    tokens, token_labels = hidden[real], labels[real]  # [N, H], [N]: the real tokens only
    vocab_size = _vocab_size(head, tokens[:1])
    _check_labels(torch.where(real, labels, 0), vocab_size)

    def per_chunk(chunk: Tensor, chunk_labels: Tensor) -> tuple[Tensor, Tensor]:
        logits = head(chunk).float()  # [n, V]
        if temperature != 1.0:
            logits = logits / temperature
        entropy = _entropy(logits.detach()) if with_entropy else logits.new_zeros(0)
        return _picked_logprobs(logits, chunk_labels), entropy

    chunk_size = max(1, (chunk_bytes or DEFAULT_CHUNK_BYTES) // (4 * vocab_size))  # tokens
    chunks = zip(tokens.split(chunk_size), token_labels.split(chunk_size))
    if not (torch.is_grad_enabled() and tokens.requires_grad):
        with torch.no_grad():
            outputs = [per_chunk(*chunk) for chunk in chunks]
    elif head_trains:
        outputs = [checkpoint(per_chunk, *chunk, use_reentrant=False) for chunk in chunks]
    else:
        outputs = [_FrozenHeadLogprobs.apply(*chunk, per_chunk) for chunk in chunks]
    logprobs, entropy = (torch.cat(parts) for parts in zip(*outputs))  # [N] each
    zeros = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    return zeros.masked_scatter(real, logprobs), zeros.masked_scatter(real, entropy) if with_entropy else None


class _FrozenHeadLogprobs(torch.autograd.Function):
    """Log-probs `[n]` of a chunk of tokens through a frozen head, whose gradient with respect to the hidden states
    `[n, H]` is taken in the forward: token `i`'s log-prob depends on its own hidden state only, so the gradient of
    their sum is every token's own, and the backward scales it by the incoming gradient. Nothing of `[n, V]` is
    kept."""

    @staticmethod
    def forward(ctx, chunk: Tensor, chunk_labels: Tensor, per_chunk) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            inputs = chunk.detach().requires_grad_(True)
            logprobs, entropy = per_chunk(inputs, chunk_labels)
            (gradient,) = torch.autograd.grad(logprobs.sum(), inputs)  # [n, H]
        ctx.save_for_backward(gradient)
        ctx.mark_non_differentiable(entropy)
        return logprobs.detach(), entropy

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor, _grad_entropy: Tensor) -> tuple[Tensor, None, None]:
        (gradient,) = ctx.saved_tensors
        return grad_logprobs.unsqueeze(-1).to(gradient.dtype) * gradient, None, None


def _vocab_size(head: Callable[[Tensor], Tensor], probe: Tensor) -> int:
    """The head's output width: its `out_features` (an `nn.Linear`, LoRA-wrapped or not), else measured on `probe`."""
    width = getattr(head, "out_features", None)
    if width is not None or probe.shape[0] == 0:
        return width or 1
    with torch.no_grad():
        return head(probe).shape[-1]


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
