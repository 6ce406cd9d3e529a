"""The `sdbatch` command: `sdbatch run ...` (the img2img job), `sdbatch augment ...`, `sdbatch verify ...`
and `sdbatch demo`; each command's module parses its own flags (`sdbatch COMMAND --help`).

Importing this module stays light: a command's module is imported only when that command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata as package_metadata
from typing import NamedTuple


class Command(NamedTuple):
    module: str  # its `main(argv, prog)` parses the rest of the command line
    summary: str


COMMANDS = {
    "run": Command("jobs.img2img", "run the img2img job over a manifest (as `python -m jobs.img2img`)"),
    "augment": Command("jobs.augment", "dataset augmentation: the job with the config's augment policy"),
    "verify": Command("jobs.verify", "check an output's accounting: every row once in metadata or errors"),
    "demo": Command("jobs.demo", "run the job on generated images with a tiny model it makes (`make demo`)"),
}


def version() -> str:
    try:
        return package_metadata.version("sdbatch")
    except package_metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e . to give it one)"


def _command_list() -> str:
    return "\n".join(f"  {name:8} {command.summary}" for name, command in COMMANDS.items())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdbatch",
        usage="sdbatch [-h] [--version] COMMAND [ARGS ...]",
        description="Stable Diffusion img2img over Parquet manifests, on Ray.",
        epilog=f"commands:\n{_command_list()}\n\n`sdbatch COMMAND --help` lists its flags and defaults.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdbatch {version()}")
    parser.add_argument("command", nargs="?", help=argparse.SUPPRESS)  # the commands are listed below
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # --help and --version exit here
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command not in COMMANDS:
        from jobs.config_checks import did_you_mean  # here: it imports pyarrow, which --help need not

        hint = did_you_mean(args.command, list(COMMANDS))
        listing = _command_list()
        print(f"sdbatch: unknown command {args.command!r}{hint}; the commands:\n{listing}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args.command].module)
    return module.main(args.args, prog=f"sdbatch {args.command}")


if __name__ == "__main__":
    sys.exit(main())
