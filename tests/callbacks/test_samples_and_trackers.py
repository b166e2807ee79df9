"""What a run shows of its model: validation samples of every stage, the on-policy reward on validation prompts
(any data, not only the built-in task), and real runs logging to Weights & Biases (offline) and MLflow (a local
file store) through `--trainer.logger` configs."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger

from dvpo_lightning.callbacks import SampleLogger
from dvpo_lightning.cli import run_cli
from dvpo_lightning.data import RLHFDataModule, get_task
from dvpo_lightning.modules import SamplingConfig, SFTModule
from tests.helpers.onpolicy import build_onpolicy, export_frozen_models
from tests.helpers.stages import build_stage, quick_trainer, tiny, topics_data

REPO = Path(__file__).resolve().parents[2]
SFT = str(REPO / "configs" / "sft.yaml")
VALIDATING = {"limit_val_batches": 1, "val_check_interval": 1, "num_sanity_val_steps": 0}


def validation_samples(root: Path) -> list[dict]:
    lines = (root / "samples.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["split"] == "validation"]


def test_an_offline_policy_stage_logs_its_validation_answers_with_their_rewards(tmp_path, cache, tokenizer):
    module = SFTModule(policy=tiny(), eval_sampling=SamplingConfig(max_new_tokens=4), tokenizer=tokenizer)
    trainer = quick_trainer(tmp_path, max_steps=1, callbacks=[SampleLogger(max_samples=2)], **VALIDATING)
    trainer.fit(module, datamodule=topics_data(cache))
    samples = validation_samples(tmp_path)
    assert len(samples) == 2
    assert {"prompt", "response", "finished", "gold_reward"} <= set(samples[0]) and samples[0][
        "global_step"
    ] == 1


def test_a_reward_model_logs_scored_validation_pairs(tmp_path, cache, tokenizer):
    trainer = quick_trainer(tmp_path, max_steps=1, callbacks=[SampleLogger(max_samples=3)], **VALIDATING)
    module = build_stage("reward_model", tokenizer)
    trainer.fit(module, datamodule=topics_data(cache))
    samples = validation_samples(tmp_path)
    assert len(samples) == 3
    assert {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"} <= set(samples[0])
    assert samples[0]["chosen"] != samples[0]["rejected"]


def test_on_policy_validation_reports_the_reward_it_optimises(tmp_path, cache, tokenizer):
    exports = export_frozen_models(tmp_path / "exports", tokenizer)
    module = build_onpolicy("dvpo_gvm", tokenizer, exports)
    module.eval_sampling = SamplingConfig(max_new_tokens=4)
    # User data: the built-in task's pairs in a file, so no gold reward is known.
    get_task("topics").preference_dataset(40).to_json(tmp_path / "pairs.jsonl")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    data = RLHFDataModule(
        str(tmp_path / "pairs.jsonl"),
        tokenizer=str(tmp_path / "tokenizer"),
        batch_size=4,
        val_size=4,
        cache_dir=str(cache),
    )
    trainer = quick_trainer(
        tmp_path, max_steps=2, logger=CSVLogger(tmp_path), log_every_n_steps=1, **VALIDATING
    )
    trainer.fit(module, datamodule=data)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/reward")]
    assert rows and "val/gold_reward" not in rows[0]
    assert float(rows[0]["val/reward"]) != 0.0  # the frozen GVM's final value of the answers


def run_sft_with(tmp_path, cache, monkeypatch, logger_config: str, *extra: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVPO_CACHE", str(cache))
    run_cli(
        [
            "fit",
            "--config",
            SFT,
            "--config",
            str(REPO / "configs" / "loggers" / logger_config),
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.builtin_size=100",
            "--data.init_args.val_size=10",
            "--data.init_args.batch_size=8",
            *extra,
        ]
    )


def test_a_run_logs_to_weights_and_biases_offline(tmp_path, cache, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="the trackers extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_sft_with(
        tmp_path, cache, monkeypatch, "wandb.yaml", f"--trainer.logger.init_args.save_dir={tmp_path / 'wb'}"
    )
    wandb.finish()  # what the end of a `dvpo` process does
    [run] = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    # The run's records: metric names and the sample table key are stored as plain strings. W&B's writer is a
    # process of its own that may still be flushing after `finish` returns on a loaded machine: wait for it.
    keys = (b"train/loss", b"val/loss", b"val/gold_reward", b"val_samples")
    deadline = time.monotonic() + 60
    while not all(key in run.read_bytes() for key in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    records = run.read_bytes()
    for key in keys:
        assert key in records, key


def test_a_run_logs_to_a_local_mlflow_file_store(tmp_path, cache, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="the trackers extra is not installed")
    store = f"file:{tmp_path / 'mlruns'}"
    run_sft_with(
        tmp_path, cache, monkeypatch, "mlflow.yaml", f"--trainer.logger.init_args.tracking_uri={store}"
    )
    client = mlflow.tracking.MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("dvpo-lightning").experiment_id])
    assert [metric.step for metric in client.get_metric_history(run.info.run_id, "train/loss")] == [
        0,
        1,
        2,
        3,
    ]
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 2
    assert run.data.params["optim/lr"] == "0.003"
    artifacts = [item.path for item in client.list_artifacts(run.info.run_id, "val_samples")]
    assert artifacts == ["val_samples/step_00000002.md", "val_samples/step_00000004.md"]
    assert (tmp_path / "run" / "model" / "dvpo_export.json").is_file()


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_runs_logging_to_one_tracker_store_keep_their_reports_apart(tmp_path, cache, monkeypatch, tracker):
    pytest.importorskip(tracker, reason="the trackers extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    store = (
        f"--trainer.logger.init_args.save_dir={tmp_path / 'wb'}"
        if tracker == "wandb"
        else f"--trainer.logger.init_args.tracking_uri=file:{tmp_path / 'mlruns'}"
    )
    reports = ("config.yaml", "samples.jsonl", "peak_memory.json", "throughput.json")
    for run in ("first", "second"):
        run_sft_with(
            tmp_path, cache, monkeypatch, f"{tracker}.yaml", store, f"--trainer.default_root_dir={run}"
        )
        if tracker == "wandb":
            import wandb

            wandb.finish()
    found = {report: sorted(tmp_path.rglob(report)) for report in reports}
    assert all(len(paths) == 2 for paths in found.values()), found
    folders = {paths[0].parent for paths in found.values()} | {paths[1].parent for paths in found.values()}
    assert len(folders) == 2  # one folder per run, holding all four
    configs = [path.read_text() for path in found["config.yaml"]]
    assert {"first" in text and "second" not in text for text in configs} == {True, False}
