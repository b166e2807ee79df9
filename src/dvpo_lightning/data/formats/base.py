"""The canonical row every format is parsed into, and `DataFormat`, what a format declares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import datasets

from dvpo_lightning.data.formats.chat import ChatRenderer

# The texts each kind of row fills besides `prompt`; the other text columns of its canonical row stay "".
RESPONSE_COLUMNS = {
    "pairs": ("chosen", "rejected"),
    "sft": ("response",),
    "prompts": (),
    "unpaired": ("response",),
}
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "response")
SCORE_COLUMNS = ("chosen_score", "rejected_score")
LABEL_COLUMN = "label"

CANONICAL_FEATURES = datasets.Features(
    {
        "row": datasets.Value("int64"),  # the row's id in its source (0-based record or line index)
        "reason": datasets.Value("string"),  # "" for a good row, else a bad_rows.REASONS name
        "detail": datasets.Value("string"),
        **{column: datasets.Value("string") for column in TEXT_COLUMNS},
        **{column: datasets.Value("float64") for column in SCORE_COLUMNS},  # pair data with scores, else null
        LABEL_COLUMN: datasets.Value("bool"),  # unpaired data: the response is desirable; else null
    }
)


class DataFormat(ABC):
    """One row format: its name, the kind of rows it gives, how it is recognised, how a record is parsed.

    A subclass sets the class attributes and defines `parse`; to be recognised from the columns
    (without `--data.format`) it also defines `detect` and a `detection_order`. `@register_format`
    adds it to the registry. The pipeline around `parse` checks what every format shares: a
    non-empty prompt, non-empty responses, chosen != rejected, and the scores of pair data.
    """

    name: ClassVar[str]
    # `pairs` (prompt, chosen, rejected), `sft` (prompt, response), `prompts` (prompt) or `unpaired` (prompt,
    # response and the boolean `label`: whether the response is desirable, KTO's feedback).
    kind: ClassVar[str]
    # Detection asks the formats in ascending order, the first that accepts the columns wins, so a format
    # whose columns are a superset of another's (or that looks at the values) must come before it.
    # None: the format is only used when named.
    detection_order: ClassVar[int | None] = None
    # What `detect` looks for, as the "cannot tell the format" message lists it.
    expects: ClassVar[str] = ""
    # Every column `parse` may read: a source's other columns are reported as ignored. Empty: not reported.
    columns: ClassVar[frozenset[str]] = frozenset()

    def detect(self, columns: frozenset[str], records: list[dict]) -> bool:
        """Whether a source whose leading `records` have these `columns` (all keys of any of them) is in
        this format."""
        raise NotImplementedError(f"data format {self.name!r} is not detected from the columns")

    @abstractmethod
    def parse(self, record: dict, renderer: ChatRenderer) -> dict[str, str]:
        """One record -> `prompt` and the texts of `RESPONSE_COLUMNS[kind]` (and `label`, a bool, for `unpaired`
        formats); raises `BadRow` for a bad one.

        The prompt ends exactly where the response starts: `prompt + response` is the full transcript.
        """
