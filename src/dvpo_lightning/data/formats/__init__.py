"""Row formats: every source is parsed into one canonical row of texts, by a registered `DataFormat`.

A canonical row (`CANONICAL_FEATURES`) has the text columns `prompt`, `chosen`, `rejected` and
`response`, plus `chosen_score` / `rejected_score`. What a format fills depends on its kind: pair
data fills `prompt`, `chosen` and `rejected` (and the scores when the source has both columns), sft
data `prompt` and `response`, unpaired data `prompt`, `response` and the boolean `label`, prompt data only
`prompt`; the rest stays empty. The prompt text ends
exactly where the response starts, so `prompt + response` is the full transcript.

Built-in formats, one module each, in detection order (the first whose columns match wins; see
`detect_format`):

- `messages`: `chosen` / `rejected` as lists of `{role, content}` messages, with or without a
  `prompt` message list;
- `pairs`: `prompt`, `chosen`, `rejected` strings, optional `chosen_score` / `rejected_score`;
- `hh`: `chosen` / `rejected` full HH-RLHF transcripts (`hh_chat`, only when named: the same through the chat
  template);
- `kto`: `prompt`, `completion` (strings or message lists) and a boolean `label`, TRL's unpaired preference
  format (KTO's data);
- `sft`: `prompt` and `response` strings, or a `messages` conversation;
- `prompt_completion`: TRL's `prompt` and `completion`, strings or message lists (sft rows);
- `prompts`: `prompt` as a string or a message list.

A new format is one `DataFormat` subclass decorated with `@register_format` (see docs/design.md,
"Add a data format"); `--data.format <name>` then selects it, and with a `detect` and a
`detection_order` it is also recognised from the columns.
"""

from dvpo_lightning.data.formats.base import (
    CANONICAL_FEATURES,
    LABEL_COLUMN,
    RESPONSE_COLUMNS,
    SCORE_COLUMNS,
    TEXT_COLUMNS,
    DataFormat,
)
from dvpo_lightning.data.formats.chat import ChatRenderer
from dvpo_lightning.data.formats.fields import field, message_list, score, text
from dvpo_lightning.data.formats.pipeline import (
    JSON_ROW,
    JSON_TEXT,
    has_scores,
    normalize_batch,
    parse_record,
    sample_records,
)
from dvpo_lightning.data.formats.registry import (
    columns_of,
    detect_format,
    format_names,
    get_format,
    ignored_columns,
    register_format,
    unregister_format,
)

# Imported for their registration.
from dvpo_lightning.data.formats import hh, kto, messages, pairs, prompt_completion, prompts, sft  # noqa: E402, F401  isort: skip
from dvpo_lightning.data.formats.kto import unpair_rows  # noqa: E402  isort: skip

__all__ = [
    "CANONICAL_FEATURES",
    "JSON_ROW",
    "JSON_TEXT",
    "LABEL_COLUMN",
    "RESPONSE_COLUMNS",
    "SCORE_COLUMNS",
    "TEXT_COLUMNS",
    "ChatRenderer",
    "DataFormat",
    "columns_of",
    "detect_format",
    "field",
    "format_names",
    "get_format",
    "has_scores",
    "ignored_columns",
    "message_list",
    "normalize_batch",
    "parse_record",
    "register_format",
    "sample_records",
    "score",
    "text",
    "unpair_rows",
    "unregister_format",
]
