"""`hh`: `chosen` / `rejected` full HH-RLHF transcripts.

The prompt is everything up to and including the last `"\\n\\nAssistant:"`; the response is the rest.
Both transcripts must share the prompt.
"""

from __future__ import annotations

from dvpo_lightning.data.bad_rows import BadRow
from dvpo_lightning.data.formats.base import DataFormat
from dvpo_lightning.data.formats.chat import HH_ASSISTANT, ChatRenderer
from dvpo_lightning.data.formats.fields import text
from dvpo_lightning.data.formats.registry import register_format


@register_format
class HHFormat(DataFormat):
    name = "hh"
    kind = "pairs"
    detection_order = 30  # after `messages` and `pairs`, which have these columns too
    expects = "chosen+rejected transcripts"
    columns = frozenset({"chosen", "rejected"})

    def detect(self, columns: frozenset[str], records: list[dict]) -> bool:
        return {"chosen", "rejected"} <= columns

    def parse(self, record: dict, renderer: ChatRenderer) -> dict[str, str]:
        prompt, chosen = _split(record, "chosen")
        rejected_prompt, rejected = _split(record, "rejected")
        if prompt != rejected_prompt:
            raise BadRow("prompt_mismatch", f"chosen and rejected differ before their last {HH_ASSISTANT!r}")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _split(record: dict, key: str) -> tuple[str, str]:
    transcript = text(record, key)
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRow("missing_field", f"{key!r} has no {HH_ASSISTANT!r} turn")
    cut += len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]
