"""`make bench`: run the benchmarks and write their reports to `benchmarks/results/`.

    python -m benchmarks.run                      # everything, full scale (the table takes the longest)
    python -m benchmarks.run --quick              # toy scale in about two minutes, to outputs/benchmarks-quick
    python -m benchmarks.run --only cost,rollout  # some of them
    python -m benchmarks.run --only table --seeds 0,1,2 --device cuda
    python -m benchmarks.run --only value --configs configs/hard    # the value benchmark in the hard setting
    python -m benchmarks.run --only value --seeds 0 --fraction 0.25 # a reduced run: a quarter of every budget
    python -m benchmarks.run --only table --configs configs/hard      # the method comparison in the hard setting
    python -m benchmarks.run --only real_value --threads 2   # opt-in: the value question on SmolLM2-135M-Instruct
    # seeds as parallel processes (one core each), then one report from their outputs:
    python -m benchmarks.run --only value --seeds 0 --output out/s0 & python -m benchmarks.run --only value --seeds 1 --output out/s1
    python -m benchmarks.run --only value --merge out/s0,out/s1

Each benchmark writes `<output>/<name>.md` (date, machine, command, tables, notes), `<output>/<name>.json` (raw
numbers) and its figures, and `<output>/README.md` is rewritten to show the latest report of each.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from benchmarks import cost, peer, real_value, rollout, table, value
from benchmarks.report import DEFAULT_OUTPUT, QUICK_OUTPUT, Report, write_report
from benchmarks.timing import DEVICES, resolve_device

BENCHMARKS: dict[str, Callable[..., Report]] = {
    "table": table.run,
    "cost": cost.run,
    "rollout": rollout.run,
    "peer": peer.run,
    "value": value.run,
    "real_value": real_value.run,
}
OPT_IN = ("real_value",)  # real models, hours on CPU: only when named in --only
MERGEABLE = ("table", "value")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy scale: tiny models, 1-2 steps, 1 seed")
    parser.add_argument(
        "--only",
        type=names,
        default=[name for name in BENCHMARKS if name not in OPT_IN],
        help=f"comma-separated subset of {', '.join(BENCHMARKS)} ({', '.join(OPT_IN)} only when named)",
    )
    parser.add_argument(
        "--seeds", type=seeds, default=None, help="seeds of table and value (default 0,1,2; quick: 0)"
    )
    parser.add_argument(
        "--configs",
        type=Path,
        default=value.CONFIGS,
        help="the configs table and value train from (default configs/; configs/hard is the hard setting)",
    )
    parser.add_argument(
        "--fraction",
        type=fraction,
        default=None,
        help="value and real_value only: a reduced run, this fraction of every config's optimiser steps (real_value: "
        "and of its held-out sets; default: all of them)",
    )
    parser.add_argument(
        "--merge",
        type=directories,
        default=None,
        help="table and value: instead of running, write one report from the runs written to these comma-separated "
        "output directories (e.g. one seed each, run as parallel processes)",
    )
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when available")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine more threads spin-wait on each other and "
        "timings become noise; 0 keeps torch's default)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"where the reports go (default {DEFAULT_OUTPUT}; with --quick {QUICK_OUTPUT})",
    )
    args = parser.parse_args(argv)
    if args.merge and set(args.only) - set(MERGEABLE):
        parser.error(
            f"--merge merges {' and '.join(MERGEABLE)} only: add --only {','.join(MERGEABLE)} or a part of it"
        )
    return args


def names(text: str) -> list[str]:
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}"
        )
    return chosen


def directories(text: str) -> list[Path]:
    return [Path(part.strip()) for part in text.split(",") if part.strip()]


def seeds(text: str) -> list[int]:
    try:
        values = [int(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"--seeds has a repeated seed: {text!r}")
    return values


def fraction(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        number = -1.0
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"--fraction takes a number in (0, 1], got {text!r}")
    return number


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """Run the chosen benchmarks; returns the markdown report of each that ran."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = " ".join(["python -m benchmarks.run", shlex.join(argv)]).strip()
    output = args.output or (QUICK_OUTPUT if args.quick else DEFAULT_OUTPUT)
    device = resolve_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()  # tiny models load in milliseconds: the bars are noise
    written = {}
    for name in args.only:
        start = time.perf_counter()
        options = {
            "table": {"seeds": args.seeds, "output": output, "configs": args.configs},
            "value": {
                "seeds": args.seeds,
                "output": output,
                "configs": args.configs,
                "fraction": args.fraction,
            },
            "real_value": {"seeds": args.seeds, "output": output, "fraction": args.fraction},
        }.get(name, {})
        if args.merge:
            if name == "table":
                merged = table.merge(args.merge, output, args.configs)
            else:
                merged = value.merge(args.merge, args.configs)
            written[name] = write_report(merged, output, command, device)
            print(f"[{name}] merged from {len(args.merge)} runs; report: {written[name]}")
            continue
        try:
            report = BENCHMARKS[name](quick=args.quick, device=device, **options)
        except peer.Skipped as skipped:
            print(f"[{name}] skipped: {skipped}")
            continue
        report.raw["benchmark_seconds"] = time.perf_counter() - start
        written[name] = write_report(report, output, command, device)
        print(f"[{name}] {report.raw['benchmark_seconds']:.0f} s; report: {written[name]}")
        for item in report.tables:
            print(item.markdown() + "\n")
    return written


if __name__ == "__main__":
    main()
