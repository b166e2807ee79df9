"""Bad rows: one of each kind is skipped and counted, reported once; strict mode fails on the first."""

from __future__ import annotations

import json
import warnings

import pytest

from dvpo_lightning.data.bad_rows import BadRowError, BadRows
from tests.helpers.data import make_module, write_jsonl

GOOD = {"prompt": "the cat", "chosen": "the cat sleeps .", "rejected": "the dog runs ."}
LONG_PROMPT = " ".join(["the red apple"] * 4)  # 12 words > max_prompt_length=8

# 0-based line index -> (row, reason); the file's line numbers are one more.
BAD_ROWS = {
    1: ("{oops", "invalid_json"),
    2: ("[1, 2]", "invalid_json"),
    3: ({"prompt": "the cat", "chosen": "the cat runs ."}, "missing_field"),
    4: ({**GOOD, "chosen": 5}, "wrong_type"),
    5: ({**GOOD, "prompt": "  "}, "empty_prompt"),
    6: ({**GOOD, "rejected": ""}, "empty_response"),
    7: ({**GOOD, "rejected": GOOD["chosen"]}, "identical_pair"),
    8: ({**GOOD, "prompt": LONG_PROMPT}, "prompt_too_long"),
    10: ({**GOOD, "chosen": None}, "missing_field"),
}
GOOD_LINES = (0, 9, 11, 12, 13, 14)


def bad_file(path):
    lines = {index: row if isinstance(row, str) else json.dumps(row) for index, (row, _) in BAD_ROWS.items()}
    return write_jsonl(path, [GOOD] * len(GOOD_LINES), raw_lines=lines)


def module_for(path, tmp_path, word_tokenizer, **options):
    word_tokenizer.save_pretrained(tmp_path / "tokenizer")
    defaults = {
        "tokenizer": str(tmp_path / "tokenizer"),
        "mode": "pairs",
        "max_prompt_length": 8,
        "prompt_truncation": "drop",
        "val_size": 0,
    }
    return make_module(path, tmp_path, **{**defaults, **options})


def test_each_bad_row_is_skipped_counted_and_reported_once(tmp_path, word_tokenizer):
    path = bad_file(tmp_path / "rows.jsonl")
    module = module_for(path, tmp_path, word_tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.setup()
    assert module.skipped == {
        "invalid_json": 2,
        "missing_field": 2,
        "wrong_type": 1,
        "empty_prompt": 1,
        "empty_response": 1,
        "identical_pair": 1,
        "prompt_too_long": 1,
    }
    assert sorted(module.train_dataset["row"]) == list(GOOD_LINES)
    messages = [str(warning.message) for warning in caught if "bad rows" in str(warning.message)]
    assert len(messages) == 1
    assert messages[0].startswith("RLHFDataModule skipped 9 bad rows")
    assert (
        f"{path}: invalid_json 2 (lines 2, 3), missing_field 2 (lines 4, 11), wrong_type 1 (line 5)"
        in messages[0]
    )
    assert "empty_prompt 1 (line 6), empty_response 1 (line 7), identical_pair 1 (line 8)" in messages[0]
    assert "prompt_too_long 1 (line 9)" in messages[0]


def test_strict_fails_on_the_first_bad_row_naming_file_and_line(tmp_path, word_tokenizer):
    path = bad_file(tmp_path / "rows.jsonl")
    with pytest.raises(BadRowError, match=rf"{path}, line 2: invalid_json \(not valid JSON"):
        module_for(path, tmp_path, word_tokenizer, strict=True).setup()


def test_strict_also_catches_a_prompt_too_long(tmp_path, word_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD, {**GOOD, "prompt": LONG_PROMPT}])
    with pytest.raises(
        BadRowError, match=r"line 2: prompt_too_long \(12 prompt tokens > max_prompt_length=8\)"
    ):
        module_for(path, tmp_path, word_tokenizer, strict=True).setup()


def test_all_bad_rows_is_an_error_with_the_counts(tmp_path, word_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [{**GOOD, "chosen": ""}, {**GOOD, "rejected": 3}])
    with pytest.raises(
        BadRowError,
        match=r"no usable rows after filtering \(skipped: empty_response 1 \(e.g.: the chosen is empty\), "
        r"wrong_type 1 \(e.g.: 'rejected' must be a string, got int\)\)",
    ):
        module_for(path, tmp_path, word_tokenizer).setup()


def test_every_prompt_too_long_is_an_error_with_the_counts(tmp_path, word_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [{**GOOD, "prompt": LONG_PROMPT}] * 3)
    with pytest.raises(BadRowError, match=r"the train split of .* no usable rows .*prompt_too_long 3"):
        module_for(path, tmp_path, word_tokenizer).setup()


def test_hh_prompt_mismatch(tmp_path, word_tokenizer):
    rows = [
        {
            "chosen": "\n\nHuman: the cat\n\nAssistant: the dog",
            "rejected": "\n\nHuman: the cat\n\nAssistant: a sun",
        },
        {
            "chosen": "\n\nHuman: the cat\n\nAssistant: the dog",
            "rejected": "\n\nHuman: a moon\n\nAssistant: a sun",
        },
        {"chosen": "the cat", "rejected": "\n\nHuman: a moon\n\nAssistant: a sun"},
    ]
    module = module_for(
        write_jsonl(tmp_path / "hh.jsonl", rows), tmp_path, word_tokenizer, max_prompt_length=100
    )
    module.setup()
    assert module.skipped == {"prompt_mismatch": 1, "missing_field": 1}
    assert list(module.train_dataset["row"]) == [0]


def test_bad_scores(tmp_path, word_tokenizer):
    rows = [
        {**GOOD, "chosen_score": 1.0, "rejected_score": 0.5},
        {**GOOD, "chosen_score": "high", "rejected_score": 0.5},
        {**GOOD, "chosen_score": True, "rejected_score": 0.5},
        {**GOOD, "chosen_score": 1.0},
    ]
    module = module_for(write_jsonl(tmp_path / "scores.jsonl", rows), tmp_path, word_tokenizer)
    module.setup()
    assert module.skipped == {"wrong_type": 2, "missing_field": 1}
    batch = next(iter(module.train_dataloader()))
    assert batch["chosen_score"].tolist() == [1.0] and batch["rejected_score"].tolist() == [0.5]


def test_summary_shows_the_first_rows_and_elides_the_rest():
    log = BadRows("data.parquet")
    log.add((row, "wrong_type", "x") for row in range(7))
    log.add([(9, "", ""), (10, "empty_prompt", "y")])
    assert log.summary() == "data.parquet: wrong_type 7 (rows 0, 1, 2, 3, 4, ...), empty_prompt 1 (row 10)"
