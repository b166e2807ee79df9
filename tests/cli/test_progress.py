"""Progress with true totals: `RunLength` by hand, the plain lines of `ProgressLines` and the rich bar's totals on
tiny modules, and a real `dvpo fit` whose stdout goes to a file, read while the run is still going."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from dvpo_lightning.callbacks import ProgressLines, RunLength, TotalsRichProgressBar
from tests.helpers.onpolicy import build_onpolicy, export_frozen_models
from tests.helpers.stages import quick_trainer, topics_data

REPO = Path(__file__).resolve().parents[2]


def length(max_steps=-1, max_epochs=-1, batches=10, accumulate=1, steps_per_iteration=None) -> RunLength:
    module = SimpleNamespace(
        automatic_optimization=steps_per_iteration is None,
        optimizer_steps_per_iteration=lambda: steps_per_iteration,
    )
    trainer = SimpleNamespace(
        max_steps=max_steps,
        max_epochs=max_epochs,
        num_training_batches=batches,
        accumulate_grad_batches=accumulate,
    )
    return RunLength.of(trainer, module)


def test_an_offline_stage_bounded_by_steps_runs_that_many_iterations_over_the_epochs_it_needs():
    assert length(max_steps=25, batches=10) == RunLength(25, 25, 3, 10, 1)


def test_an_on_policy_stage_runs_max_steps_over_its_steps_per_iteration_iterations():
    # The case Lightning's bar shows as `1/4`: one rollout of 4 optimiser steps.
    assert length(max_steps=4, batches=220, steps_per_iteration=4) == RunLength(1, 4, 1, 220, 4)
    # The configs' budget: 800 steps of 4 per rollout are 200 rollouts, not 220 batches.
    assert length(max_steps=800, batches=220, steps_per_iteration=4).iterations == 200


def test_epochs_bound_a_run_and_accumulation_divides_the_batches():
    assert length(max_epochs=2, batches=10, accumulate=4) == RunLength(6, 6, 2, 3, 1)
    assert length(max_steps=100, max_epochs=1, batches=10) == RunLength(10, 10, 1, 10, 1)
    assert length(batches=float("inf")) == RunLength(None, None, None, None, 1)


def test_a_manual_module_that_cannot_tell_its_steps_per_iteration_is_bounded_by_epochs_only():
    def cannot_tell():
        raise ValueError("without a data module the rollout size is unknown")

    trainer = SimpleNamespace(max_steps=10, max_epochs=2, num_training_batches=4, accumulate_grad_batches=1)
    for module in (
        SimpleNamespace(automatic_optimization=False),
        SimpleNamespace(automatic_optimization=False, optimizer_steps_per_iteration=cannot_tell),
    ):
        assert RunLength.of(trainer, module) == RunLength(8, None, 2, 4, None)


class Regression(pl.LightningModule):
    """A linear model with a validation loss; `rollout_steps` > 0 makes it an on-policy-like module."""

    def __init__(self, rollout_steps: int = 0) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.rollout_steps = rollout_steps
        self.automatic_optimization = rollout_steps == 0

    def loss(self, batch):
        return (self.layer(batch[:, :2]) - batch[:, 2:]).pow(2).mean()

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        if self.automatic_optimization:
            return loss
        for _ in range(self.rollout_steps):
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(self.loss(batch))
            optimizer.step()
        return None

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.loss(batch))

    def optimizer_steps_per_iteration(self) -> int:
        return self.rollout_steps

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(torch.randn(24, 3), batch_size=4)  # 6 batches an epoch

    def val_dataloader(self):
        return DataLoader(torch.randn(8, 3), batch_size=4)


def fit(tmp_path, module, bar, **options) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[bar],
        default_root_dir=tmp_path,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **options,
    )
    trainer.fit(module)
    return trainer


def test_progress_lines_report_steps_iterations_metrics_rate_eta_validation_and_checkpoints(tmp_path, capsys):
    fit(tmp_path, Regression(), ProgressLines(every_n_iterations=4), max_steps=8, val_check_interval=2)
    lines = capsys.readouterr().out.splitlines()
    training = [line for line in lines if "| iteration" in line]
    assert [re.search(r"step (\d+/\d+)", line).group(1) for line in training] == ["1/8", "4/8", "8/8"]
    for line in training:
        assert re.search(
            r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] step \d/8 \(\d+%\) \| iteration \d/8 \| epoch \d/2 \|", line
        )
        assert re.search(
            r"train/loss [-\d.e]+ \| [\d.e+]+ (it/s|s/it) \| elapsed \d:\d\d:\d\d \| ETA \d:\d\d:\d\d$", line
        )
    validations = [line for line in lines if "validation at" in line]
    assert [re.search(r"at (step \d+, iteration \d+)", line).group(1) for line in validations] == [
        f"step {step}, iteration {step}" for step in (2, 4, 6, 8)
    ]
    assert all(re.search(r": val/loss [-\d.e]+$", line) for line in validations)
    checkpoints = [line for line in lines if "checkpoint at" in line]
    assert [line.split("] ")[1].split(":")[0] for line in checkpoints] == [
        f"checkpoint at step {step}" for step in (2, 4, 6, 8)
    ]
    assert "epoch=1-step=8.ckpt" in checkpoints[-1]
    assert "training done: step 8/8, iteration 8/8" in lines[-1]


def test_progress_lines_of_an_on_policy_module_count_iterations_against_steps_per_iteration(tmp_path, capsys):
    fit(tmp_path, Regression(rollout_steps=4), ProgressLines(every_n_iterations=1), max_steps=12)
    training = [line for line in capsys.readouterr().out.splitlines() if "| iteration" in line]
    steps = [
        re.search(r"step (\d+/\d+) .* iteration (\d+/\d+) \| epoch (\d+/\d+)", line).groups()
        for line in training
    ]
    assert steps == [("4/12", "1/3", "1/1"), ("8/12", "2/3", "1/1"), ("12/12", "3/3", "1/1")]


def test_progress_lines_of_a_real_on_policy_stage_have_the_readmes_shape(tmp_path, capsys, cache, tokenizer):
    # The README's `step 4/800 (0%) | iteration 1/200 | epoch 1/1 | rollout/reward 0.412 | 2.1 s/it | elapsed
    # 0:00:02 | ETA 0:06:58`, at 2 optimiser steps per rollout.
    module = build_onpolicy("dvpo_gvm", tokenizer, export_frozen_models(tmp_path, tokenizer))
    trainer = quick_trainer(
        tmp_path, max_steps=4, callbacks=[ProgressLines(every_n_iterations=1)], enable_progress_bar=True
    )
    trainer.fit(module, datamodule=topics_data(cache))
    lines = capsys.readouterr().out.splitlines()
    assert any(
        "training DVPOModule: 2 iterations of 2 optimiser step(s), 4 steps, 1 epoch(s)" in line
        for line in lines
    )
    training = [line for line in lines if "| iteration" in line]
    assert len(training) == 2, lines
    for line, (step, iteration) in zip(training, [("2/4 (50%)", "1/2"), ("4/4 (100%)", "2/2")], strict=True):
        assert re.search(
            rf"\] step {re.escape(step)} \| iteration {iteration} \| epoch 1/1 \| rollout/reward [-\d.e]+ \| (rollout/gold_reward [-\d.e]+ \| )?"
            r"[\d.e+]+ (it/s|s/it) \| elapsed \d:\d\d:\d\d \| ETA \d:\d\d:\d\d$",
            line,
        ), line


class RecordBar(pl.Callback):
    """Records the rich bar's total and title at every training epoch start."""

    def __init__(self) -> None:
        self.seen = []

    def on_train_epoch_start(self, trainer, pl_module):
        bar = trainer.progress_bar_callback
        self.seen.append((bar.total_train_batches, bar._get_train_description(trainer.current_epoch).strip()))


