"""`notebooks/quickstart.ipynb` runs top to bottom, with SMALL budgets, in a fresh kernel of this very Python.

The kernel is started from a kernelspec written for `sys.executable` (the venv's interpreter), so neither `PATH` nor
a `python3` kernelspec installed elsewhere on the machine decides which Python runs the notebook.
"""

from __future__ import annotations

import base64
import re
import sys
from pathlib import Path

import pytest

NOTEBOOK_EXTRA = "the `notebook` extra is not installed (pip install -e '.[notebook]')"
nbclient = pytest.importorskip("nbclient", reason=NOTEBOOK_EXTRA)
nbformat = pytest.importorskip("nbformat", reason=NOTEBOOK_EXTRA)
ipykernel_kernelspec = pytest.importorskip("ipykernel.kernelspec", reason=NOTEBOOK_EXTRA)
from jupyter_client import KernelManager  # noqa: E402  (installed with nbclient)
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"
KERNEL_REPORT = "kernel python: "


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> tuple[nbformat.NotebookNode, Path]:
    """The notebook after a SMALL run in a temporary working directory, and its output directory.

    One cell is appended that prints the kernel's interpreter, so the test can check which Python ran it.
    """
    work = tmp_path_factory.mktemp("notebook")
    kernels = work / "kernels"
    ipykernel_kernelspec.write_kernel_spec(kernels / "python3")  # argv[0] = sys.executable
    manager = KernelManager(
        kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
    )
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(f"import sys\nprint({KERNEL_REPORT!r} + sys.executable)"))
    output = work / "outputs"
    with pytest.MonkeyPatch.context() as env:  # the kernel inherits this process's environment
        env.setenv("DVPO_NOTEBOOK_SMALL", "1")
        env.setenv("DVPO_NOTEBOOK_OUTPUT", str(output))
        client = nbclient.NotebookClient(
            notebook, km=manager, timeout=600, resources={"metadata": {"path": str(work)}}
        )
        client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    return notebook, output


def outputs_of(notebook: nbformat.NotebookNode) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def printed_text(notebook: nbformat.NotebookNode) -> str:
    return "".join(output["text"] for output in outputs_of(notebook) if output["output_type"] == "stream")


def test_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {index} has outputs"


def test_every_cell_runs_in_this_python(executed):
    notebook, _ = executed
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells)
    assert not [output for output in outputs_of(notebook) if output["output_type"] == "error"]
    assert f"{KERNEL_REPORT}{sys.executable}\n" in printed_text(notebook)
    assert "SMALL=True" in printed_text(notebook)


def test_each_stage_exports_the_model_the_next_one_loads(executed):
    _, output = executed
    for stage in ("sft", "gvm", "dvpo"):
        model = output / stage / "model"
        assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file(), stage
        assert list((output / stage / "logs").glob("version_*/metrics.csv")), f"{stage} wrote no CSV log"
    printed = printed_text(notebook=executed[0])
    assert f"SFT policy: {output / 'sft' / 'model'}" in printed
    assert f"DVPO policy: {output / 'dvpo' / 'model'}" in printed


def test_figures_are_written_and_shown_inline(executed):
    notebook, output = executed
    shown = [
        base64.b64decode(item["data"]["image/png"])
        for item in outputs_of(notebook)
        if item["output_type"] == "display_data" and "image/png" in item["data"]
    ]
    files = [output / "figures" / "learning_curves.png", output / "figures" / "token_credit.png"]
    assert shown == [path.read_bytes() for path in files]


def test_prints_the_evaluation_of_sft_and_dvpo(executed):
    printed = printed_text(executed[0])
    for policy in ("SFT", "DVPO"):
        row = rf"^{policy} +[+-]\d+\.\d{{3}} ± \d+\.\d{{3}} +-?\d+\.\d%"  # gold reward ± std, fraction of optimum
        assert re.search(row, printed, re.MULTILINE), policy
    assert re.search(r"^DVPO beats SFT on \d+% of \d+ held-out prompts", printed, re.MULTILINE)
