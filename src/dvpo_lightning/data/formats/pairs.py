"""`pairs`: `prompt`, `chosen`, `rejected` strings; optional numeric `chosen_score`, `rejected_score`."""

from __future__ import annotations

from dvpo_lightning.data.formats.base import DataFormat
from dvpo_lightning.data.formats.chat import ChatRenderer
from dvpo_lightning.data.formats.fields import text
from dvpo_lightning.data.formats.registry import register_format


@register_format
class PairsFormat(DataFormat):
    name = "pairs"
    kind = "pairs"
    detection_order = 20  # after `messages` (message lists in the same columns), before `hh` (no prompt)
    expects = "prompt+chosen+rejected"
    columns = frozenset({"prompt", "chosen", "rejected", "chosen_score", "rejected_score"})

    def detect(self, columns: frozenset[str], records: list[dict]) -> bool:
        return {"prompt", "chosen", "rejected"} <= columns

    def parse(self, record: dict, renderer: ChatRenderer) -> dict[str, str]:
        return {key: text(record, key) for key in ("prompt", "chosen", "rejected")}
