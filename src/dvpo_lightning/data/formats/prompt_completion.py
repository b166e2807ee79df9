"""`prompt_completion`: TRL's prompt-completion rows, `prompt` and `completion` as strings, or as message lists
(TRL's conversational prompt-completion: the prompt's messages, then the assistant's completion)."""

from __future__ import annotations

from dvpo_lightning.data.formats.base import DataFormat
from dvpo_lightning.data.formats.chat import ChatRenderer
from dvpo_lightning.data.formats.fields import message_list, text
from dvpo_lightning.data.formats.registry import register_format


@register_format
class PromptCompletionFormat(DataFormat):
    name = "prompt_completion"
    kind = "sft"
    detection_order = 48  # after `sft`, before `prompts`, which would read only the prompt
    expects = "prompt+completion"
    columns = frozenset({"prompt", "completion"})

    def detect(self, columns: frozenset[str], records: list[dict]) -> bool:
        return {"prompt", "completion"} <= columns

    def parse(self, record: dict, renderer: ChatRenderer) -> dict[str, str]:
        if not isinstance(record.get("prompt"), list):
            return {"prompt": text(record, "prompt"), "response": text(record, "completion")}
        context = message_list(record, "prompt", answer=False)
        prompt = renderer.prompt(context)
        completion = message_list(record, "completion", answer=True)
        return {"prompt": prompt, "response": renderer.response(context, completion, prompt)}
