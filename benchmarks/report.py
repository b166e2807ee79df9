"""What every benchmark writes: a markdown report (date, machine, command, tables, notes), its raw numbers as
JSON, and the index `README.md` that shows the latest report of every benchmark in one place.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results"
# Toy-scale reports must not overwrite the real ones: they go where run outputs go (ignored by git).
QUICK_OUTPUT = Path(__file__).resolve().parents[1] / "outputs" / "benchmarks-quick"
INDEX = "README.md"


@dataclass
class Table:
    """One markdown table: a caption, column names and rows of already formatted cells."""

    caption: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def markdown(self) -> str:
        if any(len(row) != len(self.columns) for row in self.rows):
            raise ValueError(f"table {self.caption!r}: every row needs {len(self.columns)} cells")
        lines = [
            f"**{self.caption}**",
            "",
            "| " + " | ".join(self.columns) + " |",
            "|" + "---|" * len(self.columns),
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Report:
    """A benchmark's result: `tables` and `notes` for people, `raw` (JSON-able) for programs."""

    name: str
    title: str
    tables: list[Table]
    raw: dict
    notes: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)


def machine(device: torch.device) -> dict:
    """The machine a benchmark ran on: CPU model and cores (or GPU name), torch version and threads, load."""
    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gb=round(properties.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            nvidia_driver=nvidia_driver(),
        )
    return info


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version, from nvidia-smi (None where it cannot be run)."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(info: dict) -> str:
    where = f"{info['cpu']}, {info['cpu_cores']} cores"
    if "gpu" in info:
        where = (
            f"{info['gpu_count']} x {info['gpu']} ({info['gpu_memory_gb']} GiB), NVIDIA driver "
            f"{info['nvidia_driver']}, CUDA {info['cuda']}; {where}"
        )
    load = f", load average {info['load_average_1min']} at start" if "load_average_1min" in info else ""
    return (
        f"{where}; torch {info['torch']} ({info['torch_threads']} threads), device `{info['device']}`, "
        f"Python {info['python']}{load}"
    )


def write_report(report: Report, output: Path, command: str, device: torch.device) -> Path:
    """Write `<output>/<name>.md` and `<output>/<name>.json`, then refresh the index; returns the markdown path."""
    output.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info = machine(device)
    lines = [
        f"# {report.title}",
        "",
        f"- date: {date}",
        f"- machine: {describe_machine(info)}",
        f"- command: `{command}`",
        "",
    ]
    for table in report.tables:
        lines += [table.markdown(), ""]
    lines += [f"- {note}" for note in report.notes]
    if report.figures:
        lines += [""] + [f"![{path.stem}]({path.name})" for path in report.figures]
    markdown = output / f"{report.name}.md"
    markdown.write_text("\n".join(lines).rstrip() + "\n")
    record = {"name": report.name, "date": date, "command": command, "machine": info, "results": report.raw}
    (output / f"{report.name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    write_index(output)
    return markdown


def read_parts(directories: Sequence[Path], name: str) -> list[dict]:
    """The records of report `name` in each of `directories` (runs of a benchmark to merge into one report, e.g.
    one seed each, run in parallel processes); one message naming a directory that has none."""
    parts = []
    for directory in directories:
        path = Path(directory) / f"{name}.json"
        if not path.exists():
            raise FileNotFoundError(
                f"--merge: {directory} has no {name}.json (run that part first, or drop it)"
            )
        parts.append(json.loads(path.read_text()))
    return parts


def mark_merged(report: Report, records: Sequence[dict]) -> Report:
    """`report`, made from the runs `records` (`read_parts`): their summed duration, and a note naming each run's
    command, date and duration."""
    report.raw["benchmark_seconds"] = sum(record["results"]["benchmark_seconds"] for record in records)
    runs = "; ".join(
        f"`{record['command']}` ({record['date']}, {record['results']['benchmark_seconds'] / 60:.0f} min)"
        for record in records
    )
    report.notes.append(f"Merged from {len(records)} runs made as separate processes: {runs}.")
    return report


def merged_seeds(parts: Sequence[dict], key: str) -> dict[int, dict]:
    """`{seed: result}` from every part's `part[key]` (JSON keys are strings); refuses a seed found twice."""
    merged = {}
    for part in parts:
        for seed, result in part[key].items():
            if int(seed) in merged:
                raise ValueError(f"--merge: seed {seed} is in more than one of the merged runs")
            merged[int(seed)] = result
    return dict(sorted(merged.items()))


def write_index(
    output: Path, order: Sequence[str] = ("table", "value", "cost", "rollout", "peer", "gpu")
) -> Path:
    """`<output>/README.md`: the latest report of every benchmark found in `output`, headings one level down."""
    found = {path.stem: path for path in output.glob("*.md") if path.name != INDEX}
    names = [name for name in order if name in found] + sorted(set(found) - set(order))
    parts = [
        "# Benchmark results",
        "",
        "The latest report of each benchmark (`python -m benchmarks.run`; raw numbers in the `.json` files).",
    ]
    for name in names:
        parts += ["", re.sub(r"^#", "##", found[name].read_text(), flags=re.MULTILINE).rstrip()]
    index = output / INDEX
    index.write_text("\n".join(parts) + "\n")
    return index


# ---------------------------------------------------------------------------------------------- formatting
def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """`mean ± sample std` (the std is left out for a single value); never a negative zero."""
    mean = f"{round(statistics.fmean(values), digits) + 0.0:.{digits}f}"
    if len(values) < 2:
        return mean
    return f"{mean} ± {statistics.stdev(values):.{digits}f}"


NOT_JUDGED = "not judged (quick scale)"


def judgement(met: bool, quick: bool = False) -> str:
    """`met` or `missed`; a quick run (toy models and budgets, one seed) shows its figures but cannot judge a target
    set for the full scale: `not judged (quick scale)`."""
    if quick:
        return NOT_JUDGED
    return "met" if met else "missed"


def verdict(value: float, target: float, at_least: bool = False, quick: bool = False) -> str:
    return judgement(value >= target if at_least else value <= target, quick)
