"""Row formats: every source is parsed into one canonical row of texts.

A canonical row (`CANONICAL_FEATURES`) is `prompt`, `chosen`, `rejected` texts plus optional scores.
Pair data fills all three; sft data keeps its response in `chosen` (and `rejected` empty); prompt
data fills only `prompt`. The prompt text ends exactly where the response starts, so
`prompt + chosen` is the full transcript.

Formats (auto-detected from the columns by `detect_format`):

- `hh`: `chosen` / `rejected` full HH-RLHF transcripts. The prompt is everything up to and including
  the last `"\\n\\nAssistant:"`; the response is the rest. Both transcripts must share the prompt.
- `pairs`: `prompt`, `chosen`, `rejected` strings; optional numeric `chosen_score`, `rejected_score`.
- `messages`: `chosen` / `rejected` as lists of `{role, content}` messages. With a `prompt` message
  list they are the completions; otherwise they are whole conversations whose last message is the
  assistant's answer, and everything before it (which must agree) is the prompt. A `prompt` string
  next to whole conversations is ignored (the conversations hold it).
- `prompts`: `prompt` as a string or a message list.
- `sft`: `prompt` and `response` strings, or a `messages` list whose last message is the assistant's.

Message lists are rendered by `ChatRenderer`: the response is the rendering of the whole
conversation minus the rendering of the prompt with the generation prompt.
"""

from __future__ import annotations

import json
import math

import datasets
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.data.bad_rows import BadRow

FORMATS = ("hh", "pairs", "messages", "prompts", "sft")
PAIR_FORMATS = ("hh", "pairs", "messages")
SCORE_COLUMNS = ("chosen_score", "rejected_score")
HH_ASSISTANT = "\n\nAssistant:"
# Raw JSON sources are stored as (row, bytes of the record) and decoded while parsing, so a line that
# is not JSON is a bad row like any other.
JSON_ROW = "__row"
JSON_TEXT = "__json"
# How many leading records `detect_format` looks at.
DETECTION_SAMPLE = 100

CANONICAL_FEATURES = datasets.Features(
    {
        "row": datasets.Value("int64"),  # the row's id in its source (0-based record or line index)
        "reason": datasets.Value("string"),  # "" for a good row, else a bad_rows.REASONS name
        "detail": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "chosen_score": datasets.Value("float64"),
        "rejected_score": datasets.Value("float64"),
    }
)
_EMPTY_ROW = dict.fromkeys(["reason", "detail", "prompt", "chosen", "rejected"], "") | dict.fromkeys(
    SCORE_COLUMNS
)


