"""The project's cache directory, and writing a tokenizer directory into it safely."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerBase


def default_cache_dir() -> Path:
    """`$DVPO_CACHE`, else `~/.cache/dvpo_lightning`."""
    return Path(os.environ.get("DVPO_CACHE") or Path.home() / ".cache" / "dvpo_lightning")


def save_atomically(tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """`save_pretrained` into a staging directory renamed to `directory`, so no process sees half of it.

    Several processes (ranks) may write the same directory at once: the first rename wins and the
    others keep its copy.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent)
    try:
        tokenizer.save_pretrained(staging)
        os.rename(staging, directory)
    except OSError:
        if not directory.exists():  # not just another process winning the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
