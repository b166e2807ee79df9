"""KTO's data: the `kto` format (prompt, completion, boolean label; strings or message lists), pair data unpaired as
TRL does, the `unpaired` batches, and bad labels counted like any bad row."""

from __future__ import annotations

import warnings

import pytest
import torch

from dvpo_lightning.data.formats import ChatRenderer, detect_format
from tests.helpers.data import bpe_tokenizer_dir, make_module, write_jsonl

ROWS = [
    {
        "prompt": "\n\nHuman: How do I bake bread?\n\nAssistant:",
        "completion": " Mix flour and water.",
        "label": True,
    },
    {
        "prompt": "\n\nHuman: Tell me something mean.\n\nAssistant:",
        "completion": " You are slow.",
        "label": False,
    },
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return bpe_tokenizer_dir(tmp_path_factory.mktemp("bpe"))


def load(path, tmp_path, tokenizer_dir, **options):
    module = make_module(
        path, tmp_path, tokenizer=tokenizer_dir, val_size=0, **{"mode": "unpaired", **options}
    )
    module.setup()
    return module


def rows_by_text(module) -> list[tuple[str, str, bool]]:
    """`(prompt, response without its EOS, label)` of every training row, sorted."""
    tokenizer, rows = module.tokenizer, []
    for row in module.train_dataset:
        assert row["response_ids"][-1] == tokenizer.eos_token_id
        rows.append(
            (tokenizer.decode(row["prompt_ids"]), tokenizer.decode(row["response_ids"][:-1]), row["label"])
        )
    return sorted(rows)


def test_detected_before_the_formats_whose_columns_it_has():
    assert detect_format([{"prompt": "p", "completion": "c", "label": True}], "x") == "kto"
    assert detect_format([{"prompt": "p", "response": "r", "completion": "c", "label": True}], "x") == "kto"


def test_strings_and_message_lists_give_the_same_rows(tmp_path, tokenizer_dir):
    strings = load(write_jsonl(tmp_path / "kto.jsonl", ROWS), tmp_path, tokenizer_dir)
    expected = sorted((row["prompt"], row["completion"], row["label"]) for row in ROWS)
    assert rows_by_text(strings) == expected
    messages = [
        {
            "prompt": [{"role": "user", "content": row["prompt"].split("Human: ")[1].split("\n\n")[0]}],
            "completion": [{"role": "assistant", "content": row["completion"].strip()}],
            "label": row["label"],
        }
        for row in ROWS
    ]
    assert ChatRenderer().prompt(messages[0]["prompt"]) == ROWS[0]["prompt"]  # HH style, as the strings
    chats = load(write_jsonl(tmp_path / "kto_messages.jsonl", messages), tmp_path, tokenizer_dir)
    assert rows_by_text(chats) == expected


def test_pair_data_gives_each_pair_a_desirable_and_an_undesirable_row(tmp_path, tokenizer_dir):
    pairs = [{"prompt": row["prompt"], "chosen": " Yes.", "rejected": row["completion"]} for row in ROWS]
    module = load(write_jsonl(tmp_path / "pairs.jsonl", pairs), tmp_path, tokenizer_dir)
    expected = sorted(
        (pair["prompt"], pair[key], key == "chosen") for pair in pairs for key in ("chosen", "rejected")
    )
    assert rows_by_text(module) == expected
    assert sorted(module.train_dataset["row"]) == [0, 0, 1, 1]  # both name their pair's row


def test_batches_carry_the_labels(tmp_path, tokenizer_dir):
    module = load(write_jsonl(tmp_path / "kto.jsonl", ROWS), tmp_path, tokenizer_dir, batch_size=2)
    batch = next(iter(module.train_dataloader()))
    assert batch["label"].dtype == torch.bool
    assert batch["label"].tolist() == [ROWS[int(index)]["label"] for index in batch["index"]]
    assert batch["response_input_ids"].shape == batch["response_mask"].shape


def test_a_label_that_is_not_a_boolean_is_a_bad_row_named_by_its_line(tmp_path, tokenizer_dir):
    bad = [{**ROWS[0], "label": 1}, {**ROWS[0], "label": "true"}, {**ROWS[1], "label": None}]
    path = write_jsonl(tmp_path / "kto.jsonl", [*ROWS, *bad])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = load(path, tmp_path, tokenizer_dir)
    assert module.skipped == {"wrong_type": 2, "missing_field": 1}
    assert sorted(module.train_dataset["row"]) == [0, 1]
    message = next(str(warning.message) for warning in caught if "bad rows" in str(warning.message))
    assert f"{path}: missing_field 1 (line 5), wrong_type 2 (lines 3, 4)" in message


@pytest.mark.parametrize("mode, needs", [("pairs", "preference pairs"), ("sft", "responses")])
def test_modes_that_cannot_use_labelled_responses_refuse_them(mode, needs, tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match=f"mode '{mode}' needs {needs}, but .* is 'kto' data"):
        load(write_jsonl(tmp_path / "kto.jsonl", ROWS), tmp_path, tokenizer_dir, mode=mode)
