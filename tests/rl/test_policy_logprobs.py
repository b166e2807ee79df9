"""Policy log-probs through the LM head a chunk of real tokens at a time (`algos.head_token_logprobs`) equal those of
the whole `[B, R, V]` logits (`rl.sequence_logits`), in value and gradient, in every layout, and no chunk is larger
than asked."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dvpo_lightning.algos import entropy_from_logits, token_logprobs
from dvpo_lightning.algos import logprobs as logprobs_module
from dvpo_lightning.models import LoraSpec, ModelSpec, build_policy, output_head
from dvpo_lightning.rl import pair_sequences, policy_logprobs, reference_logprobs
from dvpo_lightning.rl.forward import sequence_logits
from tests.helpers.onpolicy import perturb
from tests.helpers.stages import TINY_GPT2, tiny
from tests.models.test_shared_prompts import pairs_batch

SPECS = {
    "llama": tiny(),  # tied embeddings: the head trains through the embedding
    "gpt2": ModelSpec(arch=dict(TINY_GPT2)),
    "lora": tiny(lora=LoraSpec(r=4, alpha=8)),  # a frozen head
}
TOKENS_PER_CHUNK = 3
TEMPERATURE = 0.8


@pytest.fixture
def small_chunks(monkeypatch, tokenizer):
    monkeypatch.setattr(logprobs_module, "DEFAULT_CHUNK_BYTES", 4 * len(tokenizer) * TOKENS_PER_CHUNK)


def whole_logits_logprobs(policy, sequences, temperature):
    """The path every caller took before: the response logits whole, then `token_logprobs`."""
    logits = sequence_logits(policy, sequences) / temperature
    mask = sequences.response_mask
    return token_logprobs(logits, sequences.response_input_ids, mask=mask), entropy_from_logits(
        logits.detach(), mask=mask
    )


def outputs_and_gradients(policy, sequences, compute):
    policy.zero_grad()
    logprobs, entropy = compute(policy, sequences, TEMPERATURE)
    weights = torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)
    (logprobs * weights).sum().backward()
    gradients = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    return logprobs.detach(), entropy, gradients


@pytest.mark.parametrize("shared", [False, True], ids=["whole-rows", "shared-prompts"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_chunked_head_gives_the_log_probs_entropies_and_gradients_of_whole_logits(
    name, shared, tokenizer, small_chunks
):
    policy = build_policy(SPECS[name], tokenizer)
    perturb(policy)
    sequences = pair_sequences(pairs_batch(tokenizer))  # padded prompts and responses of several lengths
    if not shared:
        sequences = dataclasses.replace(sequences, prompt_of_row=None)
    head_rows = []
    output_head(policy).register_forward_hook(
        lambda module, args, output: head_rows.append(args[0].shape[:-1])
    )
    chunked = outputs_and_gradients(
        policy, sequences, lambda *args: policy_logprobs(*args, with_entropy=True)
    )
    assert all(rows.numel() <= TOKENS_PER_CHUNK for rows in head_rows), head_rows  # never the whole logits
    assert sum(rows.numel() for rows in head_rows) >= int(sequences.response_mask.sum())
    whole = outputs_and_gradients(policy, sequences, whole_logits_logprobs)
    mask = sequences.response_mask
    torch.testing.assert_close(chunked[0], whole[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=1e-5)
    assert (chunked[0][~mask] == 0).all()
    assert chunked[2].keys() == whole[2].keys() and chunked[2]
    for parameter, gradient in whole[2].items():
        torch.testing.assert_close(chunked[2][parameter], gradient, rtol=1e-4, atol=1e-6, msg=parameter)


def test_reference_log_probs_of_a_lora_policy_are_its_base_models_without_a_graph(tokenizer, small_chunks):
    """The disabled adapter is the reference: the numbers of the base model, under no_grad, with no second model."""
    spec = tiny(lora=LoraSpec(r=4, alpha=8))
    policy = build_policy(spec, tokenizer)
    perturb(
        policy.get_base_model().lm_head
    )  # the adapters alone would leave the base model's numbers unchanged
    for layer in policy.modules():
        if hasattr(layer, "lora_B"):
            perturb(layer.lora_B)
    sequences = dataclasses.replace(pair_sequences(pairs_batch(tokenizer)), prompt_of_row=None)
    reference = reference_logprobs(policy, None, sequences)
    assert not reference.requires_grad
    base = build_policy(dataclasses.replace(spec, lora=None), tokenizer)
    base.load_state_dict(policy.get_base_model().state_dict(), strict=False)
    with torch.no_grad():
        expected, _ = whole_logits_logprobs(base, sequences, 1.0)
        adapted, _ = policy_logprobs(policy, sequences)
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(adapted, expected, atol=1e-3)


def test_models_whose_logits_are_transformed_use_their_own_logits(tokenizer):
    """Gemma 2 soft-caps its logits after the head: the head alone would give other numbers, so it is not used."""
    arch = {
        "model_type": "gemma2",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "final_logit_softcapping": 0.5,  # small: the capping changes every number
    }
    policy = build_policy(ModelSpec(arch=arch), tokenizer)
    assert output_head(policy) is None
    sequences = dataclasses.replace(pair_sequences(pairs_batch(tokenizer)), prompt_of_row=None)
    with torch.no_grad():
        logprobs, _ = policy_logprobs(policy, sequences)
        expected, _ = whole_logits_logprobs(policy, sequences, 1.0)
    torch.testing.assert_close(logprobs, expected)
