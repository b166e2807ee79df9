"""Tokenising canonical rows (see `RLHFDataModule` for the policy this implements).

- Prompt: the tokenizer's ids with its default special tokens (a BOS where it adds one; a BOS that a
  chat template already wrote into the text is not doubled). A prompt longer than `max_prompt_length` is
  handled by `prompt_truncation` (`PROMPT_TRUNCATIONS`): `keep_end` keeps its last tokens (the latest turns
  of a conversation, next to the response that answers them) after its BOS, `keep_start` its first ones,
  `drop` marks the row `prompt_too_long`. A cut prompt is counted in `prompt_truncated`.
- Response: the text's ids without special tokens, then EOS (a stored response is complete). One
  longer than `max_response_length` is cut to it, which cuts its EOS: the row is kept as an
  unfinished response and counted in `truncated`.
"""

from __future__ import annotations

import datasets
from transformers import PreTrainedTokenizerBase

TOKEN_IDS = datasets.Sequence(datasets.Value("int32"))
PROMPT_TRUNCATIONS = ("keep_end", "keep_start", "drop")


def token_features(rows: datasets.Features, responses: tuple[str, ...]) -> datasets.Features:
    """The features of `rows` after `tokenize_batch`: ids of the prompt and of each response column."""
    return datasets.Features(
        {
            **rows,
            "prompt_ids": TOKEN_IDS,
            **{f"{key}_ids": TOKEN_IDS for key in responses},
            "truncated": datasets.Value("int8"),  # how many of the row's responses were cut
            "prompt_truncated": datasets.Value("int8"),  # whether the row's prompt was cut
        }
    )


def tokenize_batch(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    responses: tuple[str, ...],
    max_prompt_length: int,
    max_response_length: int,
    prompt_truncation: str = "drop",
) -> dict[str, list]:
    """`Dataset.map(batched=True)` function over canonical rows; `responses` names the text columns
    to tokenise as responses (`("response",)`, `("chosen", "rejected")` or `()`)."""
    out = {
        "reason": list(batch["reason"]),
        "detail": list(batch["detail"]),
        "truncated": [0] * len(batch["row"]),
        "prompt_truncated": [0] * len(batch["row"]),
    }
    out["prompt_ids"] = prompt_token_ids(batch["prompt"], tokenizer)
    for index, ids in enumerate(out["prompt_ids"]):
        if len(ids) <= max_prompt_length or out["reason"][index]:
            continue
        if prompt_truncation == "drop":
            out["reason"][index] = "prompt_too_long"
            out["detail"][index] = f"{len(ids)} prompt tokens > max_prompt_length={max_prompt_length}"
            continue
        out["prompt_ids"][index] = truncate_prompt(
            ids, max_prompt_length, prompt_truncation, tokenizer.bos_token_id
        )
        out["prompt_truncated"][index] = 1
    for key in responses:
        column = out[f"{key}_ids"] = []
        for index, ids in enumerate(tokenizer(batch[key], add_special_tokens=False)["input_ids"]):
            ids = [*ids, tokenizer.eos_token_id]
            if len(ids) > max_response_length:
                ids = ids[:max_response_length]
                out["truncated"][index] += 1
            column.append(ids)
    return out


def prompt_token_ids(prompts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """The ids of each prompt text, as the policy sees prompts in training and generation (see the module
    docstring)."""
    bos_id = tokenizer.bos_token_id
    return [
        ids[1:] if bos_id is not None and ids[:2] == [bos_id, bos_id] else ids
        for ids in tokenizer(prompts)["input_ids"]
    ]


def truncate_prompt(ids: list[int], length: int, mode: str, bos_id: int | None) -> list[int]:
    """`ids` cut to `length` tokens by `mode`; a leading BOS stays first, as the model always saw it."""
    head = ids[:1] if bos_id is not None and ids[:1] == [bos_id] and length > 1 else []
    body = ids[len(head) :]
    keep = length - len(head)
    return head + (body[-keep:] if mode == "keep_end" else body[:keep])
