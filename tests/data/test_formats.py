"""Every format and file type through the data module, checked against the real HH-RLHF rows."""

from __future__ import annotations

import copy
import gzip
import json

import datasets
import pytest
from transformers import AutoTokenizer

from dvpo_lightning.data.bad_rows import BadRow
from dvpo_lightning.data.formats import ChatRenderer, detect_format, get_format, parse_record
from tests.helpers.data import (
    bpe_tokenizer_dir,
    hh_messages,
    make_module,
    read_hh,
    texts_by_row,
    write_jsonl,
)

ROWS = 120
ASSISTANT = "\n\nAssistant:"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return bpe_tokenizer_dir(tmp_path_factory.mktemp("bpe"))


@pytest.fixture
def hh(hh_file):
    return read_hh(hh_file, ROWS)


def split_hh(text: str) -> tuple[str, str]:
    cut = text.rindex(ASSISTANT) + len(ASSISTANT)
    return text[:cut], text[cut:]


def expected_hh(row: dict) -> tuple[str, str, str]:
    """Prompt, chosen and rejected of an HH row, split by hand at the last assistant turn."""
    (prompt, chosen), (_, rejected) = split_hh(row["chosen"]), split_hh(row["rejected"])
    return prompt, chosen, rejected


def usable_hh(row: dict) -> bool:
    (prompt, chosen), (other_prompt, rejected) = split_hh(row["chosen"]), split_hh(row["rejected"])
    return prompt == other_prompt and bool(chosen.strip() and rejected.strip()) and chosen != rejected


def load(dataset, tmp_path, tokenizer_dir, mode="pairs", **options):
    module = make_module(dataset, tmp_path, tokenizer=tokenizer_dir, mode=mode, **options)
    module.setup()
    return module


def test_hh_file_parses_directly(hh_file, hh, tmp_path, tokenizer_dir):
    module = load(hh_file, tmp_path, tokenizer_dir, max_samples=ROWS)
    texts = texts_by_row(module)
    kept = [index for index, row in enumerate(hh) if usable_hh(row)]
    assert sorted(texts) == kept and len(kept) >= 100
    assert sum(module.skipped.values()) == ROWS - len(kept)
    for index, decoded in texts.items():
        assert decoded == expected_hh(hh[index])


def test_long_hh_conversations_keep_their_end_instead_of_being_dropped(hh_file, hh, tmp_path, tokenizer_dir):
    options = {"max_samples": ROWS, "max_prompt_length": 128, "val_size": 0}
    dropping = load(hh_file, tmp_path, tokenizer_dir, prompt_truncation="drop", **options)
    module = load(hh_file, tmp_path, tokenizer_dir, **options)
    too_long = dropping.skipped["prompt_too_long"]
    assert too_long > ROWS // 10  # what dropping would cost
    assert "prompt_too_long" not in module.skipped and module.prompts_truncated == too_long
    assert len(module.train_dataset) == len(dropping.train_dataset) + too_long
    # A cut prompt ends, as every HH prompt does, with the assistant's turn being asked for.
    ends = {
        module.tokenizer.decode(ids).rstrip().endswith("Assistant:")
        for ids in module.train_dataset["prompt_ids"]
    }
    assert ends == {True}


def check_matches_hh(module, hh, expected=expected_hh, usable=usable_hh):
    """Every usable HH row, and only those, decodes to the texts split by hand."""
    texts = texts_by_row(module)
    assert sorted(texts) == [index for index, row in enumerate(hh) if usable(row)]
    for index, decoded in texts.items():
        assert decoded == expected(hh[index])


def test_pairs_file_matches_hh(hh, tmp_path, tokenizer_dir):
    rows = [dict(zip(("prompt", "chosen", "rejected"), expected_hh(row))) for row in hh]
    check_matches_hh(load(write_jsonl(tmp_path / "pairs.jsonl", rows), tmp_path, tokenizer_dir), hh)


def test_messages_conversations_match_hh(hh, tmp_path, tokenizer_dir):
    rows = [{"chosen": hh_messages(row["chosen"]), "rejected": hh_messages(row["rejected"])} for row in hh]
    assert all(row["chosen"] and row["rejected"] for row in rows)  # the sample converts exactly
    check_matches_hh(load(write_jsonl(tmp_path / "messages.jsonl", rows), tmp_path, tokenizer_dir), hh)


