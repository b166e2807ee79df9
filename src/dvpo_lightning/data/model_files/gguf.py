"""GGUF files (llama.cpp's format) converted once into a Hugging Face directory that every stage loads.

transformers reads a GGUF file (`from_pretrained(directory, gguf_file=...)`, with the `gguf` package), dequantising
its weights, but takes about as long as a training step of a small model to do it and refuses to `save_pretrained`
what it loaded. So a GGUF file is converted once: a fresh model built from the loaded config receives the loaded
weights (float32) and is saved as safetensors with the file's tokenizer and chat template; tied embeddings stay
tied (the file then has no `output.weight`). The directory is `<cache>/models/<file stem>-<key>` (`$DVPO_CACHE`,
default `~/.cache/dvpo_lightning`), where the key changes with the file's path, size and modification time (a
changed file is converted again); it is written to a staging directory and renamed, so processes converting the
same file at once never read half a conversion.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from dvpo_lightning.data.cache import default_cache_dir, write_atomically

GGUF_SUFFIX = ".gguf"
# Part of the cache key: bump it when the conversion changes, so old directories are not reused.
CONVERSION_RECIPE = "gguf-safetensors-float32-v1"


def find_gguf(name_or_path: str) -> Path | None:
    """The GGUF file that `name_or_path` names (a `.gguf` file, or a directory holding one and no
    `config.json`), or None when it names something else (an HF directory, a hub name)."""
    path = Path(name_or_path)
    if path.is_file() and path.suffix == GGUF_SUFFIX:
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(path.glob(f"*{GGUF_SUFFIX}"))
    if len(found) > 1:
        names = ", ".join(file.name for file in found)
        raise ValueError(f"{name_or_path} holds several GGUF files ({names}): name the file to use")
    return found[0] if found else None


def converted_directory(gguf: Path) -> Path:
    """Where the conversion of `gguf` is (or will be) cached."""
    stat = gguf.stat()
    key = f"{CONVERSION_RECIPE}/{gguf.resolve()}/{stat.st_size}/{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return default_cache_dir() / "models" / f"{gguf.stem}-{digest}"


def convert_gguf(gguf: Path) -> Path:
    """The Hugging Face directory converted from `gguf`: converted on the first call, reused afterwards."""
    directory = converted_directory(gguf)
    if not directory.exists():
        write_atomically(directory, lambda staging: _convert(gguf, staging))
    return directory


def load_gguf(gguf: Path):
    """The causal LM and tokenizer that transformers reads from `gguf` (dequantised to float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _  # noqa: F401  (transformers needs it, and says so less clearly)
    except ImportError as err:
        raise ImportError(
            f"reading {gguf} needs the `gguf` package: pip install 'dvpo-lightning[gguf]'"
        ) from err
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tokenizer


def _convert(gguf: Path, destination: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded, tokenizer = load_gguf(gguf)
    config = loaded.config
    del config.quantization_config  # the weights are plain float32 now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
