"""KTOModule's own choices: which mismatched pairs estimate the KL reference point, and batch sizes that allow it.
(Training, padding, checkpoints and the export are tested with the other preference stages, in test_preference.)"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.stages import build_stage, first_batch, quick_trainer, topics_data


def test_each_prompt_is_paired_with_the_previous_rows_response(tokenizer, cache):
    batch = first_batch(topics_data(cache, "unpaired"))
    sequences = build_stage("kto", tokenizer).matched_and_mismatched(batch)
    size = batch["label"].shape[0]
    assert torch.equal(sequences.prompt_input_ids[size:], batch["prompt_input_ids"])
    assert torch.equal(sequences.response_input_ids[:size], batch["response_input_ids"])
    for row in range(size):
        assert torch.equal(sequences.response_input_ids[size + row], batch["response_input_ids"][row - 1])
        assert torch.equal(sequences.response_mask[size + row], batch["response_mask"][row - 1])


def test_a_batch_size_of_one_is_refused_naming_the_option(tokenizer, cache, tmp_path):
    with pytest.raises(ValueError, match=r"data.batch_size=1: KTO .* at least 2 rows"):
        quick_trainer(tmp_path, max_steps=1).fit(
            build_stage("kto", tokenizer), datamodule=topics_data(cache, batch_size=1)
        )