@pytest.mark.parametrize(
    "rollout_steps, max_steps, seen",
    [
        (4, 8, [(2, "Epoch 1/1")]),  # Lightning: 6 batches, `Epoch 0/-2`
        (0, 8, [(6, "Epoch 1/2"), (2, "Epoch 2/2")]),
    ],
)
def test_the_rich_bar_counts_the_batches_each_epoch_really_runs(tmp_path, rollout_steps, max_steps, seen):
    record = RecordBar()
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        callbacks=[TotalsRichProgressBar(), record],
        max_steps=max_steps,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        enable_model_summary=False,
    )
    trainer.fit(Regression(rollout_steps=rollout_steps))
    assert record.seen == seen


class HoldUntilReleased(pl.Callback):
    """Waits at the end of the training batch that makes global step `step` until `<root>/release` exists, saying
    so in `<root>/held`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        root = Path(trainer.default_root_dir)
        (root / "held").touch()
        deadline = time.monotonic() + 300
        while not (root / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def test_a_run_writing_to_a_file_reports_progress_validation_and_checkpoints_while_it_runs(tmp_path, cache):
    root, log = tmp_path / "run", tmp_path / "run.log"
    hold = tmp_path / "hold.yaml"
    hold.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.cli.test_progress.HoldUntilReleased\n      init_args:\n"
        "        step: 5\n"
    )
    command = [
        sys.executable,
        "-m",
        "dvpo_lightning.cli",
        "fit",
        "--config=configs/sft.yaml",
        f"--config={hold}",
        f"--trainer.default_root_dir={root}",
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--data.init_args.builtin_size=100",
        "--data.init_args.val_size=10",
        "--data.init_args.batch_size=8",
    ]
    env = {**os.environ, "DVPO_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONUNBUFFERED", None)  # the lines must be flushed by the run itself
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not (root / "held").exists():
            assert process.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "the run never reached the step to hold at"
            time.sleep(0.2)
        text = (
            log.read_text()
        )  # the run is still going: held in step 5, after step 4's validation and checkpoint
        assert re.search(r"step 4/6 \(67%\) \| iteration 4/6 \| epoch 1/1 \| train/loss [\d.]+ \|", text), (
            text
        )
        assert re.search(r"validation at step 4, iteration 4: .*val/loss [\d.]+", text), text
        assert re.search(
            rf"checkpoint at step 4: {re.escape(str(root))}/checkpoints/epoch=0-step=4.ckpt", text
        ), text
        assert "training done" not in text
    finally:
        (root / "release").touch()
        assert process.wait(timeout=300) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "training done: step 6/6, iteration 6/6" in text
    # Lightning's messages that say nothing about the run are not printed.
    for noise in ("litlogger", "litmodels", "LeafSpec", "/proc/self/clear_refs"):
        assert noise not in text, noise
