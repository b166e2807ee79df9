"""`messages`: `chosen` / `rejected` as lists of `{role, content}` messages, rendered by `ChatRenderer`.

With a `prompt` message list they are the completions; otherwise they are whole conversations whose
last message is the assistant's answer, and everything before it (which must agree) is the prompt. A
`prompt` string next to whole conversations is ignored (the conversations hold it).
"""

from __future__ import annotations

from dvpo_lightning.data.bad_rows import BadRow
from dvpo_lightning.data.formats.base import DataFormat
from dvpo_lightning.data.formats.chat import ChatRenderer
from dvpo_lightning.data.formats.fields import message_list
from dvpo_lightning.data.formats.registry import register_format


@register_format
class MessagesFormat(DataFormat):
    name = "messages"
    kind = "pairs"
    detection_order = 10  # first: `pairs` and `hh` have the same columns, holding strings
    expects = "chosen+rejected message lists"
    columns = frozenset({"prompt", "chosen", "rejected"})

    def detect(self, columns: frozenset[str], records: list[dict]) -> bool:
        """The first `chosen` that is a string or a list decides."""
        if not {"chosen", "rejected"} <= columns:
            return False
        sample = next((r["chosen"] for r in records if isinstance(r.get("chosen"), (str, list))), None)
        return isinstance(sample, list)

    def parse(self, record: dict, renderer: ChatRenderer) -> dict[str, str]:
        chosen = message_list(record, "chosen", answer=True)
        rejected = message_list(record, "rejected", answer=True)
        if isinstance(record.get("prompt"), list):
            context = message_list(record, "prompt", answer=False)
        else:
            if chosen[:-1] != rejected[:-1]:
                raise BadRow("prompt_mismatch", "chosen and rejected differ before their last message")
            context, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        prompt = renderer.prompt(context)
        return {
            "prompt": prompt,
            "chosen": renderer.response(context, chosen, prompt),
            "rejected": renderer.response(context, rejected, prompt),
        }
