"""Checkpoints are written atomically: a process SIGKILLed while saving leaves the previous checkpoint whole;
the `dvpo` CLI saves through `AtomicCheckpointIO` and keeps the random state and the non-finite guard in every
checkpoint; a saved random state comes back bit for bit and loads with `weights_only=True`.
"""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import SingleDeviceStrategy

from dvpo_lightning.callbacks import NonFiniteGuard, RandomState
from dvpo_lightning.checkpoint_io import AtomicCheckpointIO, saves_directories, use_atomic_checkpoints
from dvpo_lightning.cli import run_cli

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SFT, FSDP2 = str(CONFIGS / "sft.yaml"), str(CONFIGS / "strategy" / "fsdp2.yaml")

# Saves checkpoint 1 to argv[1], then starts saving checkpoint 2 and is SIGKILLed part-way, at `KILL_AT`.
SAVE_THEN_DIE = textwrap.dedent(
    """
    import io, os, signal, sys
    import torch
    from dvpo_lightning.checkpoint_io import AtomicCheckpointIO

    path, kill_at = sys.argv[1], sys.argv[2]
    io_plugin = AtomicCheckpointIO()
    io_plugin.save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_at == "mid-write":  # half of the new checkpoint's bytes are on disk
        real_save = torch.save

        def half_then_die(obj, file):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            file.flush()
            die()

        torch.save = half_then_die
    else:  # "before-rename": the whole new checkpoint is written and synced, but not yet in place
        os.replace = lambda *args: die()
    io_plugin.save_checkpoint({"step": 2, "weights": torch.full((1000,), 2.0)}, path)
    """
)


@pytest.mark.parametrize("kill_at", ["mid-write", "before-rename"])
def test_a_process_killed_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, kill_at):
    path = tmp_path / "checkpoints" / "last.ckpt"
    done = subprocess.run(
        [sys.executable, "-c", SAVE_THEN_DIE, str(path), kill_at], capture_output=True, text=True
    )
    assert done.returncode == -9, done.stderr  # SIGKILL

    checkpoint = AtomicCheckpointIO().load_checkpoint(path)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["weights"], torch.ones(1000))
    leftovers = list(path.parent.glob(".last.ckpt.*.partial"))
    assert len(leftovers) == 1  # the interrupted save, hidden from `--ckpt_path last`

    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)  # the next save clears it away
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert torch.load(path, weights_only=True) == {"step": 3}


def test_a_failed_save_removes_its_partial_file_and_keeps_the_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)
    with pytest.raises((AttributeError, pickle.PicklingError)):  # a local function cannot be pickled
        AtomicCheckpointIO().save_checkpoint({"step": 2, "unpicklable": lambda: None}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_a_checkpoint_io_chosen_by_the_user_is_kept():
    strategy = SingleDeviceStrategy("cpu")
    use_atomic_checkpoints(strategy)
    assert type(strategy.checkpoint_io) is AtomicCheckpointIO
    chosen = type("RemoteCheckpointIO", (TorchCheckpointIO,), {})()  # e.g. one that uploads its files
    strategy = SingleDeviceStrategy("cpu", checkpoint_io=chosen)
    use_atomic_checkpoints(strategy)
    assert strategy.checkpoint_io is chosen


def test_the_cli_saves_atomically_with_the_random_state_and_the_guard(tmp_path):
    cli = run_cli(
        ["--config", SFT, f"--trainer.default_root_dir={tmp_path}", "--nonfinite.max_consecutive_skips=4"],
        run=False,
    )
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert cli.trainer.checkpoint_callback.save_last is True  # a file, replaced atomically
    callbacks = {type(callback): callback for callback in cli.trainer.callbacks}
    assert RandomState in callbacks
    assert callbacks[NonFiniteGuard].max_consecutive_skips == 4


def test_under_fsdp2_last_ckpt_is_a_link_to_the_newest_complete_checkpoint(tmp_path):
    cli = run_cli(["--config", SFT, "--config", FSDP2, f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert saves_directories(cli.trainer.strategy)
    assert cli.trainer.checkpoint_callback.save_last == "link"


def test_a_saved_random_state_comes_back_bit_for_bit_from_a_weights_only_load(tmp_path):
    callback = RandomState()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    callback.on_train_batch_end(None, None, None, None, 0)  # the state the next batch starts from
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save({"RandomState": callback.state_dict()}, tmp_path / "state.ckpt")

    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    resumed = RandomState()
    resumed.load_state_dict(torch.load(tmp_path / "state.ckpt", weights_only=True)["RandomState"])
    resumed.on_train_batch_start(None, None, None, 0)
    drawn = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(drawn[0], expected[0]) and np.array_equal(drawn[1], expected[1])
    assert drawn[2] == expected[2]


def test_between_training_batches_nothing_draws_from_training_s_random_stream():
    callback = RandomState()
    torch.manual_seed(0)
    callback.on_train_batch_end(None, None, None, None, 0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    callback.on_train_batch_end(None, None, None, None, 0)
    torch.rand(100)  # validation sampling, a new epoch's data iterator, ...
    callback.on_train_batch_start(None, None, None, 1)
    assert torch.equal(torch.rand(3), expected)
