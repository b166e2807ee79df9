"""The formats by name, and detection: the registered formats asked in their `detection_order`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from dvpo_lightning.data.formats.base import RESPONSE_COLUMNS, DataFormat

F = TypeVar("F", bound=type[DataFormat])

_FORMATS: dict[str, DataFormat] = {}


def register_format(cls: F | None = None, *, replace: bool = False) -> F | Callable[[F], F]:
    """Class decorator adding a `DataFormat` subclass under its `name`: `@register_format`, or
    `@register_format(replace=True)` to overwrite a format of that name (a notebook cell run again)."""

    def decorator(cls: F) -> F:
        if not all(isinstance(getattr(cls, attribute, None), str) for attribute in ("name", "kind")):
            raise ValueError(f"{cls.__name__} must set the class attributes name and kind (strings)")
        data_format = cls()
        name = data_format.name
        if name in _FORMATS and not replace:
            raise ValueError(f"data format {name!r} is already registered; pass replace=True to overwrite it")
        if data_format.kind not in RESPONSE_COLUMNS:
            raise ValueError(
                f"data format {name!r} has kind {data_format.kind!r}; expected one of {', '.join(RESPONSE_COLUMNS)}"
            )
        if (data_format.detection_order is None) != (cls.detect is DataFormat.detect):
            raise ValueError(f"data format {name!r} must define both detect and detection_order, or neither")
        order = data_format.detection_order
        for other in _FORMATS.values():
            if order is not None and other.detection_order == order and other.name != name:
                raise ValueError(
                    f"data formats {name!r} and {other.name!r} have the same detection_order {order}; give "
                    "each its own, so which one detection picks is explicit"
                )
        _FORMATS[name] = data_format
        return cls

    return decorator if cls is None else decorator(cls)


def unregister_format(name: str) -> None:
    """Remove the format `name` (an unknown name is an error, as in `get_format`)."""
    get_format(name)
    del _FORMATS[name]


def get_format(name: str) -> DataFormat:
    """The format registered as `name`; an unknown name is an error listing the known ones."""
    if name not in _FORMATS:
        raise ValueError(f"unknown data format {name!r}; known: {', '.join(format_names())}")
    return _FORMATS[name]


def format_names() -> tuple[str, ...]:
    """The registered formats' names, in detection order (formats only used by name last)."""
    return tuple(data_format.name for data_format in _by_detection_order())


def detect_format(records: list[dict], source: str) -> str:
    """The name of the first format, in detection order, that accepts the columns of `records` (a source's
    leading rows); an error listing what each format expects when none does."""
    columns = columns_of(records)
    detected = [f for f in _by_detection_order() if f.detection_order is not None]
    for data_format in detected:
        if data_format.detect(columns, records):
            return data_format.name
    expected = ", ".join(f"{data_format.expects} ({data_format.name})" for data_format in detected)
    raise ValueError(
        f"cannot tell the format of {source} from its columns {sorted(columns)}: expected, in this order, "
        f"{expected}; rename the columns or pass --data.format"
    )


def columns_of(records: list[dict]) -> frozenset[str]:
    """Every key of any of `records` (a source's leading rows)."""
    return frozenset().union(*(record.keys() for record in records))


def ignored_columns(columns: frozenset[str], data_format: DataFormat) -> list[str]:
    """The `columns` that `data_format` does not read (none when it does not declare what it reads)."""
    return sorted(columns - data_format.columns) if data_format.columns else []


def _by_detection_order() -> list[DataFormat]:
    unordered = float("inf")  # formats only used by name come last, by name
    return sorted(
        _FORMATS.values(),
        key=lambda f: (unordered if f.detection_order is None else f.detection_order, f.name),
    )
