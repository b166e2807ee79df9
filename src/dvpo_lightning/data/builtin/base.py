"""What every built-in task shares: datasets, preference labels, the gold-reward sum, the tokenizer.

A built-in task is a small synthetic world that needs no download. A subclass says what the world
is: its words, how a prompt is drawn, how a deliberately mediocre demonstrator answers, and the gold
reward of any response word by word (`token_scores`). This class turns that into what the rest of
the project consumes:

- `prompt_dataset` / `preference_dataset`: Hugging Face datasets, deterministic in
  `(task, seed, split_seed)`. A preference pair is two demonstrator answers to one prompt, labelled
  by Bradley-Terry sampling from the gold reward, `P(a preferred) = sigmoid((r_a - r_b) / T)`, so the
  labels are noisy the way human labels are. Two identical answers are never emitted as a pair.
- `score`: the gold reward of a response, the sum of its `token_scores`.
- `tokenizer`: a word-level tokenizer over the task's words, saved once as a normal Hugging Face
  tokenizer directory in a cache and loaded back with `AutoTokenizer.from_pretrained`.

Response texts never contain the EOS token. A demonstrator answer that did not finish (it rambled
past the response budget) is exactly `recommended_max_response_length` words long: once a data
module appends EOS and truncates to that budget, the EOS is cut and the model sees the answer
unfinished, as it was scored.
"""

from __future__ import annotations

import math
import os
import random
from abc import ABC, abstractmethod
from pathlib import Path

import datasets
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from dvpo_lightning.data.cache import default_cache_dir, save_atomically

PREFERENCE_FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "chosen_score": datasets.Value("float64"),
        "rejected_score": datasets.Value("float64"),
    }
)
PROMPT_FEATURES = datasets.Features({"prompt": datasets.Value("string")})

# A demonstrator that keeps answering identically cannot make pairs; fail instead of looping forever.
MAX_IDENTICAL_DRAWS_IN_A_ROW = 1000


