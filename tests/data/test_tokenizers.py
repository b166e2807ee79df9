"""Tokenizers of the data module: trained byte-level BPE, distinct pad tokens, spec parsing."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dvpo_lightning.data.tokenizers import (
    bpe_vocab_size,
    ensure_pad_token,
    load_tokenizer,
    train_bpe_tokenizer,
)
from tests.helpers.tiny import make_word_tokenizer

TEXTS = [
    "\n\nHuman: What is the capital of France?\n\nAssistant:",
    " Paris is the capital of France.",
    " I think it is Lyon, but I am not sure.",
    "Ünïcödé, emoji 🙂, tabs\tand  double  spaces — all bytes.",
] * 5


def test_bpe_round_trips_text_exactly_and_loads_from_its_directory(tmp_path):
    tokenizer = train_bpe_tokenizer(TEXTS, 300, tmp_path)
    unseen = "Zebra\u00a0crossings: 42 ≠ 43!\n\n  end ✓"
    for text in [*TEXTS[:4], unseen]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<eos>", 1)
    assert len(tokenizer) <= 300
    (directory,) = (tmp_path / "tokenizers").iterdir()
    assert directory.name.startswith("bpe-300-")
    reloaded = AutoTokenizer.from_pretrained(directory)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    # Nothing is left behind by the staged write.
    assert [path.name for path in (tmp_path / "tokenizers").iterdir()] == [directory.name]


def test_bpe_training_is_deterministic_and_keyed_by_data_and_size(tmp_path):
    first = train_bpe_tokenizer(TEXTS, 300, tmp_path / "a")
    second = train_bpe_tokenizer(TEXTS, 300, tmp_path / "b")
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    train_bpe_tokenizer(TEXTS, 280, tmp_path / "a")
    train_bpe_tokenizer(TEXTS[:3], 300, tmp_path / "a")
    assert len(list((tmp_path / "a" / "tokenizers").iterdir())) == 3


def test_bpe_reuses_its_cached_directory(tmp_path):
    train_bpe_tokenizer(TEXTS, 300, tmp_path)
    (directory,) = (tmp_path / "tokenizers").iterdir()
    marker = directory / "marker"
    marker.write_text("kept")
    train_bpe_tokenizer(TEXTS, 300, tmp_path)
    assert marker.read_text() == "kept"


def test_bpe_spec_parsing():
    assert bpe_vocab_size("bpe:512") == 512
    assert bpe_vocab_size("gpt2") is None
    assert bpe_vocab_size(None) is None
    for bad in ("bpe:", "bpe:abc", "bpe:100"):
        with pytest.raises(ValueError, match="bpe:<vocab size>"):
            bpe_vocab_size(bad)


def test_missing_pad_gets_a_distinct_pad_token(tmp_path):
    tokenizer = make_word_tokenizer(tmp_path, pad=False)
    assert tokenizer.pad_token is None
    size = len(tokenizer)
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == size + 1


def test_pad_equal_to_eos_is_replaced(tmp_path):
    tokenizer = make_word_tokenizer(tmp_path, pad=False)
    tokenizer.pad_token = tokenizer.eos_token
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_existing_distinct_pad_is_kept(word_tokenizer):
    size, pad_id = len(word_tokenizer), word_tokenizer.pad_token_id
    ensure_pad_token(word_tokenizer)
    assert (len(word_tokenizer), word_tokenizer.pad_token_id) == (size, pad_id)


def test_tokenizer_without_eos_is_refused(tmp_path):
    tokenizer = make_word_tokenizer(tmp_path)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        ensure_pad_token(tokenizer)


def test_unloadable_tokenizer_names_the_spec(tmp_path):
    with pytest.raises(ValueError, match="could not load the tokenizer .*missing-dir"):
        load_tokenizer(str(tmp_path / "missing-dir"))
