"""Figures for the demo, the benchmarks and the notebook (matplotlib, written to PNG files)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(path: str | Path) -> dict[str, tuple[list[float], list[float]]]:
    """A Lightning `metrics.csv` as `{metric: (steps, values)}`, skipping empty cells."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    with open(path) as handle:
        for row in csv.DictReader(handle):
            for name, value in row.items():
                if name in ("step", "epoch") or value in ("", None):
                    continue
                steps, values = series.setdefault(name, ([], []))
                steps.append(float(row["step"]))
                values.append(float(value))
    return series


def learning_curves(panels: Sequence[tuple[str, str | Path, Sequence[str]]], path: str | Path) -> Path:
    """One column per `(title, metrics.csv, [metric names])`, one plot per metric with its own labelled y axis
    (a loss, an accuracy and a reward have different scales), against the logged step.

    Lightning logs against the optimiser step, except in manual optimisation (PPO, DVPO, RTO), where the step
    of a metric is the training batch, i.e. the RL iteration.
    """
    rows = max(len(names) for _, _, names in panels)
    figure, axes = plt.subplots(rows, len(panels), figsize=(4.5 * len(panels), 2.4 * rows), squeeze=False)
    for column, (title, csv_path, names) in enumerate(panels):
        series = read_metrics(csv_path)
        for row in range(rows):
            axis = axes[row, column]
            if row >= len(names):
                axis.set_visible(False)
                continue
            name = names[row]
            if name in series:
                axis.plot(*series[name], marker="." if len(series[name][0]) < 20 else None)
            else:
                axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes)
            axis.set_ylabel(name, fontsize=8)
            axis.grid(alpha=0.3)
            if row == 0:
                axis.set_title(title)
            if row == len(names) - 1:
                axis.set_xlabel("RL iteration" if _is_on_policy(series) else "optimiser step")
    figure.tight_layout()
    return _save(figure, path)


def _is_on_policy(series: dict[str, tuple[list[float], list[float]]]) -> bool:
    """On-policy stages log rollout metrics; their steps are RL iterations."""
    return any(name.startswith("rollout/") for name in series)


def token_heatmap(
    rows: Sequence[dict],
    path: str | Path,
    quantities: Sequence[str] = ("gold", "value", "advantage"),
    title: str = "Token-level credit",
) -> Path:
    """Per-token quantities of a few responses, one block of rows per response, tokens written in the cells.

    Each row dict has `tokens` (list of str) and one list of floats per name in `quantities`, as long as
    `tokens`; a missing quantity is skipped. Colours are per quantity, centred on zero.
    """
    width = max(len(row["tokens"]) for row in rows)
    blocks = [(row, name) for row in rows for name in quantities if row.get(name) is not None]
    figure, axes = plt.subplots(
        len(blocks), 1, figsize=(max(6, 0.9 * width), 0.55 * len(blocks) + 1), squeeze=False
    )
    for axis, (row, name) in zip(axes[:, 0], blocks):
        values = np.full((1, width), np.nan)
        values[0, : len(row[name])] = row[name]
        limit = np.nanmax(np.abs(values)) or 1.0
        axis.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        for column, token in enumerate(row["tokens"]):
            value = values[0, column]
            colour = "white" if abs(value) > 0.6 * limit else "black"
            axis.text(column, 0, f"{token}\n{value:+.2f}", ha="center", va="center", fontsize=6, color=colour)
        axis.set_yticks([0], [name])
        axis.set_xticks([])
        if name == quantities[0] and row.get("prompt"):
            axis.set_title(row["prompt"], fontsize=7, loc="left")
    figure.suptitle(title)
    figure.tight_layout()
    return _save(figure, path)


def reward_vs_kl(points: dict[str, list[tuple[float, float]]], path: str | Path) -> Path:
    """Gold reward against KL to the reference, one marker series per algorithm (e.g. one point per seed)."""
    figure, axis = plt.subplots(figsize=(5, 4))
    for name, pairs in points.items():
        kls, rewards = zip(*pairs)
        axis.scatter(kls, rewards, label=name)
    axis.set_xlabel("KL to the reference (nats per response)")
    axis.set_ylabel("gold reward")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
