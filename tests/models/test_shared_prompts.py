"""Rows that share a prompt read it once (`models.shared_prompt_response_logits`): a pair's chosen and rejected
responses cost one prompt pass, and every number -- log-probs and their gradients -- is that of the whole rows."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dvpo_lightning.algos import masked_sum
from dvpo_lightning.models import LoraSpec, ModelSpec, build_policy
from dvpo_lightning.rl import pair_sequences, policy_logprobs
from tests.helpers.onpolicy import hand_built_rollout, perturb
from tests.helpers.stages import TINY_GPT2, tiny

SPECS = {
    "llama": tiny(),
    "gpt2": ModelSpec(arch=dict(TINY_GPT2)),  # learned positions: a wrong position id shows
    "lora": tiny(lora=LoraSpec(r=4, alpha=8)),
}


def pairs_batch(tokenizer) -> dict:
    """Four prompts of 3, 5, 2 and 4 tokens, with chosen and rejected responses of other lengths (padded)."""
    rollout = hand_built_rollout(tokenizer)
    rejected_ids, rejected_mask = rollout.response_input_ids.flip(0), rollout.response_mask.flip(0)
    return {
        "prompt_input_ids": rollout.prompt_input_ids,
        "prompt_attention_mask": rollout.prompt_attention_mask,
        "chosen_input_ids": rollout.response_input_ids,
        "chosen_mask": rollout.response_mask,
        "rejected_input_ids": rejected_ids,
        "rejected_mask": rejected_mask,
    }


def logps_and_gradients(policy, sequences) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    policy.zero_grad()
    logprobs, _ = policy_logprobs(policy, sequences)
    sequence_logps = masked_sum(logprobs, sequences.response_mask, dim=-1)  # [2B]
    (sequence_logps * torch.linspace(-1, 1, len(sequence_logps))).sum().backward()
    gradients = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    return logprobs.detach(), gradients


@pytest.mark.parametrize("name", sorted(SPECS))
def test_shared_prompts_give_the_log_probs_and_gradients_of_whole_rows(name, tokenizer):
    policy = build_policy(SPECS[name], tokenizer)
    perturb(policy)
    shared = pair_sequences(pairs_batch(tokenizer))
    whole = dataclasses.replace(shared, prompt_of_row=None)
    prompt_rows = []
    policy.register_forward_pre_hook(
        lambda module, args, kwargs: prompt_rows.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    shared_logps, shared_gradients = logps_and_gradients(policy, shared)
    assert prompt_rows[0] == (4, 5)  # the four prompts, once: not eight rows
    whole_logps, whole_gradients = logps_and_gradients(policy, whole)
    mask = shared.response_mask
    torch.testing.assert_close(shared_logps[mask], whole_logps[mask], rtol=0, atol=1e-5)
    assert shared_gradients.keys() == whole_gradients.keys() and shared_gradients
    for parameter, gradient in whole_gradients.items():
        torch.testing.assert_close(shared_gradients[parameter], gradient, rtol=1e-4, atol=1e-6, msg=parameter)


def test_gradient_checkpointing_reads_every_row_whole(tokenizer):
    """Recomputing activations turns the KV cache off, so a checkpointed policy runs the rows whole."""
    policy = build_policy(tiny(gradient_checkpointing=True), tokenizer).train()
    shapes = []
    policy.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    logprobs, _ = policy_logprobs(policy, pair_sequences(pairs_batch(tokenizer)))
    assert shapes == [(8, 10)] and logprobs.requires_grad
