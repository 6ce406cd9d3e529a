"""`sdbatch verify OUTPUT`: check an output's accounting, as a user can at any time.

The invariant: every (id, variant) the manifest asks for is in exactly one of {metadata, errors}, once;
nothing else is; every metadata row's image exists and decodes at the recorded size; `_SUCCESS`, when
present, matches the counts and is missing only while the output is incomplete. Image keys that no
metadata row names (left by a crash before their part was written) are listed as information.
Reads the metadata and errors parts, and images on a sample unless `--all`. The manifest and the storage
settings come from the output's `_job.json` (written when a run starts) unless flags give them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from connectors.image_decode import decode_image
from connectors.manifest import open_manifest
from connectors.output import OutputSink, table_keys
from connectors.storage import Storage, StorageOptions, join_uri
from jobs.config import ConfigError, RetryConfig, StorageConfig, from_dict, layer_settings
from jobs.config_sources import override_origin, parse_override
from jobs.plan import expected_keys
from jobs.run_flags import add_storage_arguments, flag_values

SAMPLE_IMAGES = 64
SHOWN = 5  # keys named per problem
_CHECK_STORAGE = "check the URIs and the flags --storage-endpoint, --storage-profile, --storage-anonymous"


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        verdict = (
            "OK: the accounting invariant holds" if self.ok else f"FAILED: {len(self.problems)} problem(s)"
        )
        counts = ", ".join(f"{name} {value}" for name, value in self.counts.items())
        return (
            [verdict, f"  counts: {counts}"]
            + [f"  - {p}" for p in self.problems]
            + [f"  info: {i}" for i in self.info]
        )


def verify_output(
    storage: Storage, output: str, manifest_uri: str, check_all_images: bool = False, seed: int = 0
) -> VerifyReport:
    report = VerifyReport()
    sink = OutputSink(storage, output)
    fs, _ = storage.filesystem(manifest_uri)
    expected = expected_keys(open_manifest(manifest_uri, fs), *_variant_settings(sink))
    metadata = sink.read_metadata(unique=False)
    errors = sink.read_errors()
    meta_keys = table_keys(metadata)
    error_keys = table_keys(errors)
    report.counts = {"expected": len(expected), "images": len(metadata), "errors": len(errors)}
    _duplicates(report, "metadata", meta_keys)
    _duplicates(report, "errors", error_keys)
    _listed(
        report, "in both metadata and errors", pc.filter(meta_keys, pc.is_in(meta_keys, value_set=error_keys))
    )
    settled = pa.chunked_array([meta_keys, error_keys], pa.string()).combine_chunks()
    _listed(
        report,
        "in the manifest but in neither metadata nor errors",
        pc.filter(expected, pc.invert(pc.is_in(expected, value_set=settled))),
    )
    _listed(
        report,
        "in the output but not asked for by the manifest",
        pc.filter(settled, pc.invert(pc.is_in(settled, value_set=expected))),
    )
    _check_images(report, storage, metadata, check_all_images, seed)
    _check_success(report, sink, len(metadata), len(errors), len(expected))
    _orphans(report, storage, sink, metadata)
    return report


def _variant_settings(sink: OutputSink) -> tuple[int, int | None]:
    """(defaults.num_images, augment.variants or None) of the run that wrote the output."""
    config = (sink.read_job_record() or {}).get("config", {})
    variants = int(config.get("augment", {}).get("variants", 0))
    return int(config.get("defaults", {}).get("num_images", 1)), variants or None


def _duplicates(report: VerifyReport, table: str, keys: pa.Array) -> None:
    counts = pa.table({"key": keys}).group_by("key").aggregate([("key", "count")])
    repeated = counts.filter(pc.greater(counts["key_count"], 1))["key"]
    _listed(report, f"more than once in {table}", repeated)


def _listed(report: VerifyReport, what: str, keys: pa.Array) -> None:
    if len(keys):
        shown = ", ".join(_label(k) for k in keys.slice(0, SHOWN).to_pylist())
        more = ", ..." if len(keys) > SHOWN else ""
        report.problems.append(f"{len(keys)} (id, variant) {what}: {shown}{more}")


def _label(key: str) -> str:
    row_id, _, variant = key.rpartition("\x00")
    return f"({row_id!r}, {variant})"


def _check_images(
    report: VerifyReport, storage: Storage, metadata: pa.Table, check_all: bool, seed: int
) -> None:
    if metadata.num_rows == 0:  # no part yet (and so no image columns)
        report.counts["images_checked"] = 0
        return
    rows = metadata.select(["id", "variant", "output", "width", "height"]).to_pylist()
    if not check_all and len(rows) > SAMPLE_IMAGES:
        rows = random.Random(seed).sample(rows, SAMPLE_IMAGES)
    bad = []
    for row in rows:
        try:
            image = decode_image(storage.read_bytes(row["output"]), row["output"])
        except Exception as error:  # noqa: BLE001 - each unreadable image is one finding
            bad.append(f"{row['output']} ({type(error).__name__}: {error})")
            continue
        if image.size != (row["width"], row["height"]):
            bad.append(
                f"{row['output']} is {image.size[0]}x{image.size[1]}, metadata says "
                f"{row['width']}x{row['height']}"
            )
    report.counts["images_checked"] = len(rows)
    if bad:
        report.problems.append(
            f"{len(bad)} of {len(rows)} checked images are missing, unreadable or the "
            f"wrong size: " + "; ".join(bad[:SHOWN])
        )


def _check_success(report: VerifyReport, sink: OutputSink, images: int, errors: int, expected: int) -> None:
    if not sink.is_committed():
        report.problems.append("no _SUCCESS: the run has not committed; rerun the job to finish it")
        return
    marker = json.loads(sink.storage.read_bytes(sink.layout.success_marker))
    if (marker.get("images"), marker.get("errors")) != (images, errors):
        report.problems.append(
            f"_SUCCESS says {marker.get('images')} images and {marker.get('errors')} errors, the parts hold "
            f"{images} and {errors}"
        )
    if images + errors != expected:
        report.problems.append(f"_SUCCESS is present but {images} + {errors} rows != {expected} expected")


def _orphans(report: VerifyReport, storage: Storage, sink: OutputSink, metadata: pa.Table) -> None:
    fs, root = storage.filesystem(join_uri(sink.layout.root, "images"))
    if not fs.exists(root):
        return
    written = {join_uri(sink.layout.root, "images", p[len(root.rstrip("/")) + 1 :]) for p in fs.find(root)}
    named = set(metadata["output"].to_pylist()) if "output" in metadata.column_names else set()
    orphans = sorted(written - named)
    if orphans:
        report.info.append(
            f"{len(orphans)} image(s) no metadata row names (written before a crash; a "
            f"resumed run overwrites them): {', '.join(orphans[:SHOWN])}"
        )


class VerifyError(ValueError):
    """Verification cannot start: what is missing and how to give it."""


@dataclass(frozen=True)
class Target:
    """What one verification reads: the storage (as the run reached it, flags overriding) and the manifest."""

    storage: Storage
    manifest: str
    manifest_from: str  # "--manifest" or the job record's URI


@dataclass(frozen=True)
class _Reach:
    """The settings of a run's config that say how storage is reached: all verify takes."""

    storage: StorageConfig = field(default_factory=StorageConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)


