"""The job commands' flags (`sdbatch run`, `augment`, `verify`): argparse definitions whose help names
each flag's key, default (read from the config dataclasses) and choices, and the parsed flags -> config.

Importing this stays light (no torch): `--help` and a refused run load no model code.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from jobs.config import (
    ComputeConfig,
    LoraConfig,
    ModelConfig,
    RowDefaults,
    RunConfig,
    StorageConfig,
    load_config,
)
from jobs.config_sources import FLAGS, SCHEDULERS, flag_keys


def _default(cls: type, name: str, none: str = "none") -> str:
    """A setting's default as help shows it, read from its dataclass field; `none` says what None means."""
    value = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    return none if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the run's flags; their help names each one's key, default and choices. Values stay text here:
    config_from_args parses them, so a bad value raises ConfigError naming the key and the flag rather
    than argparse's bare usage error."""
    add = parser.add_argument
    add("--config", metavar="PATH", help="YAML configuration file (docs/jobs.md); flags override it")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override any setting, e.g. --set compute.batch_size=8 (repeatable; named flags win)")
    add("--dry-run", action="store_true", help="check the configuration, manifest and output, then stop")

    add = parser.add_argument_group("what to run (each required, as a flag or in --config)").add_argument
    add("--model", metavar="PATH", help="model.path: diffusers folder or single .safetensors checkpoint")
    add("--manifest", metavar="URI", help="manifest: Parquet file, directory, glob or hive prefix")
    add("--output", metavar="URI", help="output: the output root; rerunning into it resumes")

    add = parser.add_argument_group("sampling (where a manifest column is absent or null)").add_argument
    scheduler = _default(ModelConfig, "scheduler", none="the model's own")
    add("--scheduler", metavar="NAME",
        help=f"model.scheduler: one of {', '.join(SCHEDULERS)} (default: {scheduler})")
    add("--steps", metavar="N", help="defaults.num_inference_steps: of the full schedule "
        f"(default: {_default(RowDefaults, 'num_inference_steps')})")
    add("--strength", metavar="X", help="defaults.strength: how much is redrawn, 0 to 1 "
        f"(default: {_default(RowDefaults, 'strength')})")
    add("--guidance", metavar="X", help="defaults.guidance_scale; <= 1 turns CFG off "
        f"(default: {_default(RowDefaults, 'guidance_scale')})")
    add("--seed", metavar="N", help=f"seed: the run seed (default: {_default(RunConfig, 'seed')})")

    add = parser.add_argument_group("adapters (repeatable, after the config file's)").add_argument
    add("--lora", action="append", metavar="PATH[:SCALE]",
        help=f"adapters.loras: a LoRA file (default SCALE: {_default(LoraConfig, 'scale')})")
    add("--embedding", action="append", metavar="PATH[:TOKEN]",
        help="adapters.embeddings: a textual inversion (default TOKEN: the file's own); quote '<token>'")

    add = parser.add_argument_group("compute").add_argument
    add("--batch-size", metavar="N", help="compute.batch_size: images per UNet call "
        f"(default: {_default(ComputeConfig, 'batch_size')})")
    low = _default(ComputeConfig, "actors_min")
    every = "every GPU the cluster has; on a CPU-only cluster, its CPUs"
    high = _default(ComputeConfig, "actors_max", none=every)
    add("--actors", metavar="N|MIN-MAX", help="compute.actors_min and actors_max: N denoise actors, or a "
        f"pool Ray autoscales from MIN to MAX (default: {low} up to {high})")

    add_storage_arguments(parser)

    add = parser.add_argument_group("resuming and inputs").add_argument
    add("--retry-errors", action="store_true", default=None,
        help="retry_errors: rerun the rows a previous run recorded as failed")
    add("--force", action="store_true", default=None,
        help="force: write into an output made with another configuration")
    add("--allow-input-root", action="append", metavar="URI",
        help="inputs.allowed_roots: rows may read images only under these prefixes or schemes (repeatable; "
        "default: anywhere)")


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """How storage is reached, for `sdbatch run`, `augment` and `verify` (credentials: never in flags)."""
    add = parser.add_argument_group("storage (credentials come from the environment)").add_argument
    add("--storage-endpoint", metavar="URL", help="storage.endpoint_url: an S3-compatible store's endpoint "
        f"(default: {_default(StorageConfig, 'endpoint_url', none='AWS')})")
    add("--storage-profile", metavar="NAME", help="storage.profile: a named AWS profile "
        f"(default: {_default(StorageConfig, 'profile', none='the default credential chain')})")
    add("--storage-anonymous", action="store_true", default=None, help="storage.anonymous: public buckets, "
        f"no credentials (default: {_default(StorageConfig, 'anonymous')})")


def flag_values(args: argparse.Namespace, section: str | None = None) -> dict[str, Any]:
    """{key path: value} of the named flags set in `args`, parsed from their text (with `section`: only the
    flags of that section's keys)."""
    values: dict[str, Any] = {}
    for dest, (keys, parse) in FLAGS.items():
        text = getattr(args, dest, None)
        if text is None or (section is not None and not flag_keys(keys)[0].startswith(f"{section}.")):
            continue
        value = [parse(item) for item in text] if isinstance(text, list) else parse(text)
        values.update(zip(flag_keys(keys), value if isinstance(keys, tuple) else (value,), strict=True))
    return values


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig for parsed `add_run_arguments` flags: the file, then --set, then the named flags."""
    return load_config(args.config, args.overrides, flag_values(args))