class ChatRenderer:
    """Renders message lists to text with the tokenizer's chat template, else the default template.

    The default template is HH-RLHF's transcript style, so `messages` data and `hh` data give the same
    texts: each message becomes `"\\n\\n<Name>: <content>"` with Name `Human` for `user`, else the
    capitalised role (`Assistant`, `System`, ...), and the generation prompt is `"\\n\\nAssistant:"`.

    With a chat template, a response that ends with the tokenizer's EOS text (templates close the
    assistant turn with it) loses it, as tokenisation appends the EOS token to every response.
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


def detect_format(records: list[dict], source: str) -> str:
    """The format of `records` (a source's leading rows), from their keys (see the module docstring)."""
    columns = set().union(*(record.keys() for record in records))
    if {"chosen", "rejected"} <= columns:
        sample = next((r["chosen"] for r in records if isinstance(r.get("chosen"), (str, list))), None)
        if isinstance(sample, list):
            return "messages"
        return "pairs" if "prompt" in columns else "hh"
    if "messages" in columns or {"prompt", "response"} <= columns:
        return "sft"
    if "prompt" in columns:
        return "prompts"
    raise ValueError(
        f"cannot tell the format of {source} from its columns {sorted(columns)}: expected chosen+rejected "
        "(hh, messages), prompt+chosen+rejected (pairs), prompt+response or messages (sft), or prompt "
        "(prompts); rename the columns or pass --data.format"
    )


def has_scores(records: list[dict], fmt: str) -> bool:
    """Pair data carries `chosen_score` / `rejected_score` through when it has both columns."""
    columns = set().union(*(record.keys() for record in records))
    return fmt in PAIR_FORMATS and set(SCORE_COLUMNS) <= columns


def sample_records(raw: datasets.Dataset, count: int = DETECTION_SAMPLE) -> list[dict]:
    """The first `count` records of a raw source, as dicts (JSON records decoded, broken ones left out)."""
    head = raw.select(range(min(count, len(raw))))
    if JSON_TEXT not in raw.column_names:
        return head.to_list()
    records = []
    for text in head[JSON_TEXT]:
        try:
            records.append(_decode(text))
        except BadRow:
            continue
    return records


def normalize_batch(
    batch: dict[str, list], indices: list[int], fmt: str, renderer: ChatRenderer, scores: bool
) -> dict[str, list]:
    """`Dataset.map(batched=True, with_indices=True)` function: raw records -> canonical rows.

    Bad rows are kept, marked with `reason` and `detail`; the data module counts and drops them.
    """
    if JSON_TEXT in batch:
        rows, records, decode = batch[JSON_ROW], batch[JSON_TEXT], True
    else:
        rows, records, decode = indices, [dict(zip(batch, values)) for values in zip(*batch.values())], False
    out: dict[str, list] = {name: [] for name in CANONICAL_FEATURES}
    for row, record in zip(rows, records):
        example = {**_EMPTY_ROW, "row": row}
        try:
            example.update(parse_record(_decode(record) if decode else record, fmt, renderer, scores))
        except BadRow as bad:
            example.update(reason=bad.reason, detail=bad.detail)
        for name, column in out.items():
            column.append(example[name])
    return out


def parse_record(record: dict, fmt: str, renderer: ChatRenderer, scores: bool) -> dict:
    """One record -> `{prompt, chosen, rejected[, chosen_score, rejected_score]}`; raises `BadRow`."""
    example = _PARSERS[fmt](record, renderer)
    if not example["prompt"].strip():
        raise BadRow("empty_prompt", "the prompt is empty")
    if fmt != "prompts":
        paired = fmt in PAIR_FORMATS
        for key in ("chosen", "rejected") if paired else ("chosen",):
            if not example[key].strip():
                raise BadRow("empty_response", f"the {key if paired else 'response'} is empty")
        if paired and example["chosen"] == example["rejected"]:
            raise BadRow("identical_pair", "chosen and rejected are the same text")
    if scores:
        example.update({key: _score(record, key) for key in SCORE_COLUMNS})
    return example


def _decode(raw: bytes) -> dict:
    try:
        record = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        raise BadRow("invalid_json", f"not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise BadRow("invalid_json", f"a row must be a JSON object, got {type(record).__name__}")
    return record


def _field(record: dict, key: str):
    value = record.get(key)
    if value is None:
        raise BadRow("missing_field", f"no {key!r}")
    return value


def _text(record: dict, key: str) -> str:
    value = _field(record, key)
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _score(record: dict, key: str) -> float:
    value = _field(record, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRow("wrong_type", f"{key!r} must be a finite number, got {value!r}")
    return float(value)


def _messages(record: dict, key: str, answer: bool) -> list[dict]:
    """A validated message list; an `answer` must be non-empty and end with the assistant's message."""
    value = _field(record, key)
    if not isinstance(value, list):
        raise BadRow(
            "wrong_type", f"{key!r} must be a list of {{role, content}} messages, got {type(value).__name__}"
        )
    for position, message in enumerate(value):
        if not (
            isinstance(message, dict) and all(isinstance(message.get(k), str) for k in ("role", "content"))
        ):
            raise BadRow("wrong_type", f"{key}[{position}] is not a {{role, content}} message of strings")
    if answer and (not value or value[-1]["role"] != "assistant"):
        raise BadRow("wrong_type", f"{key!r} must end with an assistant message")
    return [{"role": message["role"], "content": message["content"]} for message in value]


def _split_hh(record: dict, key: str) -> tuple[str, str]:
    text = _text(record, key)
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadRow("missing_field", f"{key!r} has no {HH_ASSISTANT!r} turn")
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def _parse_hh(record: dict, renderer: ChatRenderer) -> dict:
    prompt, chosen = _split_hh(record, "chosen")
    rejected_prompt, rejected = _split_hh(record, "rejected")
    if prompt != rejected_prompt:
        raise BadRow("prompt_mismatch", f"chosen and rejected differ before their last {HH_ASSISTANT!r}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _parse_pairs(record: dict, renderer: ChatRenderer) -> dict:
    return {key: _text(record, key) for key in ("prompt", "chosen", "rejected")}


def _parse_messages(record: dict, renderer: ChatRenderer) -> dict:
    chosen = _messages(record, "chosen", answer=True)
    rejected = _messages(record, "rejected", answer=True)
    if isinstance(record.get("prompt"), list):
        context = _messages(record, "prompt", answer=False)
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


def _parse_prompts(record: dict, renderer: ChatRenderer) -> dict:
    if isinstance(record.get("prompt"), list):
        return {"prompt": renderer.prompt(_messages(record, "prompt", answer=False))}
    return {"prompt": _text(record, "prompt")}


def _parse_sft(record: dict, renderer: ChatRenderer) -> dict:
    if record.get("messages") is None:
        return {"prompt": _text(record, "prompt"), "chosen": _text(record, "response")}
    messages = _messages(record, "messages", answer=True)
    prompt = renderer.prompt(messages[:-1])
    return {"prompt": prompt, "chosen": renderer.response(messages[:-1], messages[-1:], prompt)}


_PARSERS = {
    "hh": _parse_hh,
    "pairs": _parse_pairs,
    "messages": _parse_messages,
    "prompts": _parse_prompts,
    "sft": _parse_sft,
}
