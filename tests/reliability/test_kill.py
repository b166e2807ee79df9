"""A run killed hard (SIGKILL) mid-training resumes from its last checkpoint and logs exactly what an
uninterrupted run logs: step counters, optimiser and scheduler state, KL controller, data position and random
state all come back. Real `dvpo fit` subprocesses on the repository's configs, with tiny models and data.

Each case starts two identical runs at once: one runs to the end; the other carries `HoldAtStep`, which stops
it just after the checkpoint of global step `HOLD_STEPS[stage]` is written, and the test then SIGKILLs it and
resumes it with `--ckpt_path last`. Everything the two then log must be equal, except time, memory and
throughput, and they export the same weights. Marked slow (over a minute on 2 CPU cores); the same resume,
in process and without the kill, is in the fast suite (`test_reliability_resume.py`).

DVPO is the hard case (it samples its rollouts and shuffles its mini-batches); its run also validates with
sampling (which must not disturb training's random stream) and crosses an epoch boundary after the resume.
The GVM run is the offline case (automatic optimisation, a cosine schedule with warm-up).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from dvpo_lightning.cli.logs import resumed_log_step
from dvpo_lightning.models import build_policy, export_model
from tests.helpers.stages import export_random_value_model, tiny, topics_data

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
VOLATILE = ("time/", "perf/")  # wall-clock, memory and throughput columns differ between any two runs


class HoldAtStep(pl.Callback):
    """Stops training (sleeping) at the first batch after global step `step`, and says so in `<root>/held`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            Path(trainer.default_root_dir, "held").touch()
            time.sleep(600)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    """A tiny SFT policy and a GVM with a random head (values that vary), exported with the built-in tokenizer."""
    root = tmp_path_factory.mktemp("exports")
    tokenizer = topics_data(root / "cache").tokenizer
    export_model(build_policy(tiny(), tokenizer), tokenizer, str(root / "sft"))
    export_random_value_model(root / "gvm", tokenizer)
    return root


# DVPO: 2 PPO epochs x 2 mini-batches, 4 optimiser steps a rollout, 3 rollouts an epoch: killed after 2 rollouts,
# the resumed run finishes the epoch and does 2 rollouts of the next. GVM: one optimiser step a batch.
HOLD_STEPS = {"dvpo": 8, "gvm": 4}
MAX_STEPS = {"dvpo": 20, "gvm": 10}


def dvpo_args(exports: Path) -> list[str]:
    return [
        "--config=configs/dvpo.yaml",
        f"--model.init_args.policy.name_or_path={exports / 'sft'}",
        f"--model.init_args.value_model.name_or_path={exports / 'gvm'}",
        f"--data.init_args.tokenizer={exports / 'sft'}",
        "--model.init_args.sampling.max_new_tokens=6",
        "--model.init_args.eval_sampling.max_new_tokens=6",
        "--model.init_args.ppo.mini_batch_size=2",
        "--model.init_args.ppo.kl_controller=adaptive",  # a KL controller with state
        "--model.init_args.ppo.kl_target=0.1",
        "--data.init_args.batch_size=4",
        "--data.init_args.builtin_size=16",
        "--data.init_args.val_size=1",
        "--trainer.val_check_interval=1",
        "--trainer.limit_val_batches=1",
        "--checkpoint.every_n_train_steps=4",
    ]


def gvm_args(exports: Path) -> list[str]:
    return [
        "--config=configs/gvm.yaml",
        f"--model.init_args.model.name_or_path={exports / 'sft'}",
        f"--data.init_args.tokenizer={exports / 'sft'}",
        "--model.init_args.optim.warmup_ratio=0.2",
        "--data.init_args.batch_size=4",
        "--data.init_args.builtin_size=40",
        "--data.init_args.val_size=0",
        "--trainer.limit_val_batches=0",
        "--checkpoint.every_n_train_steps=2",
    ]


def launch(root: Path, exports: Path, args: list[str], max_steps: int, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "dvpo_lightning.cli",
        "fit",
        *args,
        f"--trainer.default_root_dir={root}",
        f"--trainer.max_steps={max_steps}",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]
    env = {**os.environ, "DVPO_CACHE": str(exports / "cache"), "OMP_NUM_THREADS": "1"}
    log = open(root.with_suffix(".log"), "a")  # the process keeps it open until it ends
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, root: Path) -> None:
    assert process.wait(timeout=600) == 0, root.with_suffix(".log").read_text()[-6000:]


def metric_rows(root: Path, version: int) -> list[dict[str, str]]:
    with open(root / "logs" / f"version_{version}" / "metrics.csv") as handle:
        return [
            {key: value for key, value in row.items() if value != "" and not key.startswith(VOLATILE)}
            for row in csv.DictReader(handle)
        ]


def killed_and_resumed(
    tmp_path: Path, exports: Path, args: list[str], hold_step: int, max_steps: int
) -> tuple[Path, Path, int]:
    """Roots of an uninterrupted run and of a run killed after global step `hold_step` and resumed, and the first
    logging step of the resumed run."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    hold = tmp_path / "hold.yaml"
    hold.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.reliability.test_kill.HoldAtStep\n"
        f"      init_args:\n        step: {hold_step}\n"
    )
    uninterrupted = launch(whole, exports, args, max_steps)
    doomed = launch(killed, exports, args, max_steps, f"--config={hold}")
    deadline = time.monotonic() + 600
    while not (killed / "held").exists():
        assert doomed.poll() is None, killed.with_suffix(".log").read_text()[-6000:]
        assert time.monotonic() < deadline, "the run never reached the step to be killed at"
        time.sleep(0.2)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == hold_step
    first_resumed_step = resumed_log_step(str(killed / "checkpoints" / "last.ckpt"))
    finish(launch(killed, exports, args, max_steps, "--ckpt_path=last"), killed)
    finish(uninterrupted, whole)
    return whole, killed, first_resumed_step


@pytest.mark.parametrize("stage", ["dvpo", "gvm"])
def test_a_run_killed_mid_training_resumes_to_the_same_metrics_and_weights(stage, tmp_path, exports):
    args = (dvpo_args if stage == "dvpo" else gvm_args)(exports)
    whole, killed, first = killed_and_resumed(tmp_path, exports, args, HOLD_STEPS[stage], MAX_STEPS[stage])

    # The resumed run continues the killed run's log: together they logged what the uninterrupted run logged.
    assert not (killed / "logs" / "version_1").exists()
    assert metric_rows(killed, version=0) == metric_rows(whole, version=0)
    # The resumed run logged the metrics that depend on what was restored, not just the step counters.
    assert first > 0  # it went on from the checkpoint, not from the start
    logged = set().union(*(row for row in metric_rows(killed, version=0) if int(row["step"]) >= first))
    restored = (
        {"rollout/reward", "kl/coef", "policy/loss", "val/kl_ref"} if stage == "dvpo" else {"train/loss"}
    )
    assert restored <= logged
    assert any(name.startswith("lr-AdamW") for name in logged)

    exported = {
        name: load_file(root / "model" / "model.safetensors") for name, root in (("w", whole), ("k", killed))
    }
    assert exported["w"].keys() == exported["k"].keys()
    for key, weight in exported["w"].items():
        assert torch.equal(weight, exported["k"][key]), key
