"""The few validation rows (prompt, answers, their scores) a stage keeps for the `SampleLogger` callback."""

from __future__ import annotations

import torch

from dvpo_lightning.rl import Responses, Sequences, decode_responses


def scored_pair_rows(
    tokenizer, sequences: Sequences, chosen: torch.Tensor, rejected: torch.Tensor
) -> list[dict]:
    """One row per pair of `sequences` (chosen rows, then rejected) with the scores `[B]` of each side."""
    prompts, texts = decode_responses(tokenizer, sequences)
    size = chosen.shape[0]
    return [
        {
            "prompt": prompts[row],
            "chosen": texts[row],
            "rejected": texts[size + row],
            "chosen_reward": chosen[row].item(),
            "rejected_reward": rejected[row].item(),
        }
        for row in range(size)
    ]


def answer_rows(tokenizer, responses: Responses, per_response: dict[str, torch.Tensor]) -> list[dict]:
    """One row per answer of `responses` with its value of each `per_response` quantity `[B]`."""
    prompts, texts = decode_responses(tokenizer, responses)
    return [
        {
            "prompt": prompt,
            "response": text,
            **{key: value[row].item() for key, value in per_response.items()},
        }
        for row, (prompt, text) in enumerate(zip(prompts, texts))
    ]
