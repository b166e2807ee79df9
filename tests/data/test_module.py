"""RLHFDataModule: batches, lengths, splits, modes, sources and its command-line surface."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import datasets
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from dvpo_lightning.data import RLHFDataModule, get_task
from dvpo_lightning.data.sources import SourceError, content_of
from dvpo_lightning.data.splits import split_rows
from dvpo_lightning.data.tokenization import tokenize_batch
from tests.helpers.data import make_module, write_jsonl

WORDS = "the a cat dog sun moon runs sleeps eats .".split()


def word_rows(count: int) -> list[dict]:
    """Distinct pairs over the word tokenizer's vocabulary (tests.helpers.tiny.WORDS)."""
    return [
        {
            "prompt": f"{WORDS[i % 4]} {WORDS[i // 4 % 6]}",
            "chosen": "the cat runs .",
            "rejected": f"a dog {i % 3 * 'eats '}.",
        }
        for i in range(count)
    ]


@pytest.fixture
def word_tokenizer_dir(word_tokenizer, tmp_path):
    word_tokenizer.save_pretrained(tmp_path / "tokenizer")
    return str(tmp_path / "tokenizer")


def builtin(tmp_path, mode="pairs", **options):
    module = make_module("builtin:topics", tmp_path, mode=mode, builtin_size=64, **options)
    module.setup()
    return module


def assert_left_padded(ids, mask, pad_id):
    lengths = mask.sum(-1)
    for row, length in enumerate(lengths.tolist()):
        assert mask[row, mask.shape[1] - length :].all() and not mask[row, : mask.shape[1] - length].any()
    assert (ids[~mask] == pad_id).all()


def assert_right_padded(ids, mask, pad_id):
    for row, length in enumerate(mask.sum(-1).tolist()):
        assert mask[row, :length].all() and not mask[row, length:].any()
    assert (ids[~mask] == pad_id).all()


def test_builtin_pairs_batches(tmp_path):
    module = builtin(tmp_path, max_prompt_length=None, max_response_length=None)
    task = module.task
    assert (
        module.task is not None
        and module.tokenizer.get_vocab() == task.tokenizer(tmp_path / "cache").get_vocab()
    )
    assert (module.max_prompt_length, module.max_response_length) == (
        task.recommended_max_prompt_length,
        task.recommended_max_response_length,
    )
    batch = next(iter(module.train_dataloader()))
    pad, eos = module.tokenizer.pad_token_id, module.tokenizer.eos_token_id
    assert batch["prompt_input_ids"].shape[0] == module.batch_size == 8
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert batch["chosen_input_ids"].dtype == torch.long and batch["chosen_mask"].dtype == torch.bool
    assert batch["prompt_attention_mask"][:, -1].all()  # left padding: every prompt ends at the right edge
    assert_left_padded(batch["prompt_input_ids"], batch["prompt_attention_mask"], pad)
    for key in ("chosen", "rejected"):
        assert_right_padded(batch[f"{key}_input_ids"], batch[f"{key}_mask"], pad)
    # The block is as wide as the longest response of the batch, no wider.
    longest = max(batch["chosen_mask"].sum(-1).max(), batch["rejected_mask"].sum(-1).max())
    assert batch["chosen_input_ids"].shape[1] == longest
    # Rows point back to the generated data: same texts, same scores.
    data = task.preference_dataset(64)
    for position, index in enumerate(batch["index"].tolist()):
        row = data[index]
        assert batch["chosen_score"][position].item() == pytest.approx(row["chosen_score"])
        assert batch["rejected_score"][position].item() == pytest.approx(row["rejected_score"])
        chosen = batch["chosen_input_ids"][position][batch["chosen_mask"][position]].tolist()
        expected = module.tokenizer(row["chosen"], add_special_tokens=False)["input_ids"] + [eos]
        assert chosen == expected[: module.max_response_length]


def test_sft_and_prompts_batches(tmp_path):
    sft_module = builtin(tmp_path, mode="sft", eval_batch_size=3)
    assert len(next(iter(sft_module.val_dataloader()))["index"]) == 3
    assert next(iter(sft_module.test_dataloader()))["index"].tolist() == sft_module.val_dataset["row"][:3]
    sft = next(iter(sft_module.train_dataloader()))
    assert set(sft) == {
        "index",
        "prompt_input_ids",
        "prompt_attention_mask",
        "response_input_ids",
        "response_mask",
    }
    prompts = next(iter(builtin(tmp_path, mode="prompts").train_dataloader()))
    assert set(prompts) == {"index", "prompt_input_ids", "prompt_attention_mask"}


