"""Start-up checks of a `dvpo` run's configuration, before any tokenizer, dataset or model is loaded.

A stage reads the exports of earlier stages by path, so the commonest mistake is a stage run before the one it
depends on; without these checks it surfaces minutes later as a hub lookup error for a name like
`outputs/builtin/sft/model`. Every problem found is reported at once, each naming its option and the fix:

- a path option (a model's `name_or_path`, the data's `dataset`, `tokenizer`, `prompt_dataset`, `val_split`,
  `ckpt_path`) spelled like a local path (see `dvpo_lightning.data.sources.is_local`) that does not exist; when a
  config beside the run's writes it (the path lies under that config's `trainer.default_root_dir`, or is its
  `export_dir`), the error says to run that config first;
- a model or tokenizer named like a hub id (a bare directory name that does not exist, say) while the hub is
  offline and the name is not in its cache: without this it fails as a long chain of offline-mode errors;
- a packaged model (`packaged:<name>`) that is unknown or not fetched yet: the error gives the fetch command;
- FSDP1 (`FSDPStrategy`) on a machine or accelerator without CUDA, which Lightning refuses: FSDP2 runs there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from dvpo_lightning.data.model_files import PACKAGED_PREFIX, fetched_gguf
from dvpo_lightning.data.sources import is_local

DATA_PATH_OPTIONS = ("dataset", "tokenizer", "prompt_dataset", "val_split")
FSDP2_CONFIG = "configs/strategy/fsdp2.yaml"


class ConfigurationError(ValueError):
    """The run's configuration cannot work; the message names each option at fault and its fix."""


def check_run_config(config: dict[str, Any], config_files: list[str]) -> None:
    """Raise `ConfigurationError` listing every problem of `config` (a parsed `dvpo fit` config as a dict)."""
    problems = (
        [missing_path_problem(option, path, config_files) for option, path in missing_paths(config)]
        + [offline_hub_problem(option, name) for option, name in uncached_hub_names(config)]
        + list(packaged_problems(config))
        + strategy_problems(config.get("trainer") or {})
    )
    if problems:
        raise ConfigurationError(
            "The run's configuration cannot work:\n" + "\n".join(f"- {problem}" for problem in problems)
        )


def missing_paths(config: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(option, path) of every path option that names a local path which does not exist."""
    candidates = list(_model_paths(config.get("model"), "model"))
    data_options = (config.get("data") or {}).get("init_args") or {}
    candidates += [(f"data.init_args.{name}", data_options.get(name)) for name in DATA_PATH_OPTIONS]
    candidates.append(("ckpt_path", config.get("ckpt_path")))  # "last" and "best" are not spelled like paths
    for option, path in candidates:
        if isinstance(path, str) and is_local(path) and not os.path.exists(os.path.expanduser(path)):
            yield option, path


def uncached_hub_names(config: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(option, name) of every model or tokenizer named like a hub id (not a local path) that cannot load: the hub
    is offline (`HF_HUB_OFFLINE`) and the name is not in the hub cache."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    if not constants.HF_HUB_OFFLINE:
        return
    tokenizer = ((config.get("data") or {}).get("init_args") or {}).get("tokenizer")
    candidates = [
        (option, name, "config.json") for option, name in _model_paths(config.get("model"), "model")
    ]
    if isinstance(tokenizer, str) and not tokenizer.startswith("bpe:"):
        candidates.append(("data.init_args.tokenizer", tokenizer, "tokenizer_config.json"))
    for option, name, file in candidates:
        if not isinstance(name, str) or is_local(name) or name.startswith(PACKAGED_PREFIX):
            continue
        try:
            cached = isinstance(try_to_load_from_cache(name, file), str)
        except HFValidationError:  # not even spelled like a hub id
            cached = False
        if not cached:
            yield option, name


def packaged_problems(config: dict[str, Any]) -> Iterator[str]:
    """A message for every model or tokenizer named `packaged:<name>` that is unknown or not fetched."""
    tokenizer = ((config.get("data") or {}).get("init_args") or {}).get("tokenizer")
    names = [*_model_paths(config.get("model"), "model"), ("data.init_args.tokenizer", tokenizer)]
    for option, name in names:
        if isinstance(name, str) and name.startswith(PACKAGED_PREFIX):
            try:
                fetched_gguf(name.removeprefix(PACKAGED_PREFIX))
            except (ValueError, OSError) as err:
                yield f"{option}: {err}"


def offline_hub_problem(option: str, name: str) -> str:
    return (
        f"{option}: {name!r} is not a local directory (there is no {os.path.abspath(name)}) and, as a hub name, it is "
        "not in the Hugging Face cache while the hub is offline (HF_HUB_OFFLINE=1): correct the path, or download "
        "the model with the hub online first"
    )


def _model_paths(value: Any, option: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "name_or_path":
                yield f"{option}.{key}", item
            else:
                yield from _model_paths(item, f"{option}.{key}")


def missing_path_problem(option: str, path: str, config_files: list[str]) -> str:
    producer = producing_config(path, config_files)
    fix = (
        f"it is written by {producer}: run `dvpo fit --config {producer}` first"
        if producer is not None
        else "correct the path, or run the stage that writes it first"
    )
    return f"{option}: {path!r} does not exist; {fix}"


def producing_config(path: str, config_files: list[str]) -> str | None:
    """The config, among those in the directories of `config_files`, whose run writes `path`."""
    target = os.path.normpath(path)
    directories = dict.fromkeys(str(Path(file).parent) for file in config_files)
    for directory in directories:
        for candidate in sorted(Path(directory).glob("*.yaml")):
            try:
                data = yaml.safe_load(candidate.read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            root = (data.get("trainer") or {}).get("default_root_dir")
            export_dir = ((data.get("model") or {}).get("init_args") or {}).get("export_dir")
            if isinstance(export_dir, str) and os.path.normpath(export_dir) == target:
                return str(candidate)
            if isinstance(root, str) and target.startswith(os.path.normpath(root) + os.sep):
                return str(candidate)
    return None


def strategy_problems(trainer: dict[str, Any]) -> list[str]:
    strategy = trainer.get("strategy")
    if isinstance(strategy, dict):
        name = str(strategy.get("class_path", ""))
    else:
        name = strategy if isinstance(strategy, str) else type(strategy).__name__
    if not (name.startswith("fsdp") or name.endswith("FSDPStrategy")):
        return []
    accelerator = trainer.get("accelerator") or "auto"
    if accelerator == "cpu":
        where = "trainer.accelerator is 'cpu'"
    elif not torch.cuda.is_available():
        where = "this machine has no CUDA GPU"
    else:
        return []
    return [
        f"trainer.strategy: FSDP1 ({name}) runs on CUDA GPUs only, and {where}; use FSDP2, which also runs on CPU: "
        f"--config {FSDP2_CONFIG} instead of configs/strategy/fsdp.yaml"
    ]
