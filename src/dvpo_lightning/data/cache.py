"""The project's cache directory, and writing a directory (a tokenizer, a converted model) into it safely."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedTokenizerBase


def default_cache_dir() -> Path:
    """`$DVPO_CACHE`, else `~/.cache/dvpo_lightning`."""
    return Path(os.environ.get("DVPO_CACHE") or Path.home() / ".cache" / "dvpo_lightning")


def save_atomically(tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """`save_pretrained` into `directory` through `write_atomically`."""
    write_atomically(directory, tokenizer.save_pretrained)


def write_atomically(directory: Path, write: Callable[[Path], object]) -> None:
    """`write(staging)` fills a staging directory renamed to `directory`, so no process sees half of it.

    Several processes (ranks) may write the same directory at once: the first rename wins and the
    others keep its copy.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        write(staging)
        os.rename(staging, directory)
    except OSError:
        if not directory.exists():  # not just another process winning the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
