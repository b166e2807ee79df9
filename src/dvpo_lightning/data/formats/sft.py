"""`sft`: `prompt` and `response` strings, or a `messages` list whose last message is the assistant's."""

from __future__ import annotations

from dvpo_lightning.data.formats.base import DataFormat
from dvpo_lightning.data.formats.chat import ChatRenderer
from dvpo_lightning.data.formats.fields import message_list, text
from dvpo_lightning.data.formats.registry import register_format


@register_format
class SFTFormat(DataFormat):
    name = "sft"
    kind = "sft"
    detection_order = 40  # after the pair formats (pair data may carry these columns too), before `prompts`
    expects = "prompt+response or messages"
    columns = frozenset({"prompt", "response", "messages"})

    def detect(self, columns: frozenset[str], records: list[dict]) -> bool:
        return "messages" in columns or {"prompt", "response"} <= columns

    def parse(self, record: dict, renderer: ChatRenderer) -> dict[str, str]:
        if record.get("messages") is None:
            return {"prompt": text(record, "prompt"), "response": text(record, "response")}
        messages = message_list(record, "messages", answer=True)
        prompt = renderer.prompt(messages[:-1])
        return {"prompt": prompt, "response": renderer.response(messages[:-1], messages[-1:], prompt)}
