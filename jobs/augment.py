"""Dataset augmentation: `python -m jobs.augment --config aug.yaml --partition ds=2026-11-25` (also
`sdbatch augment`).

The img2img job with the config's `augment` policy on: every manifest row becomes `augment.variants`
images, each with its prompt (templates filled from the row's columns), negative prompt, strength and
guidance drawn stably from (run seed, id, variant), all recorded in the metadata. The output goes under
`<output>/<partition>/`, so each scheduled run (say, each logical date) writes its own complete output,
and rerunning one resumes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys

from jobs.config import ConfigError, RunConfig
from jobs.img2img import run_command
from jobs.run_flags import add_run_arguments, config_from_args

_PARTITION = re.compile(r"[A-Za-z0-9_.-]+(=[A-Za-z0-9_.:-]+)?")


def partitioned(config: RunConfig, partition: str | None) -> RunConfig:
    """The config of an augmentation run: the policy must be on; the output moves under the partition."""
    if not config.augment.enabled:
        raise ConfigError(
            [
                (
                    "augment.variants",
                    "must be > 0 for an augmentation run (set it and augment.prompts in the "
                    "config); for plain img2img use `sdbatch run`",
                )
            ]
        )
    if partition is None:
        return config
    if not _PARTITION.fullmatch(partition) or partition in (".", ".."):
        raise ConfigError(
            f"--partition {partition!r}: use one path segment of letters, digits, '_', '.', '-', as VALUE "
            "or NAME=VALUE (e.g. ds=2026-11-25)"
        )
    return dataclasses.replace(config, output=f"{config.output.rstrip('/')}/{partition}")


def main(argv: list[str] | None = None, prog: str = "python -m jobs.augment") -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Dataset augmentation: several img2img variants of every manifest row"
    )
    add_run_arguments(parser)
    parser.add_argument(
        "--partition",
        metavar="NAME=VALUE",
        help="write under OUTPUT/NAME=VALUE/ (e.g. ds=2026-11-25 from a scheduler's logical date)",
    )
    args = parser.parse_args(argv)
    return run_command(lambda: partitioned(config_from_args(args), args.partition), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
