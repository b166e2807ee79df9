"""The GPU recipes cannot run here (hub models, 8 GPUs), but they must always parse against the current code."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dvpo_lightning.cli import run_cli

GPU = Path(__file__).resolve().parents[2] / "configs" / "gpu"
RECIPES = sorted(path for path in GPU.glob("*/*.yaml") if path.name != "common.yaml")


def test_there_are_recipes_for_two_model_sizes_and_every_algorithm():
    stages = {path.stem for path in RECIPES}
    assert {"gvm", "rm", "dpo", "dvpo", "ppo", "rto"} <= stages
    assert len({path.parent.name for path in RECIPES}) == 2


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_recipe_parses_and_states_its_memory_arithmetic(recipe, capsys):
    header = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
    assert any("Memory" in line for line in header), "each recipe starts with its memory arithmetic"
    with pytest.raises(SystemExit) as exited:
        run_cli(
            ["fit", "--config", str(recipe.parent / "common.yaml"), "--config", str(recipe), "--print_config"]
        )
    assert exited.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"].startswith("dvpo_lightning.modules.")
    assert config["trainer"]["strategy"]["class_path"].endswith("ModelParallelStrategy")
    assert config["trainer"]["default_root_dir"].startswith(f"outputs/{recipe.parent.name}/")
