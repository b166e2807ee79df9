"""`prompts`: `prompt` as a string or a message list (rendered with the generation prompt)."""

from __future__ import annotations

from dvpo_lightning.data.formats.base import DataFormat
from dvpo_lightning.data.formats.chat import ChatRenderer
from dvpo_lightning.data.formats.fields import message_list, text
from dvpo_lightning.data.formats.registry import register_format


@register_format
class PromptsFormat(DataFormat):
    name = "prompts"
    kind = "prompts"
    detection_order = 50  # last: every other format's columns may include a prompt
    expects = "prompt"
    columns = frozenset({"prompt"})

    def detect(self, columns: frozenset[str], records: list[dict]) -> bool:
        return "prompt" in columns

    def parse(self, record: dict, renderer: ChatRenderer) -> dict[str, str]:
        if isinstance(record.get("prompt"), list):
            return {"prompt": renderer.prompt(message_list(record, "prompt", answer=False))}
        return {"prompt": text(record, "prompt")}
