"""`hh`: `chosen` / `rejected` full HH-RLHF transcripts; `hh_chat`: the same, through the chat template.

`hh` keeps the transcript's text: the prompt is everything up to and including the last `"\\n\\nAssistant:"`;
the response is the rest. Both transcripts must share the prompt.

`hh_chat` (named with `--data.format hh_chat`, never detected) splits each transcript into its `Human` and
`Assistant` turns and reads them as `messages` rows: a pretrained chat model then sees its own template
(the tokenizer's; without one, the default template: HH's transcript style again).
"""

from __future__ import annotations

import re

from dvpo_lightning.data.bad_rows import BadRow
from dvpo_lightning.data.formats.base import DataFormat
from dvpo_lightning.data.formats.chat import HH_ASSISTANT, ChatRenderer
from dvpo_lightning.data.formats.fields import text
from dvpo_lightning.data.formats.messages import MessagesFormat
from dvpo_lightning.data.formats.registry import register_format

HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


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


@register_format
class HHChatFormat(DataFormat):
    name = "hh_chat"
    kind = "pairs"

    def parse(self, record: dict, renderer: ChatRenderer) -> dict[str, str]:
        conversations = {key: _turns(record, key) for key in ("chosen", "rejected")}
        return MessagesFormat().parse(conversations, renderer)


def _turns(record: dict, key: str) -> list[dict]:
    """The transcript `record[key]` as `{role, content}` messages."""
    parts = HH_TURN.split(text(record, key))
    if parts[0].strip():
        raise BadRow("missing_field", f"{key!r} does not start with a Human or Assistant turn")
    return [
        {"role": "user" if speaker == "Human" else "assistant", "content": content}
        for speaker, content in zip(parts[1::2], parts[2::2])
    ]