class BuiltinTask(ABC):
    """A synthetic prompt/response world with a closed-form gold reward (see the module docstring)."""

    name: str
    version: str
    pad_token = "<pad>"
    eos_token = "<eos>"
    unk_token = "<unk>"
    recommended_max_prompt_length: int
    recommended_max_response_length: int
    # Bradley-Terry temperature of the preference labels: lower means cleaner labels.
    label_temperature: float

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    # --- what a task defines -------------------------------------------------------------------

    @abstractmethod
    def words(self) -> list[str]:
        """The vocabulary, special tokens excluded, in a fixed order (it fixes the token ids)."""

    @abstractmethod
    def sample_prompt(self, rng: random.Random) -> str:
        """One prompt drawn with `rng`."""

    @abstractmethod
    def demonstrate(self, rng: random.Random, prompt: str) -> tuple[str, bool]:
        """One demonstrator answer to `prompt`: its text (no EOS) and whether it finished."""

    @abstractmethod
    def token_scores(self, prompt: str, response: str, finished: bool) -> list[float]:
        """The gold reward's per-word contributions: one per response word, then one for the end
        (the EOS token when `finished`, otherwise the cost of not finishing). Sums to the score."""

    @abstractmethod
    def optimum(self, prompts: list[str]) -> list[float]:
        """The best gold reward achievable for each prompt."""

    # --- what every task gets ------------------------------------------------------------------

    def score(self, prompts: list[str], responses: list[str], finished: list[bool]) -> list[float]:
        """Gold reward of each (prompt, response, finished) triple; responses decoded without
        special tokens. Unknown words are scored like any non-topic word, never an error."""
        if not len(prompts) == len(responses) == len(finished):
            raise ValueError(
                f"score() needs one prompt, response and finished flag per row; got "
                f"{len(prompts)} prompts, {len(responses)} responses, {len(finished)} finished flags"
            )
        return [
            sum(self.token_scores(prompt, response, bool(done)))
            for prompt, response, done in zip(prompts, responses, finished)
        ]

    def prompt_dataset(self, num_prompts: int, split_seed: int | None = None) -> datasets.Dataset:
        """`num_prompts` prompts (column `prompt`); `split_seed` picks an independent draw."""
        _check_count("num_prompts", num_prompts)
        rng = self._rng("prompts", split_seed)
        prompts = [self.sample_prompt(rng) for _ in range(num_prompts)]
        return datasets.Dataset.from_dict({"prompt": prompts}, features=PROMPT_FEATURES)

    def preference_dataset(self, num_pairs: int, split_seed: int | None = None) -> datasets.Dataset:
        """`num_pairs` labelled pairs: prompt, chosen, rejected, chosen_score, rejected_score.

        The scores are the gold rewards of the two texts as the model will see them: finished
        unless the demonstrator rambled (then the text fills the whole response budget)."""
        _check_count("num_pairs", num_pairs)
        rng = self._rng("pairs", split_seed)
        rows: dict[str, list] = {column: [] for column in PREFERENCE_FEATURES}
        identical_in_a_row = 0
        while len(rows["prompt"]) < num_pairs:
            prompt = self.sample_prompt(rng)
            (a, a_finished), (b, b_finished) = self.demonstrate(rng, prompt), self.demonstrate(rng, prompt)
            if a == b:
                identical_in_a_row += 1
                if identical_in_a_row >= MAX_IDENTICAL_DRAWS_IN_A_ROW:
                    raise RuntimeError(f"task {self.name!r}: the demonstrator keeps answering identically")
                continue
            identical_in_a_row = 0
            score_a, score_b = self.score([prompt, prompt], [a, b], [a_finished, b_finished])
            a_wins = rng.random() < _sigmoid((score_a - score_b) / self.label_temperature)
            (chosen, chosen_score), (rejected, rejected_score) = (
                ((a, score_a), (b, score_b)) if a_wins else ((b, score_b), (a, score_a))
            )
            for column, value in zip(
                PREFERENCE_FEATURES, (prompt, chosen, rejected, chosen_score, rejected_score)
            ):
                rows[column].append(value)
        return datasets.Dataset.from_dict(rows, features=PREFERENCE_FEATURES)

    def tokenizer(self, cache_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
        """The task's word-level tokenizer, loaded from `<cache_dir>/builtin/<name>-<version>/tokenizer`.

        The directory is written on first use, atomically (a staging directory renamed into place),
        so concurrent processes never load half of it."""
        directory = (
            Path(cache_dir or default_cache_dir()) / "builtin" / f"{self.name}-{self.version}" / "tokenizer"
        )
        if not directory.exists():
            self._write_tokenizer(directory)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        if tokenizer.get_vocab() != self._vocab():
            raise ValueError(
                f"{directory} holds a different vocabulary than the built-in task {self.name!r} "
                f"{self.version}; delete that directory so it is rebuilt"
            )
        return tokenizer

    # --- helpers -------------------------------------------------------------------------------

    def _rng(self, purpose: str, split_seed: int | None) -> random.Random:
        # A string seed is hashed with SHA-512 by `random`, so it is stable across processes.
        return random.Random(f"{self.name}/{self.version}/seed={self.seed}/split={split_seed}/{purpose}")

    def _vocab(self) -> dict[str, int]:
        tokens = [self.pad_token, self.eos_token, self.unk_token, *self.words()]
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"task {self.name!r} lists a word twice in its vocabulary")
        return {token: index for index, token in enumerate(tokens)}

    def _build_tokenizer(self) -> PreTrainedTokenizerFast:
        core = Tokenizer(models.WordLevel(self._vocab(), unk_token=self.unk_token))
        core.normalizer = normalizers.Lowercase()
        # Splits words from punctuation (`\w+|[^\w\s]+`); without a decoder, ids decode joined by spaces.
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(
            tokenizer_object=core,
            pad_token=self.pad_token,
            eos_token=self.eos_token,
            unk_token=self.unk_token,
            clean_up_tokenization_spaces=False,
        )

    def _write_tokenizer(self, directory: Path) -> None:
        save_atomically(self._build_tokenizer(), directory)


def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(x / 2.0))  # no overflow for any x


def _check_count(argument: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{argument} must be a non-negative integer, got {value!r}")
