"""Every top-level config in `configs/` and every one of the hard setting (`configs/hard/`) runs as is, for two
steps on CPU, so that no config rots.

Stages load the exports of earlier stages by relative path (`outputs/builtin/sft/model`), so the configs run
in one working directory, each after the configs it depends on: config B depends on config A when a value
in B is a path under A's `trainer.default_root_dir`. New configs join the chain by themselves. The
sub-folders (`configs/strategy`, `configs/gpu`) are for GPUs and several processes and are not run here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dvpo_lightning.cli import main
from dvpo_lightning.models.export import EXPORT_INFO

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# A couple of steps on little data; everything else is the config's own.
QUICK = [
    "--trainer.max_steps=2",
    "--trainer.val_check_interval=1",  # in training batches: RL iterations for on-policy stages
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.builtin_size=200",
    "--data.init_args.val_size=20",
    "--data.init_args.batch_size=8",
]


@dataclass
class Config:
    path: Path
    root: str  # trainer.default_root_dir, relative to the working directory
    class_path: str  # the model's
    paths: set[str]  # every string value, where the paths it loads are

    @property
    def name(self) -> str:
        return str(self.path.relative_to(CONFIGS).with_suffix(""))  # "dvpo", "hard/dvpo"


def read_config(path: Path) -> Config:
    data = yaml.safe_load(path.read_text())
    root = (data.get("trainer") or {}).get("default_root_dir")
    if not root:
        raise ValueError(
            f"{path}: set trainer.default_root_dir, where its export goes and later stages find it"
        )
    return Config(path, root.rstrip("/"), data["model"]["class_path"], set(strings(data)))


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def prerequisites(config: Config, configs: dict[str, Config]) -> list[str]:
    """The configs whose outputs `config` reads."""
    return sorted(
        name
        for name, other in configs.items()
        if other is not config and any(path.startswith(other.root + "/") for path in config.paths)
    )


RUN = sorted([*CONFIGS.glob("*.yaml"), *CONFIGS.glob("hard/*.yaml")])
ALL = {config.name: config for config in map(read_config, RUN)}


class Chain:
    """Runs `configs` in one working directory with `quick` arguments, each once, prerequisites first; the cache
    is `cache` (default: one of the working directory's own)."""

    def __init__(
        self,
        workdir: Path,
        configs: dict[str, Config] = ALL,
        quick: tuple[str, ...] = tuple(QUICK),
        cache: Path | None = None,
    ):
        self.workdir = workdir
        self.configs, self.quick = configs, quick
        self.cache = cache or workdir / "cache"
        self.outcomes: dict[str, Exception | SystemExit | None] = {}

    def run(self, name: str, waiting: tuple[str, ...] = ()) -> None:
        if name in waiting:
            raise ValueError(f"configs depend on each other in a cycle: {' -> '.join((*waiting, name))}")
        if name not in self.outcomes:
            for prerequisite in prerequisites(self.configs[name], self.configs):
                self.run(prerequisite, (*waiting, name))
            self.outcomes[name] = self._fit(self.configs[name])
        if self.outcomes[name] is not None:
            raise RuntimeError(f"configs/{name}.yaml failed") from self.outcomes[name]

    def _fit(self, config: Config) -> Exception | SystemExit | None:
        with pytest.MonkeyPatch.context() as patch:
            patch.chdir(self.workdir)
            patch.setenv("DVPO_CACHE", str(self.cache))
            try:
                main(["fit", "--config", str(config.path), *self.quick])
            except (
                Exception,
                SystemExit,
            ) as error:  # kept, so that later configs report which prerequisite failed
                return error
        return None


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return Chain(tmp_path_factory.mktemp("configs"))


def test_there_are_configs_and_every_path_they_read_is_written_by_one():
    assert {"sft", "rm", "gvm", "dpo"} <= set(ALL)
    roots = [config.root for config in ALL.values()]
    assert len(set(roots)) == len(roots), f"two configs share a default_root_dir: {roots}"
    for config in ALL.values():
        for path in config.paths:
            if path.startswith("outputs/"):
                assert any(path == root or path.startswith(root + "/") for root in roots), (
                    f"configs/{config.name}.yaml reads {path}, which no config writes"
                )
    assert prerequisites(ALL["dpo"], ALL) == ["sft"]


@pytest.mark.parametrize("name", list(ALL))
def test_config_runs(name, chain):
    chain.run(name)
    config = ALL[name]
    root = chain.workdir / config.root
    info = json.loads((root / "model" / EXPORT_INFO).read_text())
    assert info["stage"] == config.class_path.rsplit(".", 1)[-1]
    assert (root / "model" / "config.json").is_file()
    metrics = (root / "logs" / "version_0" / "metrics.csv").read_text()
    assert "val/" in metrics.splitlines()[0], "validation ran and was logged"


def test_every_export_records_its_lineage_and_carries_a_model_card(chain):
    for name in ALL:
        chain.run(name)
    exports = {name: chain.workdir / config.root / "model" for name, config in ALL.items()}
    records = {name: json.loads((directory / EXPORT_INFO).read_text()) for name, directory in exports.items()}
    for name, info in records.items():
        assert info["export_dir"] == str(exports[name]) and info["seed"] == 0
        assert info["config"]["config"] == [str(ALL[name].path)]  # the run's whole configuration
        dataset = yaml.safe_load(ALL[name].path.read_text())["data"]["init_args"]["dataset"]
        assert info["data"]["dataset"] == dataset and info["data"]["rows"]["validation"] > 0
        assert info["code"]["dvpo_lightning"] and info["code"]["torch"]
        # Each input is named by the export id of the stage that wrote it, with that stage's own record.
        for option, found in info["inputs"].items():
            producer = next(
                other for other, path in exports.items() if str(path) == found["identity"]["path"]
            )
            assert found["identity"]["export_id"] == records[producer]["export_id"], (name, option)
            assert found["export"]["export_id"] == records[producer]["export_id"]
        sft = f"{name.rpartition('/')[0]}/sft".lstrip("/")  # the SFT stage of the config's own folder
        if name != sft:
            sft_id = records[sft]["export_id"]
            assert info["inputs"], name
            assert all(
                found["export"]["export_id"] == sft_id or sft_id in json.dumps(found["export"]["inputs"])
                for found in info["inputs"].values()
            ), f"{name} descends from the SFT export"
        card = (exports[name] / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: transformers\n")
        assert f"# {info['stage']} export" in card and "## Final metrics" in card
