"""Chunked token log-probs and entropies against `log_softmax`, and against hand numbers."""

from __future__ import annotations

import math

import pytest
import torch

from dvpo_lightning.algos import entropy_from_logits, head_token_logprobs, token_logprobs


def _random_case(seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 7, generator=generator) * 3
    labels = torch.randint(0, 7, (3, 5), generator=generator)
    return logits, labels


def test_hand_computed_two_token_vocabulary():
    # Logits (0, ln 3): probabilities 1/4 and 3/4, entropy -(1/4 ln 1/4 + 3/4 ln 3/4).
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    assert token_logprobs(logits, torch.tensor([[0, 1]]))[0].tolist() == pytest.approx(
        [math.log(0.25), math.log(0.75)]
    )
    expected_entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(logits)[0].tolist() == pytest.approx([expected_entropy] * 2)


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 512])
def test_matches_log_softmax_for_every_chunk_size(chunk_size):
    logits, labels = _random_case()
    reference = torch.log_softmax(logits, dim=-1)
    expected = reference.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, labels, chunk_size=chunk_size), expected)
    expected_entropy = -(reference.exp() * reference).sum(dim=-1)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=chunk_size), expected_entropy)


def test_gradient_matches_log_softmax():
    logits, labels = _random_case(seed=1)
    weights = torch.randn(3, 5)
    chunked_logits = logits.clone().requires_grad_(True)
    (token_logprobs(chunked_logits, labels, chunk_size=2) * weights).sum().backward()
    plain_logits = logits.clone().requires_grad_(True)
    log_probs = torch.log_softmax(plain_logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (log_probs * weights).sum().backward()
    torch.testing.assert_close(chunked_logits.grad, plain_logits.grad)


def test_sliced_model_output_and_half_precision_give_float32():
    """A causal LM's logits sliced to the response are a non-contiguous view; bf16 logits are upcast."""
    logits, labels = _random_case(seed=2)
    full_output = torch.cat([torch.zeros(3, 2, 7), logits], dim=1)  # a 2-token prompt before
    sliced = full_output[:, 2:]
    assert not sliced.is_contiguous()
    torch.testing.assert_close(token_logprobs(sliced, labels, chunk_size=3), token_logprobs(logits, labels))
    half = token_logprobs(logits.to(torch.bfloat16), labels)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, token_logprobs(logits.to(torch.bfloat16).float(), labels))


def test_mask_zeroes_padding_and_allows_ignore_labels():
    logits, labels = _random_case(seed=3)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    padded_labels = torch.where(mask, labels, -100)
    masked = token_logprobs(logits, padded_labels, mask=mask)
    assert masked[0, 3:].tolist() == [0.0, 0.0]
    torch.testing.assert_close(masked[mask], token_logprobs(logits, labels)[mask])
    entropy = entropy_from_logits(logits, mask=mask)
    assert entropy[0, 3:].tolist() == [0.0, 0.0]


def test_label_outside_vocabulary_is_named_by_position():
    logits, labels = _random_case()
    labels[1, 2] = 7
    with pytest.raises(ValueError, match=r"label 7 at position \(1, 2\) is outside the vocabulary \[0, 7\)"):
        token_logprobs(logits, labels)


def test_bad_shapes_and_chunk_size_are_errors():
    logits, labels = _random_case()
    with pytest.raises(ValueError, match="logits must have shape"):
        token_logprobs(logits[:, :4], labels)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(logits, labels, chunk_size=0)


@pytest.mark.parametrize("head_trains", [False, True])
@pytest.mark.parametrize("chunk_bytes", [4 * 7, 4 * 7 * 4, None])  # 1 token, 4 tokens, all tokens per chunk
def test_head_log_probs_match_the_whole_logits_in_value_and_gradient(head_trains, chunk_bytes):
    """The LM head applied a chunk of real tokens at a time gives the numbers and gradients (with respect to the
    hidden states and, when it trains, the head) of `token_logprobs` on the whole logits; padding gives 0."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 5, 4, generator=generator)
    labels = torch.randint(0, 7, (3, 5), generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    labels = torch.where(mask, labels, -100)  # padded labels need not be tokens
    weights = torch.randn(3, 5, generator=generator)
    head = torch.nn.Linear(4, 7)
    head.requires_grad_(head_trains)

    def gradients(compute):
        head.zero_grad()
        inputs = hidden.clone().requires_grad_(True)
        logprobs, entropy = compute(inputs)
        (logprobs * weights).sum().backward()
        return logprobs.detach(), entropy, inputs.grad, head.weight.grad

    def whole(inputs):
        logits = head(inputs) / 0.7
        return token_logprobs(logits, labels, mask=mask), entropy_from_logits(logits.detach(), mask=mask)

    def chunked(inputs):
        return head_token_logprobs(
            inputs,
            head,
            labels,
            mask,
            0.7,
            with_entropy=True,
            head_trains=head_trains,
            chunk_bytes=chunk_bytes,
        )

    expected, got = gradients(whole), gradients(chunked)
    for name, want, have in zip(("logprobs", "entropy", "hidden grad", "head grad"), expected, got):
        if want is None:
            assert have is None, name
        else:
            torch.testing.assert_close(have, want, msg=name)
    assert (got[0][~mask] == 0).all() and (got[1][~mask] == 0).all()


def test_head_log_probs_without_gradient_and_label_errors():
    head = torch.nn.Linear(4, 7)
    hidden, labels = torch.randn(2, 3, 4), torch.tensor([[0, 1, 2], [3, 4, 5]])
    with torch.no_grad():
        logprobs, entropy = head_token_logprobs(hidden, head, labels, chunk_bytes=8)
    torch.testing.assert_close(logprobs, token_logprobs(head(hidden).detach(), labels))
    assert entropy is None and not logprobs.requires_grad
    with pytest.raises(ValueError, match=r"label 9 at position \(1, 2\)"):
        head_token_logprobs(hidden, head, torch.tensor([[0, 1, 2], [3, 4, 9]]))
    with pytest.raises(ValueError, match="hidden must have shape"):
        head_token_logprobs(hidden[0], head, labels)
