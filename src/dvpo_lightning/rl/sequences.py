"""The batches every model call and every rollout take: a prompt block followed by a response block.

The layout (docs/design.md, "Sequence layout"): `prompt_input_ids` / `prompt_attention_mask` `[B, P]` left-padded,
then `response_input_ids` / `response_mask` `[B, R]` right-padded. Everything computed from them is aligned with the
response block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dvpo_lightning.data.collate import concat_prompt_response


@dataclass
class Sequences:
    """A prompt block and a response block, the unit every model call takes."""

    prompt_input_ids: torch.Tensor  # [B, P]
    prompt_attention_mask: torch.Tensor  # [B, P] bool
    response_input_ids: torch.Tensor  # [B, R]
    response_mask: torch.Tensor  # [B, R] bool
    #: [B] long: row `i` answers the prompt of row `prompt_of_row[i]` (a pair's chosen and rejected responses); a
    #: policy then runs each prompt once (`models.shared_prompt_response_logits`). None: rows share no prompt.
    prompt_of_row: torch.Tensor | None = field(default=None, kw_only=True)

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


@dataclass
class Responses(Sequences):
    """Sampled responses: prompts left-padded, responses right-padded and cut after the first EOS."""

    finished: torch.Tensor  # [B] bool, the response ended with EOS

    @property
    def lengths(self) -> torch.Tensor:  # [B]
        return self.response_mask.sum(-1)

    @property
    def total_lengths(self) -> torch.Tensor:  # [B] real prompt and response tokens of each row
        return self.prompt_attention_mask.sum(-1) + self.response_mask.sum(-1)

    def select(self, rows: torch.Tensor | slice, width: int | None = None) -> Responses:
        """Rows `rows`, with the response block cut to `width` columns when given and the prompt block to their
        longest prompt (padding columns only: no number changes)."""
        prompt_mask = self.prompt_attention_mask[rows]
        prompt_columns = slice(prompt_mask.shape[1] - int(prompt_mask.sum(-1).max()), None)
        columns = slice(None, width)
        return Responses(
            self.prompt_input_ids[rows][:, prompt_columns],
            prompt_mask[:, prompt_columns],
            self.response_input_ids[rows][:, columns],
            self.response_mask[rows][:, columns],
            self.finished[rows],
        )


def sft_sequences(batch: dict) -> Sequences:
    return Sequences(
        batch["prompt_input_ids"],
        batch["prompt_attention_mask"],
        batch["response_input_ids"],
        batch["response_mask"],
    )


def pair_sequences(batch: dict) -> Sequences:
    """Chosen and rejected responses of a pairs batch as one `[2B]` batch: rows `:B` chosen, `B:` rejected, the
    rejected rows marked as answering the prompts of the chosen ones (a policy reads each prompt once)."""
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    return Sequences(
        torch.cat([prompt_ids, prompt_ids]),
        torch.cat([prompt_mask, prompt_mask]),
        torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
        torch.cat([batch["chosen_mask"], batch["rejected_mask"]]),
        prompt_of_row=torch.arange(len(prompt_ids), device=prompt_ids.device).repeat(2),
    )
