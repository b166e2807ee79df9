import os

# A hub lookup takes ~50 s to fail without a network: never try one from the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# setuptools swaps in its own distutils when first imported (`_distutils_hack`). Imported for the first time late in
# a long session (by torch.compile's C++ builder, through torch.utils.cpp_extension), the swap failed with an
# AssertionError after other tests had run; imported here, the process is still clean.
import setuptools  # noqa: E402, F401

from tests.helpers.tiny import TINY_ARCH, make_word_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HH_FILE = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.fixture(autouse=True)
def no_run_seed_across_tests():
    """No test sees the run seed another left (`PL_GLOBAL_SEED`: a `seed_everything` call, or a seed a CLI run drew
    at random), which the model and data seeds follow by default (`dvpo_lightning.data.seeds`)."""
    os.environ.pop("PL_GLOBAL_SEED", None)
    yield
    os.environ.pop("PL_GLOBAL_SEED", None)


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


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache directory for datasets and tokenizers, shared by one test module."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tokenizer(cache):
    """The built-in task's tokenizer."""
    from tests.helpers.stages import topics_data

    return topics_data(cache).tokenizer
