"""Running models on `Sequences`: per-token log-probs and values of the response block, aligned with it."""

from __future__ import annotations

import torch
from torch import nn

from dvpo_lightning.algos import entropy_from_logits, head_token_logprobs, last_token_values, token_logprobs
from dvpo_lightning.models import (
    PerToken,
    is_lora,
    output_head,
    recomputes_activations,
    response_logits,
    response_token_outputs,
    response_values,
    shared_prompt_response_logits,
    shared_prompt_response_token_outputs,
)
from dvpo_lightning.rl.sequences import Sequences


def policy_logprobs(
    policy: nn.Module, sequences: Sequences, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs `[B, R]` of the response tokens under `policy` (and their entropies, without gradient, when asked).

    Logits are divided by the sampling temperature, so the log-probs are those of the distribution the
    responses were sampled from. The LM head runs a chunk of real tokens at a time (`algos.head_token_logprobs`):
    no `[B, R, V]` logits exist, in the forward or the backward, except for models whose logits are not a plain
    head projection (`models.output_head`), which go through their whole logits.
    """
    head = output_head(policy)
    if head is not None:
        labels, mask = sequences.response_input_ids, sequences.response_mask
        head_trains = any(parameter.requires_grad for parameter in head.parameters())

        def per_token(hidden: torch.Tensor, columns: slice) -> tuple:  # hidden [B, r, H]: response `columns`
            return head_token_logprobs(
                hidden,
                head,
                labels[:, columns],
                mask=mask[:, columns],
                temperature=temperature,
                with_entropy=with_entropy,
                head_trains=head_trains,
            )

        return sequence_token_outputs(policy, sequences, per_token)
    logits = sequence_logits(policy, sequences)  # [B, R, V]
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = token_logprobs(logits, sequences.response_input_ids, mask=sequences.response_mask)
    entropy = None
    if with_entropy:  # a metric: computed outside autograd, so no logits-sized tensor waits for the backward
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach(), mask=sequences.response_mask)
    return logprobs, entropy


def sequence_logits(policy: nn.Module, sequences: Sequences) -> torch.Tensor:
    """Logits `[B, R, V]` that predict each response token; rows that share a prompt (`prompt_of_row`) read it once,
    unless the policy recomputes activations (gradient checkpointing turns its KV cache off)."""
    if _reads_shared_prompts(policy, sequences):
        return shared_prompt_response_logits(policy, *_shared_prompt_inputs(sequences))
    input_ids, attention_mask = sequences.model_inputs()
    return response_logits(policy, input_ids, attention_mask, sequences.response_length)


def sequence_token_outputs(policy: nn.Module, sequences: Sequences, per_token: PerToken) -> tuple:
    """`per_token` (see `models.PerToken`) of the hidden states that predict each response token, in the layout of
    `sequence_logits`."""
    if _reads_shared_prompts(policy, sequences):
        return shared_prompt_response_token_outputs(policy, *_shared_prompt_inputs(sequences), per_token)
    input_ids, attention_mask = sequences.model_inputs()
    return response_token_outputs(policy, input_ids, attention_mask, sequences.response_length, per_token)


def _reads_shared_prompts(policy: nn.Module, sequences: Sequences) -> bool:
    return sequences.prompt_of_row is not None and not recomputes_activations(policy)


def _shared_prompt_inputs(sequences: Sequences) -> tuple[torch.Tensor, ...]:
    return (
        sequences.prompt_input_ids,
        sequences.prompt_attention_mask,
        sequences.prompt_of_row,
        sequences.response_input_ids,
        sequences.response_mask,
    )


def state_values(value_model: nn.Module, sequences: Sequences) -> torch.Tensor:
    """Values `[B, R + 1]`: index `t` is V(s_t) before response token `t`; index `T_i` the complete response."""
    input_ids, attention_mask = sequences.model_inputs()
    return response_values(value_model, input_ids, attention_mask, sequences.response_length)


def state_mask(response_mask: torch.Tensor, include_final: bool = True) -> torch.Tensor:
    """Mask `[B, R + 1]` of the states a response visits: s_1..s_T, and the complete response if asked.

    Response masks are right-padded, so state `t` is visited when token `t` is real, and the complete
    response sits one column after the last real token.
    """
    first = torch.ones_like(response_mask[:, :1])
    if include_final:
        return torch.cat([first, response_mask], dim=-1)
    return torch.cat([response_mask, torch.zeros_like(first)], dim=-1)


def final_values(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """The value `[B]` of each complete response (the output at its last real token) from `[B, R + 1]` values."""
    return last_token_values(values[:, 1:], response_mask)


@torch.no_grad()
def reference_logprobs(
    policy: nn.Module, reference: nn.Module | None, sequences: Sequences, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs `[B, R]` of the response tokens under the reference: `reference`, or, when it is None, the LoRA
    `policy` with its adapter disabled (its base weights are the reference; no second copy in memory)."""
    if reference is not None:
        return policy_logprobs(reference, sequences, temperature)[0]
    if not is_lora(policy):
        raise RuntimeError("the policy has no LoRA adapter to disable and no reference model was built")
    with policy.disable_adapter():
        return policy_logprobs(policy, sequences, temperature)[0]
