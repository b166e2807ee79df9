"""Running models on split-layout batches: per-token log-probs and values of the response block.

The layout (docs/design.md): `prompt_input_ids` / `prompt_attention_mask` `[B, P]` left-padded, then
`response_input_ids` / `response_mask` `[B, R]` right-padded. Everything returned is aligned with the
response block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dvpo_lightning.algos import entropy_from_logits, last_token_values, token_logprobs
from dvpo_lightning.data.collate import concat_prompt_response
from dvpo_lightning.models import response_logits, response_values


@dataclass
class Sequences:
    """A prompt block and a response block, the unit every model call takes."""

    prompt_input_ids: torch.Tensor  # [B, P]
    prompt_attention_mask: torch.Tensor  # [B, P] bool
    response_input_ids: torch.Tensor  # [B, R]
    response_mask: torch.Tensor  # [B, R] bool

    def model_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(input_ids, attention_mask)` `[B, P + R]`."""
        return concat_prompt_response(
            self.prompt_input_ids, self.prompt_attention_mask, self.response_input_ids, self.response_mask
        )

    @property
    def response_length(self) -> int:
        return self.response_input_ids.shape[1]

    def select(self, rows: torch.Tensor | slice) -> Sequences:
        return Sequences(
            self.prompt_input_ids[rows],
            self.prompt_attention_mask[rows],
            self.response_input_ids[rows],
            self.response_mask[rows],
        )


def sft_sequences(batch: dict) -> Sequences:
    return Sequences(
        batch["prompt_input_ids"],
        batch["prompt_attention_mask"],
        batch["response_input_ids"],
        batch["response_mask"],
    )


def pair_sequences(batch: dict) -> Sequences:
    """Chosen and rejected responses of a pairs batch as one `[2B]` batch: rows `:B` chosen, `B:` rejected."""
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    return Sequences(
        torch.cat([prompt_ids, prompt_ids]),
        torch.cat([prompt_mask, prompt_mask]),
        torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
        torch.cat([batch["chosen_mask"], batch["rejected_mask"]]),
    )


def policy_logprobs(
    policy: nn.Module, sequences: Sequences, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs `[B, R]` of the response tokens under `policy` (and their entropies, without gradient, when asked).

    Logits are divided by the sampling temperature, so the log-probs are those of the distribution the
    responses were sampled from.
    """
    input_ids, attention_mask = sequences.model_inputs()
    logits = response_logits(policy, input_ids, attention_mask, sequences.response_length)  # [B, R, V]
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = token_logprobs(logits, sequences.response_input_ids, mask=sequences.response_mask)
    entropy = None
    if with_entropy:  # a metric: computed outside autograd, so no logits-sized tensor waits for the backward
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach(), mask=sequences.response_mask)
    return logprobs, entropy


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
