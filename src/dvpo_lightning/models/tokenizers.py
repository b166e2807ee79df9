"""Tokenizer compatibility between stages.

A value model reads the policy's token ids, and every stage loads the previous stage's export by path, so a
model trained with one tokenizer and fed ids from another gives silent garbage. These checks make it an
error that names both sides.
"""

from __future__ import annotations

import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class TokenizerMismatchError(ValueError):
    """A model was trained with a different tokenizer than the one this run uses."""


def check_tokenizer_matches(
    model_path: str, tokenizer: PreTrainedTokenizerBase, role: str, option: str | None = None
) -> None:
    """Refuse `model_path` if the tokenizer saved beside it disagrees with `tokenizer`; `option` is the config
    option that names the model, for the message.

    Compatible means every token of the saved tokenizer has the same id in the run's tokenizer; the run's
    tokenizer may add special tokens on top (e.g. the distinct pad token this project adds when a tokenizer
    has none). Directories without tokenizer files (and hub names) are not checked here.
    """
    if not os.path.isdir(model_path) or not any(
        os.path.exists(os.path.join(model_path, name)) for name in TOKENIZER_FILES
    ):
        return
    saved = AutoTokenizer.from_pretrained(model_path)
    problem = tokenizer_difference(saved, tokenizer)
    if problem is not None:
        named_by = f" (option `{option}`)" if option is not None else ""
        raise TokenizerMismatchError(
            f"The {role} at {model_path!r}{named_by} was trained with a different tokenizer than this run's "
            f"({tokenizer.name_or_path!r}): {problem}. A model only understands the token ids of its own "
            f"tokenizer: use the tokenizer saved with the model (--data.tokenizer {model_path}) or a {role} "
            "trained with this run's tokenizer."
        )


def tokenizer_difference(saved: PreTrainedTokenizerBase, current: PreTrainedTokenizerBase) -> str | None:
    """A sentence describing how `current` disagrees with `saved`, or None when they are compatible."""
    saved_vocab, current_vocab = saved.get_vocab(), current.get_vocab()
    moved = [token for token, index in saved_vocab.items() if current_vocab.get(token) != index]
    if moved:
        examples = ", ".join(
            f"{token!r}: {saved_vocab[token]} vs {current_vocab.get(token)}" for token in sorted(moved)[:3]
        )
        return (
            f"{len(moved)} of the model's {len(saved_vocab)} tokens have another id or are missing "
            f"(vocabulary sizes {len(saved_vocab)} vs {len(current_vocab)}; e.g. {examples})"
        )
    added = set(current_vocab) - set(saved_vocab)
    special = set(current.all_special_tokens)
    if added - special:
        return f"this run's tokenizer has {len(added - special)} extra non-special tokens, e.g. {sorted(added - special)[:3]}"
    if saved.eos_token is not None and saved.eos_token != current.eos_token:
        return f"the EOS token differs ({saved.eos_token!r} vs {current.eos_token!r})"
    return None
