"""`RLHFDataModule`: the one LightningDataModule of every stage (SFT, RM, GVM, DPO, PPO, DVPO, RTO)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import datasets
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.data.bad_rows import BadRows
from dvpo_lightning.data.builtin import BuiltinTask, get_task
from dvpo_lightning.data.collate import MODES, Collator
from dvpo_lightning.data.formats import (
    CANONICAL_FEATURES,
    LABEL_COLUMN,
    SCORE_COLUMNS,
    TEXT_COLUMNS,
    ChatRenderer,
    DataFormat,
    columns_of,
    detect_format,
    format_names,
    get_format,
    has_scores,
    ignored_columns,
    normalize_batch,
    sample_records,
    unpair_rows,
)
from dvpo_lightning.data.resumable import EpochShuffle, LengthGroupedShuffle, ResumableDataLoader
from dvpo_lightning.data.seeds import seed_or_run_seed
from dvpo_lightning.data.sources import (
    RawSource,
    builtin_task_name,
    content_of,
    has_splits,
    is_local,
    load_source,
)
from dvpo_lightning.data.splits import split_rows, unique_prompts, validation_count
from dvpo_lightning.data.tokenization import PROMPT_TRUNCATIONS, token_features, tokenize_batch
from dvpo_lightning.data.tokenizers import (
    bpe_vocab_size,
    ensure_pad_token,
    load_tokenizer,
    train_bpe_tokenizer,
)

DEFAULT_MAX_LENGTH = 256
# The text columns each mode tokenises as responses (sft mode reads pair data's `chosen` as its `response`,
# unpaired mode each of a pair's responses as one `response`).
RESPONSES = {"sft": ("response",), "pairs": ("chosen", "rejected"), "unpaired": ("response",), "prompts": ()}


@dataclass
class _Rows:
    """Canonical rows of a source (or of one split of it), bad ones dropped and logged in `bad`."""

    rows: datasets.Dataset
    bad: BadRows
    format: DataFormat
    scores: bool  # the rows carry chosen_score / rejected_score
    columns: frozenset[str]  # of the source

    def split(self, val_size: int | float, seed: int) -> tuple[_Rows, _Rows]:
        train, val = split_rows(self.rows, val_size, seed)
        return replace(self, rows=train), replace(self, rows=val)


class RLHFDataModule(LightningDataModule):
    """Preference, SFT and prompt data for every algorithm, in the split layout of docs/design.md.

    Sources: `builtin:<task>` (generated offline), a local `.jsonl` / `.jsonl.gz` / `.json` /
    `.parquet` file, a `save_to_disk` directory, or a hub dataset name. Formats (`hh`, `pairs`,
    `messages`, `kto`, `prompts`, `sft`, `prompt_completion`, or one registered with `dvpo_lightning.data.formats.register_format`)
    are detected from the columns.

    Modes: `sft` batches a prompt and one response (the chosen one of pair data); `pairs` a prompt,
    chosen and rejected (plus `chosen_score` / `rejected_score` when the data has them); `unpaired` a prompt,
    one response and its boolean `label` (KTO: `kto` data, or pair data as two rows per pair, the chosen
    response desirable and the rejected one not); `prompts`
    only prompts, for rollouts: those of `prompt_dataset`, else of the main data, de-duplicated.
    Batch keys and padding: see `dvpo_lightning.data.collate`.

    Bad rows (unparsable JSON line, missing field, wrong type, empty prompt or response, identical
    chosen and rejected, prompt mismatch, chat-template mismatch, prompt too long) are skipped, with
    one warning that counts them per reason and names the first rows of each (line numbers in JSON
    lines files, else 0-based row indices); `strict` turns the first into an error. `skipped` holds
    the counts per reason. A split left empty is an error that lists the counts.

    Tokenisation policy:

    - A prompt is tokenised as the tokenizer does by default (with a BOS where it adds one). A prompt
      longer than `max_prompt_length` tokens is cut to its last `max_prompt_length` tokens after its BOS
      (`prompt_truncation="keep_end"`, the default in every mode), to its first (`keep_start`), or its row is
      dropped (`drop`, counted as `prompt_too_long`); `prompts_truncated` counts the cut ones. `keep_end` is
      what TRL users know for preference and prompt data (DPOTrainer's and GRPO's prompt truncation): a long
      conversation keeps its latest turns, next to the response that answers them. It is the default for SFT
      data too: TRL's SFTTrainer truncates rather than drops, and only the end of a prompt keeps the response
      coherent with what it answers. On HH-RLHF the default 256-token limit would otherwise drop a fifth of
      the rows.
    - A response is its text's tokens followed by EOS: stored responses are complete. One longer
      than `max_response_length` is truncated, EOS included, and kept as an unfinished response;
      `truncated` counts them (the warning reports it).
    - Tokenisation runs through `Dataset.map`, so file sources are tokenised once and then cached.
    - The tokenizer always has a pad token distinct from EOS: when it has none (or pad == EOS), a
      `<pad>` special token is added, which grows the vocabulary by one, so a model built for it
      must resize its embeddings (the model factory sizes them from the tokenizer).
    - `bpe:<vocab_size>` trains a byte-level BPE tokenizer on the prompts and responses of the train
      split (deterministic; cached under `cache_dir`), with `<pad>` and `<eos>` special tokens.

    Validation: `val_split` when given, else `val_size` rows of the data held out at random from
    `seed` (the run's seed unless pinned), by prompt: all rows of a prompt land on one side, so repeated prompts
    never leak from training into validation (`data.splits.split_rows`). Prompts mode splits
    `prompt_dataset` the same way. The training
    loader shuffles with a generator seeded from `seed`; in prompts mode it drops the last partial
    batch, so every rollout has `batch_size` prompts.

    Args:
        dataset: `builtin:<task>`, a local file or `save_to_disk` directory, or a hub dataset name.
        tokenizer: a tokenizer directory or hub name, a `.gguf` file or `packaged:<name>` (the tokenizer of the
            converted model, `dvpo_lightning.data.model_files`), or `bpe:<vocab_size>` to train one on the data;
            None uses the built-in task's tokenizer (other datasets need one).
        format: `hh`, `pairs`, `messages`, `kto`, `prompts`, `sft`, `prompt_completion` or a registered format's
            name; None detects it from the columns (and warns about columns the detected format does not read).
        mode: `sft`, `pairs`, `unpaired` or `prompts`; None takes the `data_mode` of the Trainer's LightningModule.
        dataset_config: the hub dataset's configuration name.
        split: the split to train on (hub datasets and DatasetDict directories).
        val_split: the evaluation data: a split name of `dataset`, or a path to another file or
            directory; None holds out `val_size` rows of the training data.
        val_size: rows held out for validation when `val_split` is None: an int is a count, a float a
            fraction (at least that many: whole prompts are held out); 0 disables validation.
        prompt_dataset: a source of prompts for prompts mode (any format, detected; its prompts are used,
            a built-in task gives its prompt set, a hub dataset its `split`); None uses those of `dataset`.
        max_prompt_length: longest prompt in tokens (longer ones are handled by `prompt_truncation`); None is
            the built-in task's recommendation, else 256.
        prompt_truncation: `keep_end`, `keep_start` or `drop`: what happens to a prompt longer than
            `max_prompt_length` (see the tokenisation policy above).
        max_response_length: longest response in tokens, EOS included (longer ones are truncated);
            None is the built-in task's recommendation, else 256.
        max_samples: read at most this many rows of each source (quick runs).
        builtin_size: how many rows a built-in task generates.
        batch_size: training batch size (in prompts mode: prompts per rollout).
        group_by_length: draw training batches of rows of similar prompt and response lengths: the same rows each
            epoch, less padding in every batch (TRL's `group_by_length`, on both blocks of the split layout); see
            `dvpo_lightning.data.resumable.LengthGroupedShuffle`. Off by default: it changes which rows share a batch.
        eval_batch_size: validation and test batch size; None is `batch_size`.
        num_workers: DataLoader worker processes.
        seed: seed of the built-in task's rows, the validation split and the training shuffle; None (the default)
            takes the run's seed (`--seed_everything`; 0 without one), so two run seeds see two splits and orders;
            set it to pin them (`dvpo_lightning.data.seeds`).
        strict: fail on the first bad row instead of skipping it.
        cache_dir: where datasets and trained tokenizers are cached; None uses the `datasets`
            cache and `$DVPO_CACHE` (default `~/.cache/dvpo_lightning`).
    """

    def __init__(
        self,
        dataset: str = "builtin:topics",
        tokenizer: str | None = None,
        format: str | None = None,
        mode: str | None = None,
        dataset_config: str | None = None,
        split: str = "train",
        val_split: str | None = None,
        val_size: int | float = 0.05,
        prompt_dataset: str | None = None,
        max_prompt_length: int | None = None,
        prompt_truncation: str = "keep_end",
        max_response_length: int | None = None,
        max_samples: int | None = None,
        builtin_size: int = 4000,
        batch_size: int = 8,
        group_by_length: bool = False,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int | None = None,
        strict: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        seed = seed_or_run_seed(seed)
        task_name = builtin_task_name(dataset)
        self.task: BuiltinTask | None = get_task(task_name, seed) if task_name is not None else None
        _check_choice("format", format, format_names())
        _check_choice("mode", mode, MODES)
        _check_choice("prompt_truncation", prompt_truncation, PROMPT_TRUNCATIONS)
        if tokenizer is None and self.task is None:
            raise ValueError(
                f"dataset {dataset!r} is not a built-in task, so it needs a tokenizer: pass --data.tokenizer "
                "<directory or hub name> or bpe:<vocab size>"
            )
        bpe_vocab_size(tokenizer)  # a malformed bpe: spec fails here, not at first use
        validation_count(0, val_size)
        if val_split is not None and not (is_local(val_split) or has_splits(dataset)):
            raise ValueError(
                f"val_split {val_split!r} is not a file or directory, and {dataset!r} has no named splits; "
                "pass a path, or leave val_split unset to hold out val_size rows"
            )
        for name, value in (("batch_size", batch_size), ("builtin_size", builtin_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.dataset = dataset
        self.tokenizer_name = tokenizer
        self.format = format
        self.mode = mode
        self.dataset_config = dataset_config
        self.split = split
        self.val_split = val_split
        self.val_size = val_size
        self.prompt_dataset = prompt_dataset
        self.max_prompt_length = _length(max_prompt_length, self.task, "recommended_max_prompt_length")
        self.max_response_length = _length(max_response_length, self.task, "recommended_max_response_length")
        self.prompt_truncation = prompt_truncation
        self.max_samples = max_samples
        self.builtin_size = builtin_size
        self.batch_size = batch_size
        self.group_by_length = group_by_length
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.strict = strict
        self.cache_dir = cache_dir
        self.skipped: dict[str, int] = {}
        self.truncated = 0
        self.prompts_truncated = 0
        self.train_dataset: datasets.Dataset | None = None
        self.val_dataset: datasets.Dataset | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._main_splits: tuple[_Rows, _Rows] | None = None
        self._sources: dict[
            str, dict
        ] = {}  # by spec: the format it was read in, and its content (`content_of`)
        self._scores = False

    # --- the tokenizer ---------------------------------------------------------------------------

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer of this data, loaded (or trained) on first access; pad != EOS always."""
        if self._tokenizer is None:
            vocab_size = bpe_vocab_size(self.tokenizer_name)
            if vocab_size is not None:
                train, _ = self._splits()
                texts = [text for key in TEXT_COLUMNS for text in train.rows[key] if text]
                tokenizer = train_bpe_tokenizer(texts, vocab_size, self.cache_dir)
            elif self.tokenizer_name is not None:
                tokenizer = load_tokenizer(self.tokenizer_name)
            else:
                tokenizer = self.task.tokenizer(cache_dir=self.cache_dir)
            self._tokenizer = ensure_pad_token(tokenizer)
        return self._tokenizer

    # --- Lightning hooks -------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Resolve the mode, then load, parse, split and tokenise the data (once)."""
        if self.mode is None:
            self.mode = self._trainer_mode()
        if self.train_dataset is not None:
            return
        if self.mode == "prompts":
            train, val = self._prompt_splits()
        else:
            train, val = self._splits()
            self._check_format_fits_mode(train)
            self._scores = self.mode == "pairs" and train.scores
        self.train_dataset = self._tokenize(train, "train")
        self.val_dataset = self._tokenize(val, "validation")
        if self.mode == "prompts" and len(self.train_dataset) < self.batch_size:
            raise ValueError(
                f"prompts mode drops the last partial batch, and there are only {len(self.train_dataset)} "
                f"training prompts for batch_size={self.batch_size}"
            )
        self._report([train.bad, val.bad])

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; resumable mid-epoch (see `dvpo_lightning.data.resumable`)."""
        return self._loader(
            self.train_dataset,
            self.batch_size,
            sampler=self._train_sampler(),
            drop_last=self.mode == "prompts",
            loader_class=ResumableDataLoader,
        )

    def _train_sampler(self) -> EpochShuffle:
        if not self.group_by_length:
            return EpochShuffle(self.train_dataset, self.seed)
        world_size = self.trainer.world_size if self.trainer is not None else 1
        return LengthGroupedShuffle(
            self.row_lengths(self.train_dataset), self.batch_size * world_size, self.seed
        )

    def row_lengths(self, dataset: datasets.Dataset) -> list[tuple[int, int]] | list[int]:
        """Tokens of each row: `(prompt, longest response)`, the widths it needs in a batch's two blocks; in prompts
        mode the prompt's."""
        prompts = [len(prompt) for prompt in dataset["prompt_ids"]]
        if self.mode == "prompts":
            return prompts
        responses = [dataset[f"{key}_ids"] for key in RESPONSES[self.mode]]
        longest = [max(map(len, answers)) for answers in zip(*responses)]
        return list(zip(prompts, longest))

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches; an empty list (Lightning then skips validation) when `val_size` is 0."""
        if self.val_dataset is not None and len(self.val_dataset) == 0:
            return []
        return self._loader(self.val_dataset, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader | list:
        """The validation data."""
        return self.val_dataloader()

    def describe(self) -> dict:
        """What the data of a run was, for the lineage of its export: sources, settings and row counts.

        `format` is the one `dataset` was read in (detected, or named by the option); `sources` holds, for each
        source read, its format and, for a local one, its resolved path and SHA-256 (`sources.content_of`).
        """
        return {
            "dataset": self.dataset,
            "split": self.split,
            "val_split": self.val_split,
            "prompt_dataset": self.prompt_dataset,
            "format": self._sources.get(self.dataset, {}).get("format", self.format),
            "sources": self._sources,
            "mode": self.mode,
            "tokenizer": self.tokenizer_name,
            "seed": self.seed,
            "max_prompt_length": self.max_prompt_length,
            "max_response_length": self.max_response_length,
            "prompt_truncation": self.prompt_truncation,
            "rows": {
                split: len(rows)
                for split, rows in (("train", self.train_dataset), ("validation", self.val_dataset))
                if rows is not None
            },
            "skipped": self.skipped,
            "truncated": self.truncated,
            "prompts_truncated": self.prompts_truncated,
        }

    # --- loading and parsing ---------------------------------------------------------------------

    def _load(self, spec: str, split: str, prompts_only: bool = False) -> RawSource:
        source = load_source(
            spec,
            split=split,
            config=self.dataset_config,
            cache_dir=self.cache_dir,
            builtin_size=self.builtin_size,
            seed=self.seed,
            prompts_only=prompts_only,
        )
        if self.max_samples is not None and len(source.dataset) > self.max_samples:
            source.dataset = source.dataset.select(range(self.max_samples))
        return source

    def _parse(self, source: RawSource, fmt: str | None) -> _Rows:
        """Raw records -> canonical rows; bad rows are logged in a new `BadRows` of the source."""
        sample = sample_records(source.dataset)
        columns, detected = columns_of(sample), fmt is None
        fmt = get_format(fmt or detect_format(sample, source.name))
        ignored = ignored_columns(columns, fmt)
        if detected and ignored:
            rank_zero_warn(
                f"{source.name} is read as {fmt.name!r} data from its columns {sorted(columns & fmt.columns)}; no "
                f"format reads all of them, so {ignored} are ignored (rename them, or pass --data.format)"
            )
        scores = has_scores(sample, fmt)
        # A freshly trained BPE tokenizer has no chat template: messages use the default one.
        renderer = ChatRenderer(None if bpe_vocab_size(self.tokenizer_name) else self.tokenizer)
        rows = source.dataset.map(
            normalize_batch,
            batched=True,
            with_indices=True,
            remove_columns=source.dataset.column_names,
            features=CANONICAL_FEATURES,
            fn_kwargs={"data_format": fmt, "renderer": renderer, "scores": scores},
            desc=f"Parsing {source.name} ({fmt.name})",
        )
        self._sources[source.name] = {"format": fmt.name, **content_of(source.name)}
        bad = BadRows(source.name, source.json_lines, self.strict)
        rows = bad.drop(rows)
        bad.require_rows(len(rows), "the data")
        return _Rows(rows, bad, fmt, scores, columns)

    def _splits(self) -> tuple[_Rows, _Rows]:
        """Train and validation rows of `dataset` (canonical, untokenised)."""
        if self._main_splits is None:
            main = self._parse(self._load(self.dataset, self.split), self.format)
            if self.val_split is None:
                self._main_splits = main.split(self.val_size, self.seed)
            else:
                # A path is a source of its own; anything else names a split of `dataset`.
                if is_local(self.val_split):
                    spec, split = self.val_split, self.split
                else:
                    spec, split = self.dataset, self.val_split
                self._main_splits = (main, self._parse(self._load(spec, split), main.format.name))
        return self._main_splits

    def _prompt_splits(self) -> tuple[_Rows, _Rows]:
        """Train and validation prompts: of `prompt_dataset` when given, else of `dataset`; de-duplicated."""
        if self.prompt_dataset is None:
            parts = self._splits()
        else:
            prompts = self._parse(self._load(self.prompt_dataset, self.split, prompts_only=True), None)
            parts = prompts.split(self.val_size, self.seed)
        return tuple(replace(part, rows=unique_prompts(part.rows)) for part in parts)

    # --- tokenisation and reporting --------------------------------------------------------------

    def _tokenize(self, part: _Rows, split: str) -> datasets.Dataset:
        """Token ids of one split for the current mode; prompt-too-long rows are logged and dropped."""
        responses = RESPONSES[self.mode]
        rows = part.rows
        if self.mode == "sft" and part.format.kind == "pairs":  # sft on pair data learns the chosen responses
            rows = rows.remove_columns("response").rename_column("chosen", "response")
        if self.mode == "unpaired" and part.format.kind == "pairs":
            rows = rows.map(
                unpair_rows, batched=True, features=rows.features, desc=f"Unpairing the {split} split"
            )
        features = token_features(rows.features, responses)
        if len(rows) == 0:  # `map` would leave an empty dataset's columns as they are
            kept = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
        else:
            rows = rows.map(
                tokenize_batch,
                batched=True,
                features=features,
                fn_kwargs={
                    "tokenizer": self.tokenizer,
                    "responses": responses,
                    "max_prompt_length": self.max_prompt_length,
                    "max_response_length": self.max_response_length,
                    "prompt_truncation": self.prompt_truncation,
                },
                desc=f"Tokenising the {split} split",
            )
            kept = part.bad.drop(rows)
            part.bad.require_rows(len(kept), f"the {split} split")
        self.truncated += sum(kept["truncated"])
        self.prompts_truncated += sum(kept["prompt_truncated"])
        columns = ["row", "prompt_ids", *(f"{key}_ids" for key in responses)]
        columns += [LABEL_COLUMN] if self.mode == "unpaired" else []
        return kept.select_columns(columns + (list(SCORE_COLUMNS) if self._scores else []))

    def _check_format_fits_mode(self, part: _Rows) -> None:
        fmt = part.format
        needs = {"pairs": ("pairs",), "unpaired": ("unpaired", "pairs"), "sft": ("sft", "pairs")}[self.mode]
        if fmt.kind not in needs:
            what = {
                "pairs": "preference pairs",
                "unpaired": "labelled or paired responses",
                "sft": "responses",
            }
            because = " (its undesirable responses are no demonstrations)" if fmt.kind == "unpaired" else ""
            missing = (
                "; no row has a 'rejected' response"
                if self.mode == "pairs" and "chosen" in part.columns and "rejected" not in part.columns
                else ""
            )
            raise ValueError(
                f"mode {self.mode!r} needs {what[self.mode]}, but {self.dataset} is {fmt.name!r} data{because} "
                f"(its columns: {sorted(part.columns)}){missing}"
            )

    def _report(self, logs: list[BadRows]) -> None:
        """Sum the bad rows of the sources behind the batches: one warning for them, one note on truncation."""
        logs = list({id(log): log for log in logs}.values())  # train and validation may share a source
        self.skipped = dict(sum((log.counts for log in logs), Counter()))
        if self.skipped:
            rank_zero_warn(
                f"RLHFDataModule skipped {sum(self.skipped.values())} bad rows (strict=True fails on the first "
                "instead). " + "; ".join(log.summary() for log in logs if log.counts)
            )
        if self.prompts_truncated:
            end = "last" if self.prompt_truncation == "keep_end" else "first"
            rank_zero_info(
                f"RLHFDataModule: {self.prompts_truncated} prompts longer than max_prompt_length="
                f"{self.max_prompt_length} were cut to their {end} tokens (prompt_truncation={self.prompt_truncation}; "
                "drop skips such rows instead)"
            )
        if self.truncated:
            rank_zero_info(
                f"RLHFDataModule: {self.truncated} responses longer than max_response_length="
                f"{self.max_response_length} were truncated (kept as unfinished responses, without their EOS)"
            )

    def _loader(
        self,
        dataset: datasets.Dataset | None,
        batch_size: int,
        loader_class: type[DataLoader] = DataLoader,
        **options,
    ) -> DataLoader:
        if dataset is None:
            raise RuntimeError("RLHFDataModule: call setup() before asking for a dataloader")
        collator = Collator(self.mode, self.tokenizer.pad_token_id, scores=self._scores)
        return loader_class(
            dataset, batch_size=batch_size, collate_fn=collator, num_workers=self.num_workers, **options
        )

    def _trainer_mode(self) -> str:
        module = self.trainer.lightning_module if self.trainer is not None else None
        mode = getattr(module, "data_mode", None)
        if mode is None:
            raise ValueError(
                "RLHFDataModule needs a mode: pass --data.mode sft|pairs|unpaired|prompts, or attach it to a Trainer "
                "whose LightningModule defines `data_mode`"
            )
        if mode not in MODES:
            raise ValueError(f"{type(module).__name__}.data_mode is {mode!r}; expected one of {MODES}")
        return mode


def _check_choice(argument: str, value: str | None, choices: tuple[str, ...]) -> None:
    if value is not None and value not in choices:
        raise ValueError(f"{argument} must be one of {', '.join(choices)} (or None), got {value!r}")


def _length(value: int | None, task: BuiltinTask | None, recommendation: str) -> int:
    """An explicit length, else the built-in task's recommendation, else `DEFAULT_MAX_LENGTH`."""
    length = value if value is not None else getattr(task, recommendation, DEFAULT_MAX_LENGTH)
    if length < 1:
        raise ValueError(f"{recommendation.removeprefix('recommended_')} must be >= 1, got {length}")
    return length
