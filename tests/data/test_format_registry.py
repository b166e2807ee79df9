"""The format registry: a new format is one class, detection order is explicit, SFT rows use `response`."""

from __future__ import annotations

import pytest

from dvpo_lightning.data.formats import (
    ChatRenderer,
    DataFormat,
    detect_format,
    format_names,
    get_format,
    normalize_batch,
    parse_record,
    register_format,
    text,
    unregister_format,
)
from tests.helpers.data import make_module, texts_by_row, write_jsonl

BUILT_IN = ("messages", "pairs", "hh", "kto", "sft", "prompt_completion", "prompts", "hh_chat")


@pytest.fixture
def registry_restored():
    """Whatever a test registers is removed after it, so other tests see the built-in formats only."""
    yield
    for name in set(format_names()) - set(BUILT_IN):
        unregister_format(name)


@pytest.fixture
def word_tokenizer_dir(word_tokenizer, tmp_path):
    word_tokenizer.save_pretrained(tmp_path / "tokenizer")
    return str(tmp_path / "tokenizer")


def test_a_new_format_is_one_class_and_loads_through_the_data_module(
    registry_restored, tmp_path, word_tokenizer_dir
):
    # The whole of a new format: what a `data/formats/<name>.py` module would hold.
    @register_format
    class QuestionAnswerFormat(DataFormat):
        name = "qa"
        kind = "sft"
        detection_order = 45  # after `sft`, so `prompt`+`response` data stays sft
        expects = "question+answer"

        def detect(self, columns, records):
            return {"question", "answer"} <= columns

        def parse(self, record, renderer):
            return {"prompt": text(record, "question") + " .", "response": text(record, "answer")}

    rows = [
        {"question": "the cat", "answer": "the cat sleeps ."},
        {"question": "a dog", "answer": 3},  # wrong_type
        {"question": "the sun"},  # missing_field
        {"question": "a moon", "answer": "  "},  # empty_response
        {"question": "the dog", "answer": "a dog runs ."},
    ]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    module = make_module(path, tmp_path, tokenizer=word_tokenizer_dir, mode="sft", val_size=0, batch_size=2)
    module.setup()  # the format is detected from the columns
    assert module.skipped == {"wrong_type": 1, "missing_field": 1, "empty_response": 1}
    assert texts_by_row(module) == {0: ("the cat .", "the cat sleeps ."), 4: ("the dog .", "a dog runs .")}
    batch = next(iter(module.train_dataloader()))  # an sft batch: prompt and response blocks
    last = batch["response_input_ids"].gather(1, batch["response_mask"].sum(-1, keepdim=True) - 1)
    assert len(last) == 2 and (last == module.tokenizer.eos_token_id).all()

    named = make_module(path, tmp_path, tokenizer=word_tokenizer_dir, mode="pairs", format="qa")
    with pytest.raises(ValueError, match="mode 'pairs' needs preference pairs, but .* is 'qa' data"):
        named.setup()
    assert detect_format([{"prompt": "p", "response": "r", "question": "q", "answer": "a"}], "x") == "sft"


def test_detection_asks_the_formats_in_their_order(registry_restored):
    assert format_names() == BUILT_IN

    @register_format
    class EarlyPairs(DataFormat):
        name = "early"
        kind = "pairs"
        detection_order = 15  # between `messages` and `pairs`
        expects = "prompt+chosen+rejected (early)"

        def detect(self, columns, records):
            return {"prompt", "chosen", "rejected"} <= columns

        def parse(self, record, renderer):
            return {key: text(record, key) for key in ("prompt", "chosen", "rejected")}

    assert format_names() == ("messages", "early", *BUILT_IN[1:])
    assert detect_format([{"prompt": "p", "chosen": "a", "rejected": "b"}], "x") == "early"
    message = [{"role": "assistant", "content": "hi"}]
    assert detect_format([{"prompt": "p", "chosen": message, "rejected": message}], "x") == "messages"
    with pytest.raises(
        ValueError, match=r"expected, in this order, chosen\+rejected message lists \(messages\), "
    ):
        detect_format([{"question": "q"}], "x")


def test_registration_refuses_ambiguity_and_mistakes(registry_restored, tmp_path):
    def format_class(name, order, kind="sft", detect=True):
        namespace = {"name": name, "kind": kind, "detection_order": order, "parse": lambda self, r, c: {}}
        if detect:
            namespace["detect"] = lambda self, columns, records: False
        return type(f"Format_{name}", (DataFormat,), namespace)

    with pytest.raises(ValueError, match="'sft' is already registered; pass replace=True"):
        register_format(format_class("sft", None, detect=False))
    with pytest.raises(ValueError, match="'tie' and 'pairs' have the same detection_order 20"):
        register_format(format_class("tie", 20))
    with pytest.raises(ValueError, match="'half' must define both detect and detection_order"):
        register_format(format_class("half", 60, detect=False))
    with pytest.raises(ValueError, match="'odd' has kind 'chat'"):
        register_format(format_class("odd", None, kind="chat", detect=False))
    assert format_names() == BUILT_IN

    register_format(format_class("mine", None, detect=False))
    replacement = register_format(replace=True)(format_class("mine", 61))
    assert isinstance(get_format("mine"), replacement)
    # Now detected (order 61): after the other detected formats, before `hh_chat`, which is only used by name.
    assert format_names() == (*BUILT_IN[:-1], "mine", "hh_chat")
    unregister_format("mine")
    with pytest.raises(ValueError, match=f"unknown data format 'mine'; known: {', '.join(BUILT_IN)}"):
        get_format("mine")
    with pytest.raises(ValueError, match=f"format must be one of {', '.join(BUILT_IN)}"):
        make_module("builtin:topics", tmp_path, format="mine")


def test_a_parser_giving_the_wrong_columns_is_named(registry_restored):
    @register_format
    class Sloppy(DataFormat):
        name = "sloppy"
        kind = "sft"

        def parse(self, record, renderer):
            return {"prompt": record["q"], "chosen": record["a"]}  # sft rows have a `response`

    with pytest.raises(
        TypeError, match=r"'sloppy' parsed a record into \{'prompt': 'str', 'chosen': 'str'\}"
    ):
        parse_record({"q": "x", "a": "y"}, get_format("sloppy"), ChatRenderer(), scores=False)


def test_sft_rows_fill_response_and_pair_data_trains_sft_on_its_chosen(tmp_path):
    batch = {"prompt": ["p", "q"], "response": ["r", ""]}
    rows = normalize_batch(batch, [0, 1], get_format("sft"), ChatRenderer(), scores=False)
    assert (rows["prompt"], rows["response"], rows["chosen"], rows["rejected"]) == (
        ["p", ""],
        ["r", ""],
        [""] * 2,
        [""] * 2,
    )
    assert rows["reason"] == ["", "empty_response"] and rows["detail"][1] == "the response is empty"

    module = make_module("builtin:topics", tmp_path, mode="sft", builtin_size=16, val_size=0)
    module.setup()
    pairs = module.task.preference_dataset(16)
    eos, limit = module.tokenizer.eos_token_id, module.max_response_length
    for row in module.train_dataset:
        chosen = module.tokenizer(pairs[row["row"]]["chosen"], add_special_tokens=False)["input_ids"]
        assert row["response_ids"] == [*chosen, eos][:limit]
