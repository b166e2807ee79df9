"""`kto`: unpaired feedback as TRL's unpaired preference format: a `prompt`, a `completion` and a boolean `label`
(true: the completion is desirable), as strings or as message lists (rendered by `ChatRenderer`).

KTO also trains on pair data: `unpair_rows` makes each pair two unpaired rows, its chosen response desirable and
its rejected one undesirable (TRL's `unpair_preference_dataset`).
"""

from __future__ import annotations

from dvpo_lightning.data.bad_rows import BadRow
from dvpo_lightning.data.formats.base import LABEL_COLUMN, DataFormat
from dvpo_lightning.data.formats.chat import ChatRenderer
from dvpo_lightning.data.formats.fields import field, message_list, text
from dvpo_lightning.data.formats.registry import register_format


@register_format
class KTOFormat(DataFormat):
    name = "kto"
    kind = "unpaired"
    detection_order = (
        35  # before `sft` and any prompt+completion format: these columns are a superset of theirs
    )
    expects = "prompt+completion+label"

    def detect(self, columns: frozenset[str], records: list[dict]) -> bool:
        return {"prompt", "completion", LABEL_COLUMN} <= columns

    def parse(self, record: dict, renderer: ChatRenderer) -> dict:
        label = field(record, LABEL_COLUMN)
        if not isinstance(label, bool):
            raise BadRow("wrong_type", f"{LABEL_COLUMN!r} must be true or false, got {label!r}")
        if isinstance(record.get("prompt"), list):
            context = message_list(record, "prompt", answer=False)
            prompt = renderer.prompt(context)
            completion = renderer.response(context, message_list(record, "completion", answer=True), prompt)
        else:
            prompt, completion = text(record, "prompt"), text(record, "completion")
        return {"prompt": prompt, "response": completion, LABEL_COLUMN: label}


def unpair_rows(rows: dict[str, list]) -> dict[str, list]:
    """`Dataset.map(batched=True)` function: canonical pair rows -> unpaired rows, each pair's chosen response
    (labelled desirable) then its rejected one (undesirable); both keep the pair's `row`, so a bad row found later
    names the pair's line."""
    count = len(rows["row"])
    unpaired = {key: values + values for key, values in rows.items()}
    unpaired["response"] = rows["chosen"] + rows["rejected"]
    unpaired[LABEL_COLUMN] = [True] * count + [False] * count
    return unpaired
