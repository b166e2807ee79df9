"""Where an export came from, and whether the models a stage reads still are the ones it began with.

Every export carries a lineage record, `dvpo_export.json`: a fresh `export_id`, the stage, the run's config,
seed and step, its data, the code's version and, for each model the stage was built from, that model's identity
and its own lineage record (so an export's record holds its whole ancestry). This module reads those records:

- `identity(path)`: what identifies a model now: the `export_id` of a dvpo export; for another local directory
  the size and modification time of its files; a hub name is its name and revision;
- `rewritten_inputs`: inputs whose identity changed since the run began (an earlier stage was rerun meanwhile);
- `disagreeing_inputs`: inputs descending from different SFT exports (a reward model built from another SFT
  than the policy), which a stage mixing them should not;
- `code_version`: the package's version, its git commit when run from a checkout, and the main libraries'.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from importlib import metadata
from typing import Any

from dvpo_lightning.data.sources import is_local

EXPORT_INFO = "dvpo_export.json"
#: the stage whose exports are the common root of a pipeline's policies, reward models and value models
ROOT_STAGE = "SFTModule"
LIBRARIES = ("torch", "transformers", "lightning", "peft")


def new_export_id() -> str:
    return uuid.uuid4().hex


def read_export_info(path: str) -> dict[str, Any] | None:
    """The lineage record of the export at `path`, or None if it has none (a hub model, a foreign directory)."""
    file = os.path.join(os.path.expanduser(path), EXPORT_INFO)
    if not os.path.isfile(file):
        return None
    with open(file) as handle:
        return json.load(handle)


def identity(path: str, revision: str | None = None) -> dict[str, Any]:
    """What identifies the model at `path` now (see the module docstring)."""
    if not is_local(path):
        return {"hub": path, "revision": revision}
    directory = os.path.abspath(os.path.expanduser(path))
    info = read_export_info(directory)
    if info is not None and "export_id" in info:
        return {"path": directory, "export_id": info["export_id"], "stage": info.get("stage")}
    files = {}
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            stat = os.stat(os.path.join(directory, name))
            files[name] = [stat.st_size, stat.st_mtime_ns]
    return {"path": directory, "files": files}


def describe_identity(found: Mapping[str, Any]) -> str:
    if "export_id" in found:
        return f"{found.get('stage') or 'export'} {found['export_id'][:12]}"
    if "hub" in found:
        return f"hub model {found['hub']}"
    return f"files of {len(found.get('files', {}))} entries"


def rewritten_inputs(
    before: Mapping[str, Mapping[str, Any]], now: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """One message per input (by option) whose identity differs between `before` and `now`."""
    return [
        f"input `{option}` ({found.get('path') or found.get('hub')}) was rewritten after this run began: it was "
        f"{describe_identity(found)} then, and is {describe_identity(now[option])} now"
        for option, found in before.items()
        if option in now and now[option] != found
    ]


def _root_exports(info: Mapping[str, Any] | None) -> Iterator[tuple[str, str]]:
    """(export id, path) of every `ROOT_STAGE` export in the ancestry of the record `info`, itself included."""
    if info is None:
        return
    if info.get("stage") == ROOT_STAGE and "export_id" in info:
        yield info["export_id"], info.get("export_dir", "?")
    for record in (info.get("inputs") or {}).values():
        yield from _root_exports(record.get("export"))


def disagreeing_inputs(records: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
    """Messages naming inputs (option -> lineage record) that descend from different SFT exports."""
    roots = {option: dict(_root_exports(info)) for option, info in records.items()}
    roots = {option: found for option, found in roots.items() if found}
    options = list(roots)
    problems = []
    for index, first in enumerate(options):
        for second in options[index + 1 :]:
            if not set(roots[first]) & set(roots[second]):
                problems.append(
                    f"inputs `{first}` and `{second}` come from different {ROOT_STAGE} exports "
                    f"({_listed(roots[first])} and {_listed(roots[second])}): they were not trained in one pipeline"
                )
    return problems


def _listed(exports: Mapping[str, str]) -> str:
    return ", ".join(f"{path} [{export_id[:12]}]" for export_id, path in exports.items())


def code_version() -> dict[str, Any]:
    """The package's version, its git commit (and whether the checkout had changes) and the main libraries'."""
    import dvpo_lightning

    version: dict[str, Any] = {"dvpo_lightning": dvpo_lightning.__version__}
    checkout = os.path.dirname(os.path.abspath(dvpo_lightning.__file__))
    try:
        commit = subprocess.run(
            ["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        changes = subprocess.run(
            ["git", "-C", checkout, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):  # no git here
        commit = changes = None
    if commit is not None and commit.returncode == 0:
        version["git_commit"] = commit.stdout.strip()
        version["git_uncommitted_changes"] = bool(changes.stdout.strip())
    for library in LIBRARIES:
        try:
            version[library] = metadata.version(library)
        except metadata.PackageNotFoundError:
            continue
    return version
