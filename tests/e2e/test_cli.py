"""The `dvpo` CLI: printing and composing configs, what a run writes, resuming, and the tokenizer link.

One short SFT run (module-scoped `first_run`) serves the tests of what a run writes and of the tokenizer. Its data uses a tokenizer of its own (the built-in task's words in another
order), so the test of the data -> model tokenizer link can tell it from the built-in one.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from dvpo_lightning.cli import main
from dvpo_lightning.data import get_task
from tests.helpers.tiny import make_word_tokenizer

SFT = str(Path(__file__).resolve().parents[2] / "configs" / "sft.yaml")


def run_sft(root: Path, cache: Path, tokenizer: Path, *extra: str) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DVPO_CACHE", str(cache))
        main(
            [
                "fit",
                "--config",
                SFT,
                f"--trainer.default_root_dir={root}",
                "--trainer.log_every_n_steps=1",
                "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false",
                "--data.init_args.builtin_size=100",
                "--data.init_args.val_size=10",
                "--data.init_args.batch_size=8",
                f"--data.init_args.tokenizer={tokenizer}",
                *extra,
            ]
        )


def logged_steps(metrics_csv: Path, column: str) -> list[int]:
    with open(metrics_csv) as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row.get(column)]


def checkpoint_step(path: Path) -> int:
    return torch.load(path, weights_only=False)["global_step"]


@pytest.fixture(scope="module")
def shuffled_tokenizer(tmp_path_factory) -> Path:
    """The built-in task's words with other ids than the task's own tokenizer gives them."""
    directory = tmp_path_factory.mktemp("shuffled_tokenizer")
    make_word_tokenizer(directory, words=list(reversed(get_task("topics").words())))
    return directory


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, shuffled_tokenizer) -> Path:
    root = tmp_path_factory.mktemp("run")
    run_sft(root / "sft", root / "cache", shuffled_tokenizer, "--trainer.max_steps=2")
    return root


def print_config(capsys, *configs: str) -> dict:
    arguments = ["fit"] + [item for config in configs for item in ("--config", config)] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_names_the_model_and_data_classes(capsys):
    config = print_config(capsys, SFT)
    assert config["model"]["class_path"] == "dvpo_lightning.modules.SFTModule"
    assert config["data"]["class_path"] == "dvpo_lightning.data.RLHFDataModule"
    assert config["checkpoint"]["save_last"] is True


def test_a_second_config_overrides_the_first_and_keeps_the_rest(capsys, tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("trainer:\n  max_steps: 7\nmodel:\n  init_args:\n    optim:\n      lr: 0.5\n")
    config = print_config(capsys, SFT, str(override))
    assert config["trainer"]["max_steps"] == 7
    assert config["model"]["init_args"]["optim"]["lr"] == 0.5
    # Everything the override does not mention comes from the first config.
    assert config["model"]["class_path"] == "dvpo_lightning.modules.SFTModule"
    assert config["model"]["init_args"]["optim"]["weight_decay"] == 0.01
    assert config["model"]["init_args"]["policy"]["arch"]["hidden_size"] == 64
    assert config["trainer"]["default_root_dir"] == "outputs/builtin/sft"


def test_a_run_writes_csv_and_tensorboard_logs_and_a_last_checkpoint(first_run):
    root = first_run / "sft"
    logs = root / "logs" / "version_0"
    assert logged_steps(logs / "metrics.csv", "train/loss") == [0, 1]
    assert list(logs.glob("events.out.tfevents.*"))
    assert checkpoint_step(root / "checkpoints" / "last.ckpt") == 2
    assert (root / "model" / "config.json").is_file()


def test_ckpt_path_last_resumes_from_the_saved_step_and_continues_the_logs(shuffled_tokenizer, tmp_path):
    root, cache = tmp_path / "sft", tmp_path / "cache"
    run_sft(root, cache, shuffled_tokenizer, "--trainer.max_steps=2")
    run_sft(root, cache, shuffled_tokenizer, "--trainer.max_steps=4", "--ckpt_path=last")
    # The same log version, continued from the step count, and a checkpoint at the new end.
    assert logged_steps(root / "logs" / "version_0" / "metrics.csv", "train/loss") == [0, 1, 2, 3]
    assert not (root / "logs" / "version_1").exists()
    assert checkpoint_step(root / "checkpoints" / "last.ckpt") == 4
    assert not list((root / "checkpoints").glob("last-v*"))


def test_ckpt_path_last_without_a_checkpoint_is_refused_in_one_line(shuffled_tokenizer, tmp_path, capsys):
    root, cache = tmp_path / "sft", tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_info:
        run_sft(root, cache, shuffled_tokenizer, "--trainer.max_steps=2", "--ckpt_path=last")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"dvpo: error: --ckpt_path last: there is no checkpoint to resume ({root}/checkpoints/last.ckpt does not "
        "exist); leave --ckpt_path out to start a fresh run (--debug shows the traceback)"
    )
    assert not (root / "checkpoints").exists()


def test_a_run_resumed_from_an_earlier_checkpoint_logs_each_step_once(shuffled_tokenizer, tmp_path):
    # As after a kill: the run went on (to step 4) after the checkpoint it is resumed from (step 2).
    root, cache = tmp_path / "sft", tmp_path / "cache"
    every_2 = ("--checkpoint.every_n_train_steps=2", "--checkpoint.save_top_k=-1")
    run_sft(root, cache, shuffled_tokenizer, "--trainer.max_steps=4", *every_2)
    earlier = root / "checkpoints" / "epoch=0-step=2.ckpt"
    run_sft(root, cache, shuffled_tokenizer, "--trainer.max_steps=6", f"--ckpt_path={earlier}", *every_2)
    logs = root / "logs" / "version_0"
    assert logged_steps(logs / "metrics.csv", "train/loss") == [0, 1, 2, 3, 4, 5]
    assert [row["step"] for row in csv.DictReader(open(logs / "metrics.csv")) if row.get("lr-AdamW/pg1")] == [
        str(step) for step in range(6)
    ]


def test_a_fresh_run_into_a_directory_with_an_earlier_runs_results_is_refused(
    shuffled_tokenizer, tmp_path, capsys
):
    root, cache = tmp_path / "sft", tmp_path / "cache"
    run_sft(root, cache, shuffled_tokenizer, "--trainer.max_steps=2")
    exported = (root / "model" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_sft(root, cache, shuffled_tokenizer, "--trainer.max_steps=3")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert f"{root} holds the results of an earlier run (checkpoints/last.ckpt, model)" in message
    assert "--ckpt_path last" in message and "--overwrite true" in message
    # Nothing was touched.
    assert checkpoint_step(root / "checkpoints" / "last.ckpt") == 2
    assert (root / "model" / "model.safetensors").stat().st_mtime_ns == exported


def test_overwrite_starts_over_leaving_only_the_new_runs_checkpoints_logs_and_export(
    shuffled_tokenizer, tmp_path
):
    root, cache = tmp_path / "sft", tmp_path / "cache"
    run_sft(root, cache, shuffled_tokenizer, "--trainer.max_steps=2")
    run_sft(root, cache, shuffled_tokenizer, "--trainer.max_steps=3", "--overwrite=true")
    assert [path.name for path in (root / "checkpoints").iterdir()] == ["last.ckpt"]
    assert checkpoint_step(root / "checkpoints" / "last.ckpt") == 3
    assert [path.name for path in (root / "logs").iterdir()] == ["version_0"]
    assert logged_steps(root / "logs" / "version_0" / "metrics.csv", "train/loss") == [0, 1, 2]
    assert json.loads((root / "model" / "dvpo_export.json").read_text())["global_step"] == 3


def directory_contents(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()
    }


SHORT = ("--data.init_args.max_prompt_length=16", "--data.init_args.max_response_length=16")


@pytest.mark.parametrize(
    "failure, message",
    [
        (
            ("--model.init_args.optim.lr=-1e-3",),
            "lr must be a positive number",
        ),  # refused when the model is built
        (
            ("--data.init_args.strict=true", "--data.init_args.val_size=0", *SHORT),
            "line 2: wrong_type",
        ),  # found when the data is read, after the model's checks
    ],
    ids=["bad_option", "bad_row_under_strict"],
)
def test_an_overwrite_that_fails_before_its_first_checkpoint_leaves_the_earlier_run_as_it_was(
    failure, message, shuffled_tokenizer, tmp_path, capsys
):
    root, cache = tmp_path / "sft", tmp_path / "cache"
    run_sft(root, cache, shuffled_tokenizer, "--trainer.max_steps=2")
    before = directory_contents(root)
    bad_rows = tmp_path / "bad.jsonl"
    row = '{"prompt": "apple", "chosen": %s, "rejected": "horse"}\n'
    bad_rows.write_text(row % '"river"' + row % "5")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_sft(
            root,
            cache,
            shuffled_tokenizer,
            "--overwrite=true",
            f"--data.init_args.dataset={bad_rows}",
            *failure,
        )
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert directory_contents(root) == before  # nothing moved, lost or added, no `.overwritten` left


def test_the_data_modules_tokenizer_reaches_the_model(first_run, shuffled_tokenizer):
    # The model exports the tokenizer it was given: the data's, not the built-in task's default.
    exported = json.loads((first_run / "sft" / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    data = json.loads((shuffled_tokenizer / "tokenizer.json").read_text())["model"]["vocab"]
    builtin = get_task("topics").tokenizer(first_run / "cache").get_vocab()
    assert exported == data
    assert exported != builtin