def pairs_with_limits(tmp_path, tokenizer_dir, rows: list[dict], **options) -> RLHFDataModule:
    """`rows` as pair data, set up with prompts of at most 6 tokens and `options`."""
    module = make_module(
        write_jsonl(tmp_path / "rows.jsonl", rows),
        tmp_path,
        tokenizer=tokenizer_dir,
        mode="pairs",
        max_prompt_length=6,
        val_size=0,
        **options,
    )
    module.setup()
    return module


def test_long_responses_are_truncated_and_counted_long_prompts_dropped(tmp_path, word_tokenizer_dir):
    rows = [
        {"prompt": "the cat", "chosen": "the cat sleeps .", "rejected": "a dog"},  # chosen: 4 words + EOS > 4
        {"prompt": "a dog", "chosen": "the dog runs", "rejected": "the sun"},  # 3 words + EOS = 4: fits
        {"prompt": "the moon the sun and the tree", "chosen": "a", "rejected": "the"},  # 7 prompt tokens > 6
    ]
    module = pairs_with_limits(
        tmp_path, word_tokenizer_dir, rows, max_response_length=4, prompt_truncation="drop"
    )
    assert module.truncated == 1
    assert module.skipped == {"prompt_too_long": 1}
    assert module.prompts_truncated == 0
    batch = next(iter(module._loader(module.train_dataset, 8)))
    vocab, eos = module.tokenizer.get_vocab(), module.tokenizer.eos_token_id
    assert batch["index"].tolist() == [0, 1]
    assert batch["chosen_input_ids"].tolist() == [
        [vocab["the"], vocab["cat"], vocab["sleeps"], vocab["."]],  # EOS cut
        [vocab["the"], vocab["dog"], vocab["runs"], eos],
    ]
    assert batch["chosen_mask"].all()


def bos_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def test_prompts_get_the_tokenizers_bos_once_responses_get_eos():
    batch = {
        "row": [0, 1],
        "reason": ["", ""],
        "detail": ["", ""],
        "prompt": ["the cat", "<bos> a dog"],
        "chosen": ["runs", "eats ."],
    }
    out = tokenize_batch(batch, bos_tokenizer(), ("chosen",), max_prompt_length=8, max_response_length=8)
    assert out["prompt_ids"] == [
        [2, 4, 6],
        [2, 5, 7],
    ]  # <bos> the cat; a chat template's <bos> is not doubled
    assert out["chosen_ids"] == [[10, 1], [12, 13, 1]]
    assert out["truncated"] == [0, 0] and out["reason"] == ["", ""]


@pytest.mark.parametrize(
    "mode, kept",
    [
        ("keep_end", "<bos> cat runs ."),  # the end of the conversation, after its BOS
        ("keep_start", "<bos> the moon the"),
    ],
)
def test_a_long_prompt_is_cut_keeping_its_bos_and_counted(mode, kept):
    batch = {
        "row": [0, 1],
        "reason": ["", ""],
        "detail": ["", ""],
        "prompt": ["the moon the sun a cat runs .", "a dog"],
    }
    tokenizer = bos_tokenizer()
    out = tokenize_batch(
        batch, tokenizer, (), max_prompt_length=4, max_response_length=8, prompt_truncation=mode
    )
    assert tokenizer.decode(out["prompt_ids"][0]) == kept
    assert tokenizer.decode(out["prompt_ids"][1]) == "<bos> a dog"
    assert out["prompt_truncated"] == [1, 0] and out["reason"] == ["", ""]


def test_long_prompts_are_kept_by_their_end_by_default_and_counted(tmp_path, word_tokenizer_dir):
    rows = [
        {"prompt": "the moon the sun and the tree", "chosen": "a", "rejected": "the"},  # 7 tokens > 6
        {"prompt": "a dog", "chosen": "the dog runs", "rejected": "the sun"},
    ]
    module = pairs_with_limits(tmp_path, word_tokenizer_dir, rows)
    assert module.skipped == {} and module.prompts_truncated == 1
    assert module.describe()["prompts_truncated"] == 1
    prompts = [module.tokenizer.decode(ids) for ids in module.train_dataset["prompt_ids"]]
    assert prompts == ["moon the sun and the tree", "a dog"]