_REACH_SECTIONS = tuple(f.name for f in fields(_Reach))


def storage_options(
    recorded: Mapping[str, Any],
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> StorageOptions:
    """Storage options from the `storage` and `retry` sections of a run's recorded config (`recorded`, {}
    for none), then `--set storage.KEY=VALUE` / `retry.KEY=VALUE` overrides, then the named storage flags."""
    for text in overrides:
        key, _ = parse_override(text)
        if key.split(".")[0] not in _REACH_SECTIONS:
            only = f"verify takes only {' and '.join(f'{name}.KEY' for name in _REACH_SECTIONS)} settings"
            raise ConfigError(f"{override_origin(key, text)}: {only}")
    data = {name: recorded[name] for name in _REACH_SECTIONS if name in recorded}
    origins = layer_settings(data, overrides, flags)
    try:
        reach = from_dict(_Reach, data)
    except ConfigError as error:
        raise ConfigError(error.problems, source=source, origins=origins) from None
    return reach.storage.to_options(reach.retry)


def find_target(
    output: str, manifest: str | None, overrides: Sequence[str] = (), flags: Mapping[str, Any] | None = None
) -> Target:
    """Read OUTPUT's job record with the storage the flags describe; take the manifest and the storage
    settings the run used from it, where `manifest`, `overrides` and `flags` do not give them."""
    sink = OutputSink(Storage(storage_options({}, overrides, flags)), output)
    record = sink.read_job_record()
    config = record.get("config") if isinstance(record, dict) else None
    config = config if isinstance(config, dict) else {}
    where = sink.layout.job_record
    if manifest is None and not isinstance(config.get("manifest"), str):
        missing = f"{where} names no manifest"
        if record is None:
            missing = f"{output} has no _job.json (no run has started there)"
        raise VerifyError(f"{missing}; pass --manifest URI, the manifest the run read")
    storage = Storage(storage_options(config, overrides, flags, source=where)) if config else sink.storage
    if manifest is not None:
        return Target(storage, manifest, "--manifest")
    return Target(storage, config["manifest"], where)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Check an output's accounting: every (id, variant) the manifest asks for is in the "
        "metadata or the errors, once, and every image is readable at its recorded size.",
        epilog="Exit codes: 0 the invariant holds; 1 it does not (the problems are listed); 2 nothing was "
        "checked (bad flags, or the output or manifest could not be read).",
    )
    parser.add_argument("output", metavar="OUTPUT", help="the job's output URI")
    parser.add_argument("--manifest", metavar="URI",
                        help="the manifest the job ran on (default: the one OUTPUT/_job.json names)")
    parser.add_argument("--all", action="store_true",
                        help=f"decode every image (default: a sample of {SAMPLE_IMAGES})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a storage.* or retry.* setting, e.g. --set retry.storage_attempts=3")
    add_storage_arguments(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "sdbatch verify") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        flags = flag_values(args, section="storage")
        target = find_target(args.output, args.manifest, args.overrides, flags)
        print(f"verifying {args.output} against {target.manifest} (manifest from {target.manifest_from})")
        report = verify_output(target.storage, args.output, target.manifest, check_all_images=args.all)
    except ValueError as error:  # bad flags or records, a manifest that is not one
        print(f"{prog}: nothing checked:\n{error}", file=sys.stderr)
        return 2
    except OSError as error:  # a store that cannot be reached or read
        failed = f"reading {args.output} or its manifest failed with {type(error).__name__}: {error}"
        print(f"{prog}: nothing checked: {failed}\n{_CHECK_STORAGE}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
