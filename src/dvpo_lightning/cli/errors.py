"""A user's mistake ends a `dvpo` command with one message and exit code 2; a bug keeps its traceback.

User mistakes are a bad command-line argument (`argparse.ArgumentError`), the errors that the project's checks raise for options, files and rows (`ValueError` and its
subclasses: `ConfigurationError`, `BadRowError`, `TokenizerMismatchError`, `SourceError`, ...), a file or model
that cannot be read (`OSError`), a missing optional package (`ImportError`) and Lightning's
`MisconfigurationException`. jsonargparse wraps an error raised while it builds the model or data class in
errors of its own that repeat the whole configuration; the message shown is that of the error it wraps, prefixed
with the option jsonargparse was building (read from its `instantiate` frames, as it names none).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

from dvpo_lightning.cli.unknown_names import PARSER_KEY, unknown_name_message

EXIT_USER_ERROR = 2
HINT = "(--debug shows the traceback)"


def raised_by_jsonargparse(error: BaseException) -> bool:
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and f"{os.sep}jsonargparse{os.sep}" in traceback.tb_frame.f_code.co_filename


def wrapped_error(error: BaseException) -> tuple[BaseException, str | None]:
    """The error that jsonargparse's wrappers of `error` (if any) were raised for, and the option whose value
    jsonargparse was building then (`model.init_args.optim`), if known."""
    keys = []
    while error.__cause__ is not None and raised_by_jsonargparse(error):
        if isinstance(error, argparse.ArgumentError):
            break
        keys += instantiated_keys(error)[-1:]
        error = error.__cause__
    if not keys:
        return error, None
    # `model` and `data` are in subclass mode: their arguments are under `init_args`.
    return error, ".".join([f"{keys[0]}.init_args" if keys[0] in ("model", "data") else keys[0], *keys[1:]])


def instantiated_keys(error: BaseException) -> list[str]:
    """The keys that jsonargparse's `instantiate` was building, outermost first, along `error`'s traceback."""
    keys = []
    traceback = error.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        if (
            f"{os.sep}jsonargparse{os.sep}" in frame.f_code.co_filename
            and frame.f_code.co_name == "instantiate"
        ):
            key = frame.f_locals.get("key")
            if isinstance(key, str):
                keys.append(key)
        traceback = traceback.tb_next
    return keys


def argument_message(error: argparse.ArgumentError) -> str:
    """jsonargparse's message for a bad argument, down to the option and what is wrong with its value.

    For an option inside a class (`--model.init_args.optim.betas`) it nests `Parser key "...":` sections, one per
    level, among the reasons why every other type of each union failed too; the innermost section says what is
    wrong. A misspelt option or class is named with the closest valid name (`dvpo_lightning.cli.unknown_names`).
    """
    unknown_name = unknown_name_message(str(error))
    if unknown_name is not None:
        return unknown_name
    lines = str(error).splitlines()
    keys, detail = [], ""
    for index, line in enumerate(lines):
        match = PARSER_KEY.fullmatch(line.strip())
        if match:
            keys.append(match.group(1))
            detail = lines[index + 1].strip() if index + 1 < len(lines) else ""
    if not keys:
        return " ".join(line.strip() for line in lines)
    return f"--{'.'.join(keys)}: {detail}"


def is_user_error(error: BaseException) -> bool:
    kinds: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError, argparse.ArgumentError)
    lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")  # loaded if Lightning ran
    if lightning_errors is not None:
        kinds += (lightning_errors.MisconfigurationException,)
    return isinstance(error, kinds)


@contextlib.contextmanager
def exit_on_user_error(debug: bool) -> Iterator[None]:
    """Turn a user mistake raised inside the block into one line on stderr and `SystemExit(2)`, unless `debug`."""
    try:
        yield
    except Exception as raised:
        error, option = wrapped_error(raised)
        if debug or not is_user_error(error):
            raise
        message = argument_message(error) if isinstance(error, argparse.ArgumentError) else str(error).strip()
        if option is not None:
            message = f"--{option}: {message}"
        print(f"dvpo: error: {message or type(error).__name__} {HINT}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