def test_an_unknown_prompt_truncation_is_refused(tmp_path):
    with pytest.raises(ValueError, match="prompt_truncation must be one of keep_end, keep_start, drop"):
        make_module("builtin:topics", tmp_path, prompt_truncation="keep_middle")


def test_validation_split_is_deterministic_from_the_seed(tmp_path, word_tokenizer_dir):
    path = write_jsonl(tmp_path / "rows.jsonl", word_rows(40))

    def split(seed, val_size):
        module = make_module(
            path, tmp_path, tokenizer=word_tokenizer_dir, mode="pairs", seed=seed, val_size=val_size
        )
        module.setup()
        return list(module.train_dataset["row"]), list(module.val_dataset["row"])

    train, val = split(0, 0.1)
    assert sorted(train + val) == list(range(40))
    assert split(0, 0.1) == (train, val)
    assert split(1, 0.1)[1] != val
    assert train == sorted(train)  # the source order is kept inside a split
    # Whole prompts are held out (word_rows repeats them): at least the rows asked for, no prompt on both sides.
    prompts = [row["prompt"] for row in word_rows(40)]
    for val_size in (0.1, 7):
        train, val = split(0, val_size)
        assert len(val) >= (4 if val_size == 0.1 else 7)
        assert not {prompts[row] for row in train} & {prompts[row] for row in val}


@pytest.mark.parametrize("mode", ["prompts", "pairs"])
def test_repeated_prompts_are_never_both_trained_on_and_validated_on(tmp_path, word_tokenizer_dir, mode):
    # 30 rows of 10 prompts, each three times: a row split held out 11 rows of 9 prompts, 8 of them also trained on.
    rows = [
        {"prompt": f"{WORDS[i % 10]} .", "chosen": "the cat", "rejected": f"a {WORDS[i % 7]}"}
        for i in range(30)
    ]
    module = make_module(
        write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path, tokenizer=word_tokenizer_dir, mode=mode,
        val_size=0.2, batch_size=2,
    )  # fmt: skip
    module.setup()
    train, val = (
        {rows[row]["prompt"] for row in part["row"]} for part in (module.train_dataset, module.val_dataset)
    )
    assert len(val) == 2 and len(train) == 8 and not train & val


def test_data_without_repeated_prompts_keeps_its_row_split():
    rows = datasets.Dataset.from_dict({"prompt": [f"prompt {i}" for i in range(50)]})
    order = np.random.default_rng(3).permutation(50)  # the split before prompts were grouped
    train, val = split_rows(rows, 0.2, seed=3)
    assert val["prompt"] == [f"prompt {i}" for i in sorted(order[:10])]
    assert train["prompt"] == [f"prompt {i}" for i in sorted(order[10:])]


def test_the_lineage_records_the_detected_format_and_each_local_files_path_and_hash(
    tmp_path, word_tokenizer_dir, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "rows.jsonl", word_rows(20))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"a {word}"} for word in WORDS])
    module = make_module(
        "rows.jsonl",
        tmp_path,
        tokenizer=word_tokenizer_dir,
        mode="prompts",
        prompt_dataset="prompts.jsonl",
        val_size=2,
    )
    module.setup()
    described = module.describe()
    assert described["format"] is None  # `dataset` was not read: the prompts came from `prompt_dataset`
    assert described["sources"] == {
        "prompts.jsonl": {
            "format": "prompts",
            "path": str(prompts),
            "sha256": hashlib.sha256(prompts.read_bytes()).hexdigest(),
        }
    }
    pairs = make_module("rows.jsonl", tmp_path, tokenizer=word_tokenizer_dir, mode="pairs", val_size=2)
    pairs.setup()
    assert pairs.describe()["format"] == "pairs"
    assert pairs.describe()["sources"]["rows.jsonl"]["path"] == str(tmp_path / "rows.jsonl")


def test_a_saved_dataset_directory_is_hashed_over_its_files(tmp_path):
    datasets.Dataset.from_list([{"prompt": "a"}]).save_to_disk(tmp_path / "saved")
    first = content_of(str(tmp_path / "saved"))
    assert first["path"] == str(tmp_path / "saved") and content_of(str(tmp_path / "saved")) == first
    datasets.Dataset.from_list([{"prompt": "b"}]).save_to_disk(tmp_path / "saved")
    assert content_of(str(tmp_path / "saved"))["sha256"] != first["sha256"]
    assert content_of("builtin:topics") == {} and content_of("Anthropic/hh-rlhf") == {}


