"""A user's mistake ends a `dvpo` command with one message and exit code 2; a bug keeps its traceback.

User mistakes are the errors that the project's checks raise for options, files and rows (`ValueError` and its
subclasses: `ConfigurationError`, `BadRowError`, `TokenizerMismatchError`, `SourceError`, ...), a file or model
that cannot be read (`OSError`), a missing optional package (`ImportError`) and Lightning's
`MisconfigurationException`. jsonargparse wraps an error raised while it builds the model or data class in
errors of its own that repeat the whole configuration; the message shown is that of the error it wraps.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

EXIT_USER_ERROR = 2
HINT = "(--debug shows the traceback)"


def raised_by_jsonargparse(error: BaseException) -> bool:
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and f"{os.sep}jsonargparse{os.sep}" in traceback.tb_frame.f_code.co_filename


def wrapped_error(error: BaseException) -> BaseException:
    """The error that jsonargparse's wrappers of `error` (if any) were raised for."""
    while error.__cause__ is not None and raised_by_jsonargparse(error):
        error = error.__cause__
    return error


def is_user_error(error: BaseException) -> bool:
    kinds: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)
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
        error = wrapped_error(raised)
        if debug or not is_user_error(error):
            raise
        print(
            f"dvpo: error: {str(error).strip() or type(error).__name__} {HINT}", file=sys.stderr, flush=True
        )
        raise SystemExit(EXIT_USER_ERROR) from None
