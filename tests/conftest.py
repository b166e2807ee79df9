import os

# A hub lookup takes ~50 s to fail without a network: never try one from the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HH_FILE = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

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

WORDS = "the a cat dog river apple tree sun moon blue red green runs sleeps eats and with under over .".split()


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


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory):
    return make_word_tokenizer(tmp_path_factory.mktemp("word_tokenizer"))


@pytest.fixture
def tiny_arch():
    return dict(TINY_ARCH)


@pytest.fixture
def hh_file():
    if not HH_FILE.exists():
        pytest.skip(f"real HH-RLHF data not found at {HH_FILE}")
    return HH_FILE
