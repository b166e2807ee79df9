"""Tokenizers for the data module: load one, train a byte-level BPE, guarantee a distinct pad token.

Pad must differ from EOS (docs/design.md): with `pad == eos` a mask built from the ids would hide the
real EOS a response ends with. A tokenizer without a pad token, or whose pad is its EOS, gets a new
special token `<pad>`; that grows the vocabulary by one, so the model's embeddings must be resized
(the model factory takes the vocabulary size from the tokenizer).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dvpo_lightning.data.cache import default_cache_dir, save_atomically
from dvpo_lightning.data.model_files import resolve_model_path

BPE_PREFIX = "bpe:"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
BPE_SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN)
# Byte-level BPE starts from the 256 byte symbols; the special tokens come on top.
MIN_BPE_VOCAB = 256 + len(BPE_SPECIAL_TOKENS)
# Part of the cache key: bump it when training changes, so old directories are not reused.
BPE_RECIPE = "byte-level-bpe-v1"


def bpe_vocab_size(spec: str | None) -> int | None:
    """`N` for a `bpe:<N>` tokenizer spec, None for any other spec."""
    if spec is None or not spec.startswith(BPE_PREFIX):
        return None
    size = spec[len(BPE_PREFIX) :]
    if not size.isdigit() or int(size) < MIN_BPE_VOCAB:
        raise ValueError(
            f"tokenizer {spec!r}: expected bpe:<vocab size> with a vocab size >= {MIN_BPE_VOCAB}"
        )
    return int(size)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(name_or_path)`, failing with an error that names the spec; a GGUF file or
    `packaged:<name>` loads the tokenizer of its converted directory (`dvpo_lightning.data.model_files`)."""
    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"could not load the tokenizer {name_or_path!r}: {err}. Pass a tokenizer directory, a hub name "
            f"already in the cache (the hub is unreachable offline), or bpe:<vocab size> to train one on the data."
        ) from err


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give `tokenizer` a pad token distinct from EOS when it lacks one (see the module docstring)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no EOS token; every response ends with EOS, so the "
            "tokenizer must define one"
        )
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if tokenizer.pad_token_id == tokenizer.eos_token_id:  # the tokenizer's EOS text is "<pad>"
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r}: could not add a pad token distinct from EOS")
    return tokenizer


def train_bpe_tokenizer(
    texts: Sequence[str], vocab_size: int, cache_dir: str | os.PathLike | None = None
) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on `texts`, saved as a Hugging Face tokenizer directory.

    Byte-level, so any text round-trips exactly (`decode(encode(text)) == text`). Special tokens:
    `<pad>` (id 0) and `<eos>` (id 1); no BOS, no unknown token (every byte is in the vocabulary).
    The directory is `<cache_dir>/tokenizers/bpe-<vocab_size>-<hash of the texts>`, written once
    (staged, then renamed into place) and loaded back with `AutoTokenizer`; training is
    deterministic, so every process that trains on the same texts builds the same tokenizer.
    """
    digest = hashlib.sha256(f"{BPE_RECIPE}/{vocab_size}".encode())
    for text in texts:
        data = text.encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    directory = (
        Path(cache_dir or default_cache_dir()) / "tokenizers" / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}"
    )
    if not directory.exists():
        save_atomically(_train_bpe(texts, vocab_size), directory)
    return AutoTokenizer.from_pretrained(str(directory))


def _train_bpe(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, clean_up_tokenization_spaces=False
    )
