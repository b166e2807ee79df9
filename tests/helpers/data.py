"""Builders shared by the data tests (this module holds no tests): files of rows, HH samples, a BPE
tokenizer, and a data module with small, test-friendly defaults."""

from __future__ import annotations

import gzip
import itertools
import json
import re
from pathlib import Path

from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.data.formats import ChatRenderer
from dvpo_lightning.data.tokenizers import train_bpe_tokenizer

# Enough text for a byte-level BPE; any other text still round-trips (unknown merges fall back to bytes).
BPE_TEXTS = [
    "\n\nHuman: How do I bake bread at home?\n\nAssistant: Mix flour, water, salt and yeast, then wait.",
    "\n\nHuman: Tell me something mean.\n\nAssistant: I'd rather not; can I help with something else?",
] * 10
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
NO_LIMIT = 10**6


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> Path:
    """`rows` as JSON lines; `raw_lines` puts verbatim text at some 0-based line indices."""
    lines = [json.dumps(row) for row in rows]
    for index, text in sorted((raw_lines or {}).items()):
        lines.insert(index, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def read_hh(hh_file: Path, count: int) -> list[dict]:
    """The first `count` rows of the real HH-RLHF file."""
    with gzip.open(hh_file, "rt", encoding="utf-8") as file:
        return [json.loads(line) for line in itertools.islice(file, count)]


def hh_messages(transcript: str) -> list[dict] | None:
    """An HH transcript as `{role, content}` messages, or None when the default template would not
    render it back to the same text."""
    parts = HH_TURN.split(transcript)
    if parts[0]:
        return None
    messages = [
        {"role": "user" if speaker == "Human" else "assistant", "content": content}
        for speaker, content in zip(parts[1::2], parts[2::2])
    ]
    return messages if ChatRenderer().render(messages, generation_prompt=False) == transcript else None


def bpe_tokenizer_dir(directory: Path) -> str:
    """A byte-level BPE tokenizer directory (round-trips any text exactly)."""
    return train_bpe_tokenizer(BPE_TEXTS, 300, directory).name_or_path


def make_module(dataset, tmp_path: Path, **overrides) -> RLHFDataModule:
    """A data module caching under `tmp_path`, with no length limits unless asked for."""
    options = {
        "cache_dir": str(tmp_path / "cache"),
        "max_prompt_length": NO_LIMIT,
        "max_response_length": NO_LIMIT,
        **overrides,
    }
    return RLHFDataModule(str(dataset), **options)


def texts_by_row(module: RLHFDataModule) -> dict[int, tuple[str, ...]]:
    """Decoded `(prompt, response[, rejected])` of every row (train and validation), by source row id.

    Responses must end with EOS (not truncated); it is removed before decoding.
    """
    tokenizer, texts = module.tokenizer, {}
    for dataset in (module.train_dataset, module.val_dataset):
        for row in dataset:
            decoded = [tokenizer.decode(row["prompt_ids"])]
            for key in ("response_ids", "chosen_ids", "rejected_ids"):
                if key in row:
                    assert row[key][-1] == tokenizer.eos_token_id
                    decoded.append(tokenizer.decode(row[key][:-1]))
            texts[row["row"]] = tuple(decoded)
    return texts