def test_messages_with_a_prompt_list_match_hh(hh, tmp_path, tokenizer_dir):
    rows = []
    for row in hh:
        chosen, rejected = hh_messages(row["chosen"]), hh_messages(row["rejected"])
        rows.append({"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]})
    check_matches_hh(load(write_jsonl(tmp_path / "completions.jsonl", rows), tmp_path, tokenizer_dir), hh)


def test_sft_prompt_response_and_messages_files(hh, tmp_path, tokenizer_dir):
    plain = [{"prompt": expected_hh(row)[0], "response": expected_hh(row)[1]} for row in hh]
    chats = [{"messages": hh_messages(row["chosen"])} for row in hh]
    for name, rows in (("sft.jsonl", plain), ("sft_messages.jsonl", chats)):
        module = load(write_jsonl(tmp_path / name, rows), tmp_path, tokenizer_dir, mode="sft")
        check_matches_hh(
            module,
            hh,
            expected=lambda row: expected_hh(row)[:2],
            usable=lambda row: expected_hh(row)[1].strip(),
        )


def test_prompt_strings_and_message_lists(hh, tmp_path, tokenizer_dir):
    rows = [{"prompt": expected_hh(row)[0]} for row in hh[:40]]
    rows += [{"prompt": [{"role": "user", "content": "Hello?"}]}]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    module = load(path, tmp_path, tokenizer_dir, mode="prompts", batch_size=4)
    texts = texts_by_row(module)
    unique = {row["prompt"] if isinstance(row["prompt"], str) else None for row in rows} - {None}
    assert len(texts) == len(unique) + 1  # repeated prompts are kept once
    assert texts[40] == ("\n\nHuman: Hello?" + ASSISTANT,)
    for index, (prompt,) in texts.items():
        assert index == 40 or prompt == rows[index]["prompt"]


def test_trls_prompt_completion_rows_are_sft_data_as_strings_and_as_message_lists(tmp_path, tokenizer_dir):
    strings = [{"prompt": f"question {i}?", "completion": f" answer {i}."} for i in range(6)]
    chats = [
        {
            "prompt": [{"role": "user", "content": f"question {i}?"}],
            "completion": [{"role": "assistant", "content": f"answer {i}."}],
        }
        for i in range(6)
    ]
    for name, rows, expected in (
        ("strings.jsonl", strings, lambda i: (f"question {i}?", f" answer {i}.")),
        ("chats.jsonl", chats, lambda i: (f"\n\nHuman: question {i}?{ASSISTANT}", f" answer {i}.")),
    ):
        assert detect_format(rows, name) == "prompt_completion"
        module = load(write_jsonl(tmp_path / name, rows), tmp_path, tokenizer_dir, mode="sft", val_size=1)
        assert texts_by_row(module) == {i: expected(i) for i in range(6)}


def test_columns_no_format_reads_are_named_with_those_that_were_used(tmp_path, tokenizer_dir):
    rows = [{"prompt": f"question {i}?", "completion": "yes", "source": "forum"} for i in range(6)]
    with pytest.warns(UserWarning, match=r"read as 'prompt_completion' data from its columns \['completion', "
                      r"'prompt'\]; no format reads all of them, so \['source'\] are ignored"):  # fmt: skip
        load(write_jsonl(tmp_path / "unpaired.jsonl", rows), tmp_path, tokenizer_dir, mode="sft", val_size=1)


def test_pairs_without_rejected_responses_say_so(tmp_path, tokenizer_dir):
    rows = [{"prompt": f"question {i}?", "chosen": "yes"} for i in range(6)]
    with (
        pytest.warns(UserWarning, match=r"\['chosen'\] are ignored"),
        pytest.raises(
            ValueError,
            match=r"'prompts' data \(its columns: \['chosen', 'prompt'\]\); no row has a 'rejected' response",
        ),
    ):
        load(write_jsonl(tmp_path / "no_rejected.jsonl", rows), tmp_path, tokenizer_dir, val_size=1)
    nulls = [{**row, "rejected": None} for row in rows]
    with pytest.raises(ValueError, match=r"no usable rows after filtering \(skipped: missing_field 6 \(every row: "
                       r"no 'rejected'\)\)"):  # fmt: skip
        load(write_jsonl(tmp_path / "null_rejected.jsonl", nulls), tmp_path, tokenizer_dir, val_size=1)


@pytest.mark.parametrize("kind", ["json", "parquet", "dataset_dir", "dataset_dict_dir", "jsonl_gz"])
def test_other_file_types_give_the_same_rows(kind, hh, tmp_path, tokenizer_dir):
    rows = [dict(zip(("prompt", "chosen", "rejected"), expected_hh(row))) for row in hh[:60]]
    table = datasets.Dataset.from_list(rows)
    if kind == "json":
        (path := tmp_path / "rows.json").write_text(json.dumps(rows))
    elif kind == "parquet":
        table.to_parquet(path := tmp_path / "rows.parquet")
    elif kind == "dataset_dir":
        table.save_to_disk(path := tmp_path / "saved")
    elif kind == "dataset_dict_dir":
        datasets.DatasetDict({"test": table}).save_to_disk(path := tmp_path / "saved_dict")
    else:
        path = tmp_path / "rows.jsonl.gz"
        path.write_bytes(gzip.compress(write_jsonl(tmp_path / "plain.jsonl", rows).read_bytes()))
    split = "test" if kind == "dataset_dict_dir" else "train"
    texts = texts_by_row(load(path, tmp_path, tokenizer_dir, split=split))
    assert len(texts) == len(rows)
    for index, decoded in texts.items():
        assert decoded == expected_hh(hh[index])


def test_missing_split_of_a_saved_dataset_dict_is_named(tmp_path, tokenizer_dir):
    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"prompt": "p"}])}).save_to_disk(tmp_path / "d")
    with pytest.raises(ValueError, match=r"splits \['test'\], not 'train'"):
        load(tmp_path / "d", tmp_path, tokenizer_dir, mode="prompts")


