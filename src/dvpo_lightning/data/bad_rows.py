"""Bad rows: skipped and counted by reason, or (strict) the first one is an error.

A pipeline step never raises on a bad row: it marks the row with a reason (a short name from
`REASONS`) and a detail sentence, and the data module hands the marks of each step to the
`BadRows` log of the row's source. The log counts them per reason, keeps the first few row numbers
of each reason for the one warning the data module emits, and in strict mode raises on the first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import datasets

REASONS = (
    "invalid_json",  # a JSON line that does not parse, or is not an object
    "missing_field",  # a required field is absent or null
    "wrong_type",  # a field has the wrong type (e.g. a number where text belongs, a malformed message)
    "empty_prompt",  # the prompt is empty or blank
    "empty_response",  # a response is empty or blank
    "identical_pair",  # chosen and rejected are the same text
    "prompt_mismatch",  # chosen and rejected do not share the same prompt (hh, messages)
    "template_mismatch",  # the chat template's prompt rendering is not a prefix of the full rendering
    "prompt_too_long",  # the tokenised prompt is longer than max_prompt_length
)
EXAMPLES_PER_REASON = 5


class BadRowError(ValueError):
    """A bad row met in strict mode, or a source left with no usable rows."""


class BadRow(Exception):
    """Raised by a row parser; caught by the pipeline step, which marks the row with it."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-row reason {reason!r}; known: {REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class BadRows:
    """The bad rows of one source (a file, a hub dataset or a built-in task).

    Args:
        source: how messages name the source (its path or name).
        json_lines: rows are 0-based line indices of a JSON lines file; messages say "line N" (1-based).
        strict: raise `BadRowError` on the first bad row instead of counting it.
    """

    def __init__(self, source: str, json_lines: bool = False, strict: bool = False) -> None:
        self.source = source
        self.json_lines = json_lines
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[int]] = {}
        self.details: dict[str, Counter[str]] = {}  # reason -> how often each detail was given

    def where(self, row: int) -> str:
        return f"line {row + 1}" if self.json_lines else f"row {row}"

    def add(self, marks: Iterable[tuple[int, str, str]]) -> None:
        """Record `(row, reason, detail)` marks in row order; rows with an empty reason are fine."""
        for row, reason, detail in marks:
            if not reason:
                continue
            if self.strict:
                raise BadRowError(
                    f"{self.source}, {self.where(row)}: {reason} ({detail}). strict=True stops at the first "
                    "bad row; without it bad rows are skipped and counted."
                )
            self.counts[reason] += 1
            self.details.setdefault(reason, Counter())[detail] += 1
            examples = self.examples.setdefault(reason, [])
            if len(examples) < EXAMPLES_PER_REASON:
                examples.append(row)

    def drop(self, rows: datasets.Dataset) -> datasets.Dataset:
        """Record the rows of `rows` that a step marked bad (columns `row`, `reason`, `detail`) and
        return the others."""
        reasons = rows["reason"]
        marked = rows.select([index for index, reason in enumerate(reasons) if reason])
        if len(marked) == 0:
            return rows
        self.add(zip(marked["row"], marked["reason"], marked["detail"]))
        return rows.select([index for index, reason in enumerate(reasons) if not reason])

    def summary(self) -> str:
        """`path: invalid_json 2 (lines 3, 7), wrong_type 1 (line 9)`; empty when nothing was skipped."""
        if not self.counts:
            return ""
        unit = "line" if self.json_lines else "row"
        parts = []
        for reason in sorted(self.counts, key=REASONS.index):
            rows = self.examples[reason]
            shown = ", ".join(str(row + 1 if self.json_lines else row) for row in rows)
            more = ", ..." if self.counts[reason] > len(rows) else ""
            parts.append(
                f"{reason} {self.counts[reason]} ({unit}{'s' if len(rows) > 1 else ''} {shown}{more})"
            )
        return f"{self.source}: " + ", ".join(parts)

    def require_rows(self, count: int, what: str) -> None:
        """Fail with the reasons, each with its most frequent detail, when filtering left `what` with no rows:
        `missing_field 6 (every row: no 'rejected')` when they all failed alike."""
        if count == 0:
            alike = len(self.counts) == 1 and len(next(iter(self.details.values()))) == 1
            reasons = ", ".join(
                f"{reason} {n} ({'every row' if alike else 'e.g.'}: {self.details[reason].most_common(1)[0][0]})"
                for reason, n in self.counts.items()
            )
            raise BadRowError(
                f"{what} of {self.source} has no usable rows after filtering (skipped: {reasons or 'none recorded'})"
            )