def test_training_order_is_seeded_and_shuffled(tmp_path, word_tokenizer_dir):
    path = write_jsonl(tmp_path / "rows.jsonl", word_rows(40))

    def order(seed):
        module = make_module(
            path, tmp_path, tokenizer=word_tokenizer_dir, mode="pairs", seed=seed, val_size=0
        )
        module.setup()
        return [index for batch in module.train_dataloader() for index in batch["index"].tolist()]

    first = order(3)
    assert sorted(first) == list(range(40)) and first != list(range(40))
    assert order(3) == first


@pytest.mark.parametrize("pinned", [None, 3])
def test_the_split_and_order_follow_the_run_seed_unless_pinned(tmp_path, word_tokenizer_dir, pinned):
    path = write_jsonl(tmp_path / "rows.jsonl", word_rows(40))

    def split_and_order(run_seed):
        pl.seed_everything(run_seed)  # what --seed_everything does
        module = make_module(
            path, tmp_path, tokenizer=word_tokenizer_dir, mode="pairs", seed=pinned, val_size=4
        )
        module.setup()
        order = [index for batch in module.train_dataloader() for index in batch["index"].tolist()]
        return module.seed, list(module.val_dataset["row"]), order

    first, second = split_and_order(0), split_and_order(1)
    if pinned is None:
        assert (first[0], second[0]) == (0, 1)
        assert first[1] != second[1] and first[2] != second[2]
    else:
        assert first == second and first[0] == pinned


def test_prompts_mode_deduplicates_and_drops_the_last_partial_batch(tmp_path, word_tokenizer_dir):
    rows = [{"prompt": f"the {word}", "chosen": "a", "rejected": "the"} for word in ["cat", "dog", "sun"] * 4]
    rows += [{"prompt": "the moon", "chosen": "a", "rejected": "the"}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    module = make_module(
        path, tmp_path, tokenizer=word_tokenizer_dir, mode="prompts", val_size=0, batch_size=3
    )
    module.setup()
    assert list(module.train_dataset["row"]) == [0, 1, 2, 12]
    assert [len(batch["index"]) for batch in module.train_dataloader()] == [3]
    too_few = make_module(
        path, tmp_path, tokenizer=word_tokenizer_dir, mode="prompts", val_size=0, batch_size=5
    )
    with pytest.raises(ValueError, match="only 4 training prompts for batch_size=5"):
        too_few.setup()


def test_prompt_dataset_supplies_the_prompts(tmp_path, word_tokenizer_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"a {word}"} for word in WORDS])
    module = make_module(
        write_jsonl(tmp_path / "pairs.jsonl", word_rows(5)),
        tmp_path,
        tokenizer=word_tokenizer_dir,
        mode="prompts",
        prompt_dataset=str(prompts),
        val_size=2,
    )
    module.setup()
    assert len(module.train_dataset) == len(WORDS) - 2 and len(module.val_dataset) == 2
    task_prompts = builtin(tmp_path, mode="prompts", prompt_dataset="builtin:topics")
    expected = set(get_task("topics").prompt_dataset(64)["prompt"])
    decoded = {task_prompts.tokenizer.decode(ids) for ids in task_prompts.train_dataset["prompt_ids"]}
    assert len(decoded) == len(task_prompts.train_dataset) and decoded <= {p.lower() for p in expected}


def test_mode_comes_from_the_trainers_module(tmp_path):
    module = make_module("builtin:topics", tmp_path, builtin_size=32)
    with pytest.raises(ValueError, match="--data.mode"):
        module.setup()
    module.trainer = SimpleNamespace(lightning_module=SimpleNamespace(data_mode="sft"))
    module.setup()
    assert module.mode == "sft" and "response_input_ids" in next(iter(module.train_dataloader()))
    other = make_module("builtin:topics", tmp_path, builtin_size=32)
    other.trainer = SimpleNamespace(lightning_module=SimpleNamespace(data_mode="rollouts"))
    with pytest.raises(ValueError, match="data_mode is 'rollouts'"):
        other.setup()


def test_mode_must_fit_the_data(tmp_path, word_tokenizer_dir):
    path = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": f"the {word}", "response": "runs"} for word in WORDS]
    )
    with pytest.raises(ValueError, match="mode 'pairs' needs preference pairs"):
        make_module(path, tmp_path, tokenizer=word_tokenizer_dir, mode="pairs").setup()


