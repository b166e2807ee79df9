"""Tiny tokenizers and architectures that tests build locally (no hub)."""

from pathlib import Path

# A 2-layer Llama small enough to train on 2 CPU cores in seconds.
TINY_ARCH = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}

WORDS = (
    "the a cat dog river apple tree sun moon blue red green runs sleeps eats and with under over .".split()
)


def make_word_tokenizer(directory: Path, words=WORDS, pad: bool = True):
    """A word-level HF tokenizer saved to `directory` and loaded back from it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<unk>", "<eos>"] + (["<pad>"] if pad else [])
    vocab = {token: index for index, token in enumerate(specials + list(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>" if pad else None
    )
    wrapped.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)
