"""Raw records -> canonical rows through a `DataFormat`, with the checks every format shares."""

from __future__ import annotations

import json

import datasets

from dvpo_lightning.data.bad_rows import BadRow
from dvpo_lightning.data.formats.base import (
    CANONICAL_FEATURES,
    LABEL_COLUMN,
    RESPONSE_COLUMNS,
    SCORE_COLUMNS,
    TEXT_COLUMNS,
    DataFormat,
)
from dvpo_lightning.data.formats.chat import ChatRenderer
from dvpo_lightning.data.formats.fields import score

# Raw JSON sources are stored as (row, bytes of the record) and decoded while parsing, so a line that
# is not JSON is a bad row like any other.
JSON_ROW = "__row"
JSON_TEXT = "__json"
# How many leading records detection looks at.
DETECTION_SAMPLE = 100

_EMPTY_ROW = dict.fromkeys(("reason", "detail", *TEXT_COLUMNS), "") | dict.fromkeys(
    (*SCORE_COLUMNS, LABEL_COLUMN)
)


def sample_records(raw: datasets.Dataset, count: int = DETECTION_SAMPLE) -> list[dict]:
    """The first `count` records of a raw source, as dicts (JSON records decoded, broken ones left out)."""
    head = raw.select(range(min(count, len(raw))))
    if JSON_TEXT not in raw.column_names:
        return head.to_list()
    records = []
    for text in head[JSON_TEXT]:
        try:
            records.append(_decode(text))
        except BadRow:
            continue
    return records


def has_scores(records: list[dict], data_format: DataFormat) -> bool:
    """Pair data carries `chosen_score` / `rejected_score` through when it has both columns."""
    columns = set().union(*(record.keys() for record in records))
    return data_format.kind == "pairs" and set(SCORE_COLUMNS) <= columns


def normalize_batch(
    batch: dict[str, list], indices: list[int], data_format: DataFormat, renderer: ChatRenderer, scores: bool
) -> dict[str, list]:
    """`Dataset.map(batched=True, with_indices=True)` function: raw records -> canonical rows.

    Bad rows are kept, marked with `reason` and `detail`; the data module counts and drops them.
    """
    if JSON_TEXT in batch:
        rows, records, decode = batch[JSON_ROW], batch[JSON_TEXT], True
    else:
        rows, records, decode = indices, [dict(zip(batch, values)) for values in zip(*batch.values())], False
    out: dict[str, list] = {name: [] for name in CANONICAL_FEATURES}
    for row, record in zip(rows, records):
        example = {**_EMPTY_ROW, "row": row}
        try:
            example.update(parse_record(_decode(record) if decode else record, data_format, renderer, scores))
        except BadRow as bad:
            example.update(reason=bad.reason, detail=bad.detail)
        for name, column in out.items():
            column.append(example[name])
    return out


def parse_record(record: dict, data_format: DataFormat, renderer: ChatRenderer, scores: bool) -> dict:
    """One record -> `prompt`, the texts of its kind (`chosen`, `rejected` / `response` / none), the bool `label`
    of unpaired data and, when `scores`, `chosen_score` and `rejected_score`; raises `BadRow`."""
    example = data_format.parse(record, renderer)
    responses = RESPONSE_COLUMNS[data_format.kind]
    labels = (LABEL_COLUMN,) if data_format.kind == "unpaired" else ()
    strings = all(isinstance(example.get(key), str) for key in ("prompt", *responses))
    if set(example) != {"prompt", *responses, *labels} or not strings:
        raise TypeError(
            f"data format {data_format.name!r} parsed a record into "
            f"{ {key: type(value).__name__ for key, value in example.items()} }; a {data_format.kind!r} format "
            f"gives the strings {', '.join(('prompt', *responses))}"
            + (f" and the bool {LABEL_COLUMN}" if labels else "")
        )
    if labels and not isinstance(example[LABEL_COLUMN], bool):
        raise TypeError(f"data format {data_format.name!r} parsed a {LABEL_COLUMN} that is not a bool")
    if not example["prompt"].strip():
        raise BadRow("empty_prompt", "the prompt is empty")
    for key in responses:
        if not example[key].strip():
            raise BadRow("empty_response", f"the {key} is empty")
    if data_format.kind == "pairs" and example["chosen"] == example["rejected"]:
        raise BadRow("identical_pair", "chosen and rejected are the same text")
    if scores:
        example.update({key: score(record, key) for key in SCORE_COLUMNS})
    return example


def _decode(raw: bytes) -> dict:
    try:
        record = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise BadRow("invalid_json", f"not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise BadRow("invalid_json", f"a row must be a JSON object, got {type(record).__name__}")
    return record
