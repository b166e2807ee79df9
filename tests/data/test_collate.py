"""Split-layout collation and the concat / position-id helpers, on hand-written rows."""

from __future__ import annotations

import pickle

import pytest
import torch

from dvpo_lightning.data.collate import (
    Collator,
    concat_prompt_response,
    pad_sequences,
    position_ids_from_mask,
)

PAD = 0


def test_pad_sequences_left_and_right():
    ids, mask = pad_sequences([[5, 6, 7], [8]], PAD, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    ids, mask = pad_sequences([[5, 6, 7], [8]], PAD, "right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    with pytest.raises(ValueError, match="side"):
        pad_sequences([[1]], PAD, "middle")


def test_sft_batch_left_prompt_right_response():
    rows = [
        {"row": 4, "prompt_ids": [11, 12, 13], "response_ids": [21, 2]},
        {"row": 9, "prompt_ids": [14], "response_ids": [22, 23, 24, 2]},
    ]
    batch = Collator("sft", PAD)(rows)
    assert set(batch) == {
        "index",
        "prompt_input_ids",
        "prompt_attention_mask",
        "response_input_ids",
        "response_mask",
    }
    assert batch["index"].tolist() == [4, 9]
    assert batch["prompt_input_ids"].tolist() == [[11, 12, 13], [0, 0, 14]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["response_input_ids"].tolist() == [[21, 2, 0, 0], [22, 23, 24, 2]]
    assert batch["response_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_pairs_batch_shares_response_width_and_carries_scores():
    rows = [
        {
            "row": 0,
            "prompt_ids": [11],
            "chosen_ids": [21, 2],
            "rejected_ids": [31, 32, 33, 2],
            "chosen_score": 1.5,
            "rejected_score": -0.5,
        },
        {
            "row": 1,
            "prompt_ids": [12, 13],
            "chosen_ids": [22, 2],
            "rejected_ids": [34],
            "chosen_score": 0.25,
            "rejected_score": 0.0,
        },
    ]
    batch = Collator("pairs", PAD, scores=True)(rows)
    assert batch["chosen_input_ids"].tolist() == [[21, 2, 0, 0], [22, 2, 0, 0]]
    assert batch["rejected_input_ids"].tolist() == [[31, 32, 33, 2], [34, 0, 0, 0]]
    assert batch["chosen_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert batch["rejected_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch["prompt_input_ids"].tolist() == [[0, 11], [12, 13]]
    assert batch["chosen_score"].tolist() == [1.5, 0.25]
    assert batch["rejected_score"].tolist() == [-0.5, 0.0]
    assert batch["chosen_score"].dtype == torch.float32
    assert "chosen_score" not in Collator("pairs", PAD)(rows)


def test_prompts_batch_has_only_the_prompt_block():
    batch = Collator("prompts", PAD)([{"row": 3, "prompt_ids": [7, 8]}, {"row": 5, "prompt_ids": [9]}])
    assert set(batch) == {"index", "prompt_input_ids", "prompt_attention_mask"}
    assert batch["prompt_input_ids"].tolist() == [[7, 8], [0, 9]]


def test_collator_checks_mode_and_pickles():
    with pytest.raises(ValueError, match="mode"):
        Collator("rollouts", PAD)
    collator = pickle.loads(pickle.dumps(Collator("pairs", 3, scores=True)))
    assert collator == Collator("pairs", 3, scores=True)


def test_concat_and_position_ids_ignore_padding():
    prompt_ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    prompt_mask = prompt_ids != 0
    response_ids = torch.tensor([[11, 2, 0], [12, 13, 2]])
    response_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    input_ids, attention_mask = concat_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask)
    assert input_ids.tolist() == [[0, 0, 5, 6, 11, 2, 0], [7, 8, 9, 10, 12, 13, 2]]
    assert attention_mask.dtype == torch.bool
    assert attention_mask.long().tolist() == [[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]]
    # Real tokens are numbered 0, 1, 2, ... in both rows; left padding sits at 0.
    assert position_ids_from_mask(attention_mask).tolist() == [[0, 0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 4, 5, 6]]
    with pytest.raises(ValueError, match="same shape"):
        concat_prompt_response(prompt_ids, prompt_mask[:, :2], response_ids, response_mask)
