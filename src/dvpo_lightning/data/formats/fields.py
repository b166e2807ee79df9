"""Reading one field of a raw record, for format parsers: a missing or mistyped field raises `BadRow`."""

from __future__ import annotations

import math

from dvpo_lightning.data.bad_rows import BadRow


def field(record: dict, key: str):
    """`record[key]`; absent or null is `missing_field`."""
    value = record.get(key)
    if value is None:
        raise BadRow("missing_field", f"no {key!r}")
    return value


def text(record: dict, key: str) -> str:
    """A string field."""
    value = field(record, key)
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{key!r} must be a string, got {type(value).__name__}")
    return value


def score(record: dict, key: str) -> float:
    """A finite number field (not a bool)."""
    value = field(record, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRow("wrong_type", f"{key!r} must be a finite number, got {value!r}")
    return float(value)


def message_list(record: dict, key: str, answer: bool) -> list[dict]:
    """A list of `{role, content}` string messages (other keys dropped); an `answer` must be non-empty
    and end with the assistant's message."""
    value = field(record, key)
    if not isinstance(value, list):
        raise BadRow(
            "wrong_type", f"{key!r} must be a list of {{role, content}} messages, got {type(value).__name__}"
        )
    for position, message in enumerate(value):
        if not (
            isinstance(message, dict) and all(isinstance(message.get(k), str) for k in ("role", "content"))
        ):
            raise BadRow("wrong_type", f"{key}[{position}] is not a {{role, content}} message of strings")
    if answer and (not value or value[-1]["role"] != "assistant"):
        raise BadRow("wrong_type", f"{key!r} must end with an assistant message")
    return [{"role": message["role"], "content": message["content"]} for message in value]
