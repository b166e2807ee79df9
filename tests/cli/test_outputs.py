"""`--overwrite true` moves an earlier run aside (`cli.outputs.SetAside`): put back when the new run fails before
its first checkpoint, deleted once it has one, and put back by the next run when the new one was killed first."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from dvpo_lightning.cli.outputs import ASIDE, DiscardSetAside, prepare_output_directory
from dvpo_lightning.preflight import ConfigurationError


def earlier_run(root: Path) -> dict[str, str]:
    files = {
        "checkpoints/last.ckpt": "last",
        "checkpoints/epoch=0-step=2.ckpt": "step 2",
        "model/config.json": "{}",
        "logs/version_0/metrics.csv": "step",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return files


def contents(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): path.read_text() for path in sorted(root.rglob("*")) if path.is_file()
    }


def prepare(root: Path, overwrite: bool):
    return prepare_output_directory(
        str(root), str(root / "checkpoints"), str(root / "model"), str(root / "logs"), overwrite
    )


def test_overwrite_moves_the_earlier_run_aside_and_puts_it_back_when_the_new_run_fails_first(tmp_path):
    files = earlier_run(tmp_path)
    set_aside = prepare(tmp_path, overwrite=True)
    assert not (tmp_path / "model").exists() and not list((tmp_path / "checkpoints").glob("*.ckpt"))
    (tmp_path / "logs" / "version_0").mkdir(parents=True)  # what the failed run began to write
    (tmp_path / "logs" / "version_0" / "metrics.csv").write_text("new")
    set_aside.settle(failed=True)
    assert contents(tmp_path) == files
    assert not list(tmp_path.rglob(ASIDE))


@pytest.mark.parametrize("failed", [True, False])
def test_the_earlier_run_is_deleted_once_the_new_run_has_a_checkpoint_or_finishes(tmp_path, failed):
    earlier_run(tmp_path)
    set_aside = prepare(tmp_path, overwrite=True)
    (tmp_path / "checkpoints" / "last.ckpt").write_text("new")
    set_aside.settle(failed=failed)
    assert contents(tmp_path) == {"checkpoints/last.ckpt": "new"}
    assert not list(tmp_path.rglob(ASIDE))


def test_a_run_killed_before_its_first_checkpoint_gets_the_earlier_run_put_back_by_the_next(tmp_path):
    files = earlier_run(tmp_path)
    prepare(tmp_path, overwrite=True)  # then killed: nothing settles it
    with pytest.warns(UserWarning, match="interrupted --overwrite run .* put back"):
        with pytest.raises(ConfigurationError, match="holds the results of an earlier run"):
            prepare(tmp_path, overwrite=False)
    assert contents(tmp_path) == files


def test_during_the_run_the_earlier_run_is_deleted_at_the_first_batch_after_a_checkpoint(tmp_path):
    earlier_run(tmp_path)
    set_aside = prepare(tmp_path, overwrite=True)
    callback, trainer = DiscardSetAside(set_aside), SimpleNamespace(is_global_zero=True)
    callback.on_train_batch_start(trainer, None, None, 0)
    assert list(tmp_path.rglob(ASIDE))  # no checkpoint yet: kept
    (tmp_path / "checkpoints" / "last.ckpt").write_text("new")
    callback.on_train_batch_start(trainer, None, None, 1)
    assert contents(tmp_path) == {"checkpoints/last.ckpt": "new"}