def test_format_override_beats_detection(tmp_path, tokenizer_dir):
    rows = [{"prompt": f"question {i}?", "chosen": "yes", "rejected": "no"} for i in range(6)]
    module = load(
        write_jsonl(tmp_path / "p.jsonl", rows),
        tmp_path,
        tokenizer_dir,
        format="prompts",
        mode="prompts",
        batch_size=2,
        val_size=1,
    )
    assert len(module.train_dataset) == 5
    with pytest.raises(ValueError, match="mode 'pairs' needs preference pairs"):
        load(tmp_path / "p.jsonl", tmp_path, tokenizer_dir, format="prompts", mode="pairs")


def test_detect_format_from_columns():
    message = [{"role": "assistant", "content": "hi"}]
    assert detect_format([{"chosen": "a", "rejected": "b"}], "x") == "hh"
    assert detect_format([{"prompt": "p", "chosen": "a", "rejected": "b"}], "x") == "pairs"
    assert detect_format([{"chosen": message, "rejected": message}], "x") == "messages"
    assert detect_format([{"prompt": "p", "chosen": message, "rejected": message}], "x") == "messages"
    assert detect_format([{"prompt": "p", "response": "r"}], "x") == "sft"
    assert detect_format([{"messages": message}], "x") == "sft"
    assert detect_format([{"prompt": "p", "completion": "c"}], "x") == "prompt_completion"
    assert detect_format([{"prompt": "p"}], "x") == "prompts"
    with pytest.raises(ValueError, match=r"cannot tell the format of x from its columns \['question'\]"):
        detect_format([{"question": "q"}], "x")


CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_chat_template_renders_and_strips_the_closing_eos(tmp_path, tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = CHATML
    record = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    example = parse_record(record, get_format("messages"), ChatRenderer(tokenizer), scores=False)
    assert example == {
        "prompt": "<|user|>\nHi<eos>\n<|assistant|>\n",
        "chosen": "Hello!",
        "rejected": "Go away.",
    }


def test_template_whose_prompt_is_not_a_prefix_is_a_bad_row(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # The generation prompt says "<|bot|>" but a written answer says "<|assistant|>".
    tokenizer.chat_template = CHATML.replace("<|assistant|>", "<|bot|>")
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    with pytest.raises(BadRow, match="not a prefix") as caught:
        parse_record(record, get_format("sft"), ChatRenderer(tokenizer), scores=False)
    assert caught.value.reason == "template_mismatch"


def test_default_template_is_hh_style():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (
        ChatRenderer().render(messages, generation_prompt=True)
        == "\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant:"
    )


def test_template_that_refuses_a_conversation_is_a_bad_row(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with the user') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    record = {"prompt": [{"role": "system", "content": "Hi"}]}
    with pytest.raises(BadRow, match="refused the conversation: start with the user") as caught:
        parse_record(record, get_format("prompts"), ChatRenderer(tokenizer), scores=False)
    assert caught.value.reason == "template_mismatch"


def test_template_with_no_prompt_messages_is_a_bad_row(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = CHATML
    only_answers = {
        "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    for record, fmt in (({"prompt": []}, "prompts"), (only_answers, "messages")):
        with pytest.raises(BadRow, match="no messages before the answer") as caught:
            parse_record(record, get_format(fmt), ChatRenderer(tokenizer), scores=False)
        assert caught.value.reason == "empty_prompt"


def test_hh_chat_reads_hh_transcripts_as_conversations(hh_file, hh, tmp_path, tokenizer_dir, word_tokenizer):
    # Without a chat template, the default template gives back the transcripts: the same texts as `hh`.
    check_matches_hh(load(hh_file, tmp_path, tokenizer_dir, max_samples=ROWS, format="hh_chat"), hh)
    # With one, each turn goes through it, and the answer loses the EOS text that closes its turn.
    template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    chat_tokenizer = copy.copy(word_tokenizer)
    chat_tokenizer.chat_template = template
    renderer = ChatRenderer(chat_tokenizer)
    record = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a cat?\n\nAssistant: a dog",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a cat?\n\nAssistant: no",
    }
    assert get_format("hh_chat").parse(record, renderer) == {
        "prompt": "<user>hi<eos><assistant>hello<eos><user>a cat?<eos><assistant>",
        "chosen": "a dog",
        "rejected": "no",
    }
