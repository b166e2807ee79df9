"""`ChatRenderer`: message lists to text, with the tokenizer's chat template or HH-RLHF's transcript style."""

from __future__ import annotations

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.data.bad_rows import BadRow

HH_ASSISTANT = "\n\nAssistant:"


class ChatRenderer:
    """Renders message lists to text with the tokenizer's chat template, else the default template.

    The default template is HH-RLHF's transcript style, so `messages` data and `hh` data give the same
    texts: each message becomes `"\\n\\n<Name>: <content>"` with Name `Human` for `user`, else the
    capitalised role (`Assistant`, `System`, ...), and the generation prompt is `"\\n\\nAssistant:"`.

    A response is the rendering of the whole conversation minus the rendering of the prompt with the
    generation prompt. With a chat template, a response that ends with the tokenizer's EOS text
    (templates close the assistant turn with it) loses it, as tokenisation appends the EOS token to
    every response.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self.tokenizer = tokenizer if tokenizer is not None and tokenizer.chat_template else None

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        if self.tokenizer is None:
            text = "".join(f"\n\n{_speaker(m['role'])}: {m['content']}" for m in messages)
            return text + HH_ASSISTANT if generation_prompt else text
        if not messages:  # `apply_chat_template` raises a plain ValueError on an empty conversation
            raise BadRow("empty_prompt", "no messages before the answer, and the chat template needs one")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except TemplateError as err:  # templates raise on conversations they refuse (e.g. role order)
            raise BadRow("template_mismatch", f"the chat template refused the conversation: {err}") from err

    def prompt(self, messages: list[dict]) -> str:
        return self.render(messages, generation_prompt=True)

    def response(self, context: list[dict], answer: list[dict], prompt: str) -> str:
        """The text `answer` adds after `prompt` (= `self.prompt(context)`)."""
        full = self.render(context + answer, generation_prompt=False)
        if not full.startswith(prompt):
            raise BadRow(
                "template_mismatch",
                "the prompt rendered with the generation prompt is not a prefix of the rendered conversation",
            )
        response = full[len(prompt) :]
        eos = self.tokenizer.eos_token if self.tokenizer is not None else None
        if eos and response.rstrip().endswith(eos):
            response = response.rstrip()[: -len(eos)]
        return response


def _speaker(role: str) -> str:
    return "Human" if role == "user" else role.capitalize()
