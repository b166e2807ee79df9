"""Callbacks: peak memory, throughput and sample logging on a tiny LightningModule (CPU, a few steps)."""

from __future__ import annotations

import csv
import json
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from dvpo_lightning.callbacks import PeakMemoryMonitor, SampleLogger, ThroughputMonitor
from dvpo_lightning.callbacks.memory_probes import CudaProbe, SampledRssProbe
from dvpo_lightning.callbacks.samples import markdown_table
from dvpo_lightning.callbacks.work_counts import Tally, batch_samples, batch_tokens, count_work

BIG_MIB = 200  # one allocation that must show up in a peak
BIG_GIB = BIG_MIB / 1024
SMALL_GIB = 0.1  # what a step without it must stay under


def allocate_big() -> None:
    """Touch BIG_MIB of memory (ones, so every page is resident) and free it."""
    big = torch.ones(BIG_MIB * 2**20 // 4)
    del big


def split_layout_rows(n: int = 8) -> list[dict[str, torch.Tensor]]:
    """Rows in the split layout; a batch of two consecutive rows holds 4 + 7 = 11 real tokens."""
    short = {"prompt_attention_mask": [0, 1, 1], "response_mask": [1, 1, 0, 0]}  # 4 tokens
    full = {"prompt_attention_mask": [1, 1, 1], "response_mask": [1, 1, 1, 1]}  # 7 tokens
    return [
        {"x": torch.randn(4), **{key: torch.tensor(mask, dtype=torch.bool) for key, mask in masks.items()}}
        for masks in [short, full] * (n // 2)
    ]


@contextmanager
def rl_stage(module: LightningModule, stage: str):
    """What on-policy modules do around generate / score / update: call the stage hooks of every callback."""
    hooked = [cb for cb in module.trainer.callbacks if hasattr(cb, "on_rl_phase_start")]
    for callback in hooked:
        callback.on_rl_phase_start(module.trainer, module, stage)
    yield
    for callback in hooked:
        callback.on_rl_phase_end(module.trainer, module, stage)


class TinyModule(LightningModule):
    """A linear layer; allocates BIG_MIB in the training steps listed in `big_steps` (0-based batch index)."""

    def __init__(self, big_steps: tuple[int, ...] = (), output_counts: dict | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.big_steps = big_steps
        self.output_counts = output_counts or {}

    def training_step(self, batch, batch_idx):
        if batch_idx in self.big_steps:
            allocate_big()
        loss = self.layer(batch["x"]).pow(2).mean()
        return {"loss": loss, **self.output_counts}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(split_layout_rows(), batch_size=2)


class TinyRLModule(TinyModule):
    """Manual optimisation like the on-policy modules: one training step = generate (big), score, 2 updates."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        with rl_stage(self, "generate"):
            allocate_big()
        with rl_stage(self, "score"):
            scores = self.layer(batch["x"]).detach()
        optimizer = self.optimizers()
        with rl_stage(self, "update"):
            for _ in range(2):
                loss = (self.layer(batch["x"]) - scores).pow(2).mean()
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
        self.last_samples = [
            {"prompt": f"p{batch_idx}-{i}", "response": "r", "reward": 0.5 * i} for i in range(3)
        ]
        return {"num_samples": 3, "num_tokens": 7}


def fit(module: LightningModule, callbacks: list, tmp_path, max_steps: int = 3, **trainer_kwargs) -> Trainer:
    trainer_kwargs = {"logger": CSVLogger(tmp_path), "log_every_n_steps": 1, **trainer_kwargs}
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        **trainer_kwargs,
    )
    trainer.fit(module)
    return trainer


def logged(trainer: Trainer, name: str) -> list[float]:
    """Every value of metric `name` in the CSV logger's metrics.csv, in order."""
    with open(f"{trainer.logger.log_dir}/metrics.csv") as file:
        return [float(row[name]) for row in csv.DictReader(file) if row.get(name)]


# ---- PeakMemoryMonitor --------------------------------------------------------------------------------------------


def test_peak_memory_cpu_each_step_has_its_own_peak(tmp_path):
    monitor = PeakMemoryMonitor()
    trainer = fit(TinyModule(big_steps=(1,)), [monitor], tmp_path)

    assert monitor.summary["method"].startswith("VmHWM")  # Linux: the kernel's high-water mark
    rss = logged(trainer, "perf/rss_gb")
    assert len(rss) == 3 and all(value > 0 for value in rss)
    peaks = logged(trainer, "perf/peak_rss_above_baseline_gb")
    assert len(peaks) == 3
    assert peaks[1] >= 0.9 * BIG_GIB  # the step that allocated
    assert peaks[0] < SMALL_GIB and peaks[2] < SMALL_GIB  # the reset after step 1 forgot it
    assert monitor.summary["overall"]["peak_rss_above_baseline_gb"] >= 0.9 * BIG_GIB
    assert monitor.summary["training_steps"] == 3
    written = json.loads((tmp_path / "lightning_logs" / "version_0" / "peak_memory.json").read_text())
    assert written == monitor.summary


def test_peak_memory_logged_value_covers_every_step_since_the_last_one(tmp_path):
    # The trainer writes logs on steps 2 and 4; the allocation happens in step 1 and must show at step 2.
    trainer = fit(
        TinyModule(big_steps=(0,)), [PeakMemoryMonitor()], tmp_path, max_steps=4, log_every_n_steps=2
    )

    peaks = logged(trainer, "perf/peak_rss_above_baseline_gb")
    assert len(peaks) == 2
    assert peaks[0] >= 0.9 * BIG_GIB
    assert peaks[1] < SMALL_GIB


def test_peak_memory_without_reset_logs_the_running_peak(tmp_path):
    trainer = fit(TinyModule(big_steps=(0,)), [PeakMemoryMonitor(reset_each_step=False)], tmp_path)

    peaks = logged(trainer, "perf/peak_rss_above_baseline_gb")
    assert len(peaks) == 3 and min(peaks) >= 0.9 * BIG_GIB


def test_peak_memory_interval_must_be_a_multiple_of_the_trainers(tmp_path):
    with pytest.raises(
        ValueError, match=r"log_every_n_steps=3\) must be a multiple of Trainer\(log_every_n_steps=2"
    ):
        fit(TinyModule(), [PeakMemoryMonitor(log_every_n_steps=3)], tmp_path, log_every_n_steps=2)


def test_peak_memory_stage_hooks_log_each_stage(tmp_path):
    monitor = PeakMemoryMonitor()
    trainer = fit(TinyRLModule(), [monitor], tmp_path, max_steps=4)  # 2 iterations x 2 optimiser steps

    generate = logged(trainer, "perf/generate/peak_rss_above_baseline_gb")
    score = logged(trainer, "perf/score/peak_rss_above_baseline_gb")
    update = logged(trainer, "perf/update/peak_rss_above_baseline_gb")
    assert len(generate) == len(score) == len(update) == 2
    assert min(generate) >= 0.9 * BIG_GIB
    assert max(score) < SMALL_GIB and max(update) < SMALL_GIB
    # The stage resets do not hide the allocation from the step's own peak.
    assert min(logged(trainer, "perf/peak_rss_above_baseline_gb")) >= 0.9 * BIG_GIB

    stages = monitor.summary["phases"]
    assert set(stages) == {"generate", "score", "update"}
    assert stages["generate"]["peak_rss_above_baseline_gb"] >= 0.9 * BIG_GIB
    assert stages["update"]["peak_rss_above_baseline_gb"] < SMALL_GIB
    assert (
        monitor.summary["overall"]["peak_rss_above_baseline_gb"]
        >= stages["generate"]["peak_rss_above_baseline_gb"]
    )
    assert monitor.summary["training_steps"] == 2


def test_peak_memory_stage_end_without_start_is_an_error(tmp_path):
    class Unbalanced(TinyModule):
        def training_step(self, batch, batch_idx):
            monitor = self.trainer.callbacks[0]
            monitor.on_rl_phase_end(self.trainer, self, "score")

    with pytest.raises(
        RuntimeError, match=r"on_rl_phase_end\('score'\) without a matching on_rl_phase_start"
    ):
        fit(Unbalanced(), [PeakMemoryMonitor()], tmp_path)


def test_peak_memory_summary_without_a_logger_goes_to_default_root_dir(tmp_path):
    monitor = PeakMemoryMonitor()
    fit(TinyModule(), [monitor], tmp_path, logger=False)

    assert json.loads((tmp_path / "peak_memory.json").read_text()) == monitor.summary


def test_sampled_rss_probe_sees_a_held_allocation_and_forgets_it_after_reset():
    probe = SampledRssProbe(interval_s=0.001)
    probe.start()
    try:
        big = torch.ones(BIG_MIB * 2**20 // 4)
        time.sleep(0.05)  # several samples while it is held
        del big
        assert probe.peak()["peak_rss_above_baseline_gb"] >= 0.9 * BIG_GIB
        probe.reset()
        assert probe.peak()["peak_rss_above_baseline_gb"] < SMALL_GIB
    finally:
        probe.stop()
    assert probe._thread is None


def test_cuda_probe_reads_gib_and_resets_the_device_peak(monkeypatch):
    device = torch.device("cuda", 0)
    resets = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 3 * 2**30 if d == device else 0)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: 2**29 if d == device else 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets.append)

    probe = CudaProbe(device)
    assert probe.peak() == {"max_memory_allocated_gb": 3.0, "max_memory_reserved_gb": 0.5}
    probe.reset()
    assert resets == [device]


# ---- ThroughputMonitor --------------------------------------------------------------------------------------------


def test_throughput_counts_tokens_from_the_batch_masks(tmp_path):
    monitor = ThroughputMonitor()
    trainer = fit(TinyModule(), [monitor], tmp_path)

    assert monitor.summary["samples"] == 3 * 2
    assert monitor.summary["tokens"] == 3 * 11
    assert monitor.summary["tokens_per_sec"] == pytest.approx(33 / monitor.summary["train_step_seconds"])
    assert monitor.summary["fit_wall_seconds"] >= monitor.summary["train_step_seconds"] > 0
    assert "mfu" not in monitor.summary  # CPU: no known peak FLOPs
    tokens_per_sec = logged(trainer, "perf/tokens_per_sec")
    samples_per_sec = logged(trainer, "perf/samples_per_sec")
    assert len(tokens_per_sec) == len(samples_per_sec) == 3
    for tokens, samples in zip(tokens_per_sec, samples_per_sec):
        assert tokens / samples == pytest.approx(
            11 / 2, rel=1e-5
        )  # same time, so the rates keep the counts' ratio
    [epoch_tokens] = logged(
        trainer, "perf/epoch_tokens_per_sec"
    )  # 3 steps of a 4-batch epoch: stopped mid-epoch
    assert epoch_tokens == pytest.approx(monitor.summary["tokens_per_sec"], rel=1e-5)
    written = json.loads((tmp_path / "lightning_logs" / "version_0" / "throughput.json").read_text())
    assert written == monitor.summary


def test_throughput_uses_the_counts_training_step_returns(tmp_path):
    monitor = ThroughputMonitor()
    trainer = fit(TinyRLModule(), [monitor], tmp_path, max_steps=4)

    assert monitor.summary["training_steps"] == 2
    assert (monitor.summary["samples"], monitor.summary["tokens"]) == (2 * 3, 2 * 7)
    for tokens, samples in zip(
        logged(trainer, "perf/tokens_per_sec"), logged(trainer, "perf/samples_per_sec")
    ):
        assert tokens / samples == pytest.approx(7 / 3, rel=1e-5)


def test_count_work_rule():
    rows = split_layout_rows(2)
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    assert count_work({"loss": torch.tensor(1.0)}, batch) == (2, 11)
    assert count_work({"num_tokens": torch.tensor(5), "num_samples": 1}, batch) == (1, 5)
    assert count_work(None, (torch.zeros(6, 3), torch.zeros(6))) == (6, None)  # no mask: tokens unknown
    assert batch_tokens({"attention_mask": torch.tensor([[1.0, 1.0, 0.0]]), "labels": torch.ones(1, 3)}) == 2
    with pytest.raises(ValueError, match="num_tokens must be a non-negative whole number, got -1"):
        count_work({"num_tokens": -1}, batch)
    with pytest.raises(ValueError, match="return `num_samples` from training_step"):
        batch_samples({"text": ["a", "b"]})


def test_tally_rates_by_hand():
    tally = Tally()
    tally.add(seconds=2.0, samples=4, tokens=10, flops=1e12)
    tally.add(seconds=3.0, samples=6, tokens=20, flops=4e12)
    # 10 samples, 30 tokens, 5e12 FLOPs in 5 s on a 2e12 FLOP/s device.
    assert tally.rates(available_flops=2e12) == {"samples_per_sec": 2.0, "tokens_per_sec": 6.0, "mfu": 0.5}
    tally.add(seconds=5.0, samples=10, tokens=None, flops=None)  # one step with unknown counts
    assert tally.rates(available_flops=2e12) == {"samples_per_sec": 2.0}


# ---- SampleLogger -------------------------------------------------------------------------------------------------


def test_sample_logger_writes_jsonl_and_tensorboard_text(tmp_path, monkeypatch):
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    texts = []
    monkeypatch.setattr(
        tensorboard.experiment, "add_text", lambda tag, text, global_step: texts.append((tag, global_step))
    )
    fit(
        TinyRLModule(),
        [SampleLogger(every_n_steps=2, max_samples=2)],
        tmp_path,
        max_steps=8,
        logger=tensorboard,
    )

    # 4 iterations of 2 optimiser steps; iterations 2 and 4 are logged, 2 samples each.
    lines = (tmp_path / "tb" / "version_0" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"global_step": 4, "split": "train", "prompt": "p1-0", "response": "r", "reward": 0.0},
        {"global_step": 4, "split": "train", "prompt": "p1-1", "response": "r", "reward": 0.5},
        {"global_step": 8, "split": "train", "prompt": "p3-0", "response": "r", "reward": 0.0},
        {"global_step": 8, "split": "train", "prompt": "p3-1", "response": "r", "reward": 0.5},
    ]
    assert texts == [("samples", 4), ("samples", 8)]


def test_sample_logger_without_logger_or_samples(tmp_path):
    fit(TinyRLModule(), [SampleLogger(every_n_steps=1)], tmp_path, max_steps=2, logger=False)
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 3

    fit(TinyModule(), [SampleLogger(every_n_steps=1)], tmp_path / "plain", max_steps=2, logger=False)
    assert not (tmp_path / "plain" / "samples.jsonl").exists()  # no last_samples: nothing to log


def test_markdown_table_escapes_cells():
    table = markdown_table([{"prompt": "a|b", "reward": 0.123456}, {"prompt": "two\nlines", "extra": 1}])
    assert table == (
        "| prompt | reward | extra |\n|---|---|---|\n| a\\|b | 0.1235 |  |\n| two<br>lines |  | 1 |"
    )


def test_a_resumed_run_drops_the_samples_logged_after_its_checkpoint(tmp_path):
    logger = SampleLogger()
    logger.path = tmp_path / "samples.jsonl"
    logger.path.write_text(
        "".join(json.dumps({"global_step": step, "prompt": "p"}) + "\n" for step in range(1, 7))
    )
    logger.on_train_start(SimpleNamespace(global_step=4), None)  # resumed from the checkpoint of step 4
    assert [json.loads(line)["global_step"] for line in logger.path.read_text().splitlines()] == [1, 2, 3, 4]