def test_explicit_validation_file_and_split(tmp_path, word_tokenizer_dir):
    train = write_jsonl(tmp_path / "train.jsonl", word_rows(10))
    val = write_jsonl(tmp_path / "val.jsonl", word_rows(3))
    module = make_module(train, tmp_path, tokenizer=word_tokenizer_dir, mode="pairs", val_split=str(val))
    module.setup()
    assert (len(module.train_dataset), len(module.val_dataset)) == (10, 3)
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(word_rows(6)), "dev": datasets.Dataset.from_list(word_rows(2))}
    ).save_to_disk(tmp_path / "dict")
    module = make_module(
        tmp_path / "dict", tmp_path, tokenizer=word_tokenizer_dir, mode="pairs", val_split="dev"
    )
    module.setup()
    assert (len(module.train_dataset), len(module.val_dataset)) == (6, 2)
    with pytest.raises(ValueError, match="has no named splits"):
        make_module(train, tmp_path, tokenizer=word_tokenizer_dir, val_split="dev")


def test_max_samples_caps_the_rows(tmp_path, word_tokenizer_dir):
    path = write_jsonl(tmp_path / "rows.jsonl", word_rows(30))
    module = make_module(
        path, tmp_path, tokenizer=word_tokenizer_dir, mode="pairs", max_samples=12, val_size=2
    )
    module.setup()
    assert sorted([*module.train_dataset["row"], *module.val_dataset["row"]]) == list(range(12))


def test_hub_names_go_to_load_dataset(tmp_path, word_tokenizer_dir, monkeypatch):
    calls = []

    def fake_load_dataset(name, config, split, cache_dir):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(word_rows(5))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    module = make_module(
        "org/prefs",
        tmp_path,
        tokenizer=word_tokenizer_dir,
        mode="pairs",
        dataset_config="main",
        split="train_prefs",
        val_split="test_prefs",
    )
    module.setup()
    assert calls == [("org/prefs", "main", "train_prefs"), ("org/prefs", "main", "test_prefs")]


def test_offline_hub_failure_is_explained(tmp_path, word_tokenizer_dir):
    module = make_module("no-such-org/no-such-dataset", tmp_path, tokenizer=word_tokenizer_dir, mode="pairs")
    with pytest.raises(
        SourceError, match=r"could not load 'no-such-org/no-such-dataset'.*Offline mode is on"
    ):
        module.setup()


def test_bad_arguments_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        RLHFDataModule(str(tmp_path / "rows.jsonl"))
    with pytest.raises(ValueError, match="format must be one of"):
        RLHFDataModule(format="csv")
    with pytest.raises(ValueError, match="unknown built-in task 'nope'"):
        RLHFDataModule("builtin:nope")
    with pytest.raises(ValueError, match="must be < 1"):
        RLHFDataModule(val_size=1.5)
    with pytest.raises(ValueError, match="bpe:<vocab size>"):
        RLHFDataModule(tokenizer="bpe:12")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        make_module(tmp_path / "missing.jsonl", tmp_path, tokenizer="bpe:300", mode="pairs").setup()


def test_command_line_arguments_parse_with_their_help():
    parser = ArgumentParser()
    parser.add_class_arguments(RLHFDataModule, "data")
    config = parser.parse_args(
        ["--data.val_size", "100", "--data.mode", "pairs", "--data.tokenizer", "bpe:512"]
    )
    assert config.data.val_size == 100 and isinstance(config.data.val_size, int)
    assert parser.parse_args(["--data.val_size", "0.1"]).data.val_size == 0.1
    assert "longest prompt in tokens" in parser.format_help()


def test_trainer_resolves_the_mode_and_runs_with_and_without_validation(tmp_path):
    class Probe(pl.LightningModule):
        data_mode = "pairs"

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, batch_index):
            self.seen.append(batch["chosen_input_ids"].shape[0])
            return self.weight**2 + batch["chosen_mask"].float().mean()

        def validation_step(self, batch, batch_index):
            self.seen.append(-1)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    for val_size, expected in ((0.25, [8, -1]), (0, [8])):
        probe = Probe()
        trainer = pl.Trainer(
            max_steps=1,
            val_check_interval=1,
            limit_val_batches=1,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        module = make_module("builtin:topics", tmp_path, builtin_size=32, val_size=val_size)
        trainer.fit(probe, datamodule=module)
        assert module.mode == "pairs" and probe.seen == expected
