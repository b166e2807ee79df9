"""The layers of docs/design.md hold: each package imports only the layers before it, `algos` and `rl` never import
Lightning, and no LightningModule computes what `algos` owns."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "dvpo_lightning"
#: the layers in order; a module may import its own layer and those before it. `preflight` and `checkpoint_io`
#: belong to the CLI.
LAYERS = ["data", "models", "algos", "rl", "modules", "callbacks", "cli", "application"]
LAYER_OF = {"preflight": "cli", "checkpoint_io": "cli", "evaluation": "application", "plots": "application"}
LAYER_OF |= {"demo": "application", "sampled_pairs": "application"}


def layer(module: str) -> str | None:
    """The layer of `dvpo_lightning.<module>...`; None for the package root."""
    top = module.split(".")[0]
    return LAYER_OF.get(top, top) if top else None


def imports(path: Path) -> list[tuple[str, int]]:
    """The absolute modules `path` imports, with their line numbers."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
    return found


SOURCES = sorted(
    path for path in PACKAGE.rglob("*.py") if path.name != "__init__.py" or path.parent != PACKAGE
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_each_module_imports_only_its_own_layer_and_the_layers_before_it(path):
    own = layer(".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    allowed = LAYERS[: LAYERS.index(own) + 1]
    wrong = [
        f"line {line}: {module}"
        for module, line in imports(path)
        if module.startswith("dvpo_lightning.")
        and layer(module.removeprefix("dvpo_lightning.")) not in allowed
    ]
    assert wrong == [], f"{path.relative_to(PACKAGE)} ({own}) imports a later layer"


@pytest.mark.parametrize("package", ["algos", "rl"])
def test_the_math_and_the_rl_engine_never_import_lightning(package):
    offenders = [
        f"{path.relative_to(PACKAGE)}:{line}"
        for path in (PACKAGE / package).rglob("*.py")
        for module, line in imports(path)
        if module.split(".")[0] in ("lightning", "pytorch_lightning")
    ]
    assert offenders == []


#: the `algos` functions that turn rewards into what an update trains on: a module calling one computes a formula
#: the engine owns.
ENGINE_FORMULAS = {
    "gae",
    "get_advantage",
    "kl_reward",
    "assemble_token_rewards",
    "masked_whiten",
    "ppo_policy_loss",
    "get_policy_loss",
    "overlong_penalty",
    "varied_groups",
    "penalize_unfinished",
    "clamp_scores",
    "dpo_token_reward",
}


def test_no_lightning_module_computes_an_advantage_or_an_rl_loss():
    offenders = [
        f"{path.name}: {name}"
        for path in (PACKAGE / "modules").glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "dvpo_lightning.algos"
        for name in (alias.name for alias in node.names)
        if name in ENGINE_FORMULAS
    ]
    assert offenders == []


#: "about 200 lines": a LightningModule file holds a stage's choices and Lightning's hooks; what stages share goes to
#: the helper modules beside them (docs/design.md, "Modules").
MODULE_FILE_LINES = 215


def test_lightning_module_files_stay_short():
    defines_a_module = [
        path
        for path in (PACKAGE / "modules").glob("*.py")
        if any(
            isinstance(node, ast.ClassDef) and node.name.endswith("Module")
            for node in ast.parse(path.read_text()).body
        )
    ]
    assert len(defines_a_module) >= 10  # every stage's module, so the check cannot pass by finding none
    too_long = {
        path.name: lines
        for path in defines_a_module
        if (lines := len(path.read_text().splitlines())) > MODULE_FILE_LINES
    }
    assert too_long == {}
