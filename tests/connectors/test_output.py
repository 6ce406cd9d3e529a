"""The output sink and commit protocol, on local disk and on the real S3 server (same test bodies)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.output import (
    ERRORS_SCHEMA,
    CommitError,
    ErrorRecord,
    OutputSink,
    errors_table,
    part_name,
)
from connectors.storage import join_uri


def metadata(ids, variant=0, **extra) -> pa.Table:
    columns = {"id": ids, "variant": pa.array([variant] * len(ids), pa.int32())}
    columns["image"] = [f"images/{i}/{variant}.png" for i in ids]
    columns.update({k: [v] * len(ids) for k, v in extra.items()})
    return pa.table(columns)


def error(row_id, variant=0, attempts=1, stage="decode") -> ErrorRecord:
    return ErrorRecord(row_id, variant, stage, "ImageDecodeError", f"cannot decode {row_id}", attempts, False)


def keys_of(table: pa.Table) -> set[tuple[str, int]]:
    return set(zip(table["id"].to_pylist(), table["variant"].to_pylist(), strict=True))


def test_write_and_commit(store):
    sink = OutputSink(store.storage, store.root)
    sink.begin()
    for row_id in ("a", "b", "c"):
        sink.write_image(row_id, 0, f"png-{row_id}".encode(), "png")
    sink.write_metadata(metadata(["a", "b"], label="cat"))
    sink.write_metadata(metadata(["c"], label="dog"))
    sink.write_errors(errors_table([error("d")]))
    assert not sink.is_committed()

    summary = sink.commit({"config": {"steps": 4}}, expected_rows=4)
    assert (summary.images, summary.errors, summary.metadata_parts, summary.error_parts) == (3, 1, 2, 1)
    assert sink.is_committed()
    run = sink.read_run_manifest()
    assert run["config"] == {"steps": 4} and run["counts"] == {"images": 3, "errors": 1}
    assert sorted(run["parts"]["metadata"]) == sorted(u.rsplit("/", 1)[1] for u in sink.metadata_parts())
    marker = json.loads(store.storage.read_bytes(sink.layout.success_marker))
    assert marker["images"] == 3 and marker["errors"] == 1

    table = sink.read_metadata()
    assert keys_of(table) == {("a", 0), ("b", 0), ("c", 0)}
    assert sorted(table["label"].to_pylist()) == ["cat", "cat", "dog"]
    assert sink.read_errors().to_pylist()[0]["message"] == "cannot decode d"
    assert store.storage.read_bytes(sink.layout.image_uri("b", 0, "png")) == b"png-b"
    assert keys_of(sink.committed_keys()) == {("a", 0), ("b", 0), ("c", 0)}


def test_part_names_depend_only_on_the_keys_so_retries_rewrite_the_same_part(store):
    sink = OutputSink(store.storage, store.root)
    first = sink.write_metadata(metadata(["x", "y"], seed=1))
    again = sink.write_metadata(metadata(["y", "x"], seed=1))
    assert first.uri == again.uri and len(sink.metadata_parts()) == 1
    assert part_name(metadata(["x"], variant=1)) != part_name(metadata(["x"], variant=0))
    assert sink.write_metadata(metadata([])) is None and sink.write_errors(errors_table([])) is None


def test_commit_keeps_each_key_once(store):
    """Overlapping parts (other batch boundaries on a retry) are settled to one row per key."""
    sink = OutputSink(store.storage, store.root)
    sink.write_metadata(metadata(["a", "b"]))
    sink.write_metadata(metadata(["b", "c"]))
    sink.write_metadata(metadata(["d"]))
    summary = sink.commit({}, expected_rows=4)
    assert summary.images == 4 and summary.duplicates_removed == 1
    table = sink.read_metadata()
    assert sorted(table["id"].to_pylist()) == ["a", "b", "c", "d"]
    total_rows = sum(
        pq.read_table(pa.BufferReader(store.storage.read_bytes(u))).num_rows
        for u in sink.metadata_parts()
    )
    assert total_rows == 4


def test_errors_superseded_by_a_later_success_or_failure_are_dropped(store):
    sink = OutputSink(store.storage, store.root)
    sink.write_errors(errors_table([error("a", attempts=1), error("b", attempts=1)]))
    sink.write_errors(errors_table([error("b", attempts=2, stage="denoise")]))
    sink.write_metadata(metadata(["a"]))
    summary = sink.commit({}, expected_rows=2)
    assert (summary.images, summary.errors, summary.superseded_errors_removed) == (1, 1, 2)
    rows = sink.read_errors().to_pylist()
    assert [(r["id"], r["attempts"], r["stage"]) for r in rows] == [("b", 2, "denoise")]
    assert sink.read_errors().schema == ERRORS_SCHEMA


def test_commit_refuses_an_incomplete_output(store):
    sink = OutputSink(store.storage, store.root)
    sink.write_metadata(metadata(["a", "b"]))
    with pytest.raises(CommitError, match="2 images \\+ 0 errors = 2 rows, but the run expected 3"):
        sink.commit({}, expected_rows=3)
    assert not sink.is_committed()


def test_begin_uncommits_an_output_before_new_writes(store):
    sink = OutputSink(store.storage, store.root)
    sink.write_metadata(metadata(["a"]))
    sink.commit({})
    assert sink.is_committed()
    sink.begin()
    assert not sink.is_committed()
    assert keys_of(sink.committed_keys()) == {("a", 0)}


def test_hostile_ids_stay_inside_the_images_prefix(store):
    hostile = ["../../x", "/abs", "a/b", "nul\x00byte", "é" * 3000, "Ünïcødé", "..", ".", "CON", "a\\b"]
    sink = OutputSink(store.storage, store.root)
    for row_id in hostile:
        sink.write_image(row_id, 0, row_id.encode("utf-8", "surrogatepass"), "png")
    written = store.storage.list_files(join_uri(store.root, "images"), "*/*")
    assert len(written) == len(hostile)
    images_prefix = join_uri(store.root, "images") + "/"
    for uri in written:
        relative = uri[len(images_prefix):]
        assert uri.startswith(images_prefix) and relative.count("/") == 1 and relative.endswith("/0.png")
    for row_id in hostile:
        data = store.storage.read_bytes(sink.layout.image_uri(row_id, 0, "png"))
        assert data == row_id.encode("utf-8", "surrogatepass")


CRASHING_WRITER = textwrap.dedent(
    """
    import os, sys
    import pyarrow as pa
    from connectors.output import OutputSink
    from connectors.storage import Storage, StorageOptions

    root, endpoint = sys.argv[1], sys.argv[2] or None
    storage = Storage(StorageOptions(endpoint_url=endpoint))
    sink = OutputSink(storage, root)
    sink.begin()
    real_write = Storage.write_bytes

    def torn_write(self, uri, data):
        # The process dies in the middle of publishing the 4th part.
        if "/metadata/" in uri and len(sink.metadata_parts()) == 3:
            fs, path = self.filesystem(uri)
            if self.is_local(uri):
                directory, name = os.path.split(path)
                with open(os.path.join(directory, "." + name + ".crash.tmp"), "wb") as handle:
                    handle.write(data[: len(data) // 2])
            else:
                handle = fs.open(path, "wb", block_size=5 * 2**20)
                handle.write(data + os.urandom(6 * 2**20))
                handle.flush()  # the first multipart chunk is uploaded, the upload never completes
            os._exit(137)
        real_write(self, uri, data)

    Storage.write_bytes = torn_write
    for batch in range(5):
        ids = [f"row-{batch}-{i}" for i in range(4)]
        for row_id in ids:
            sink.write_image(row_id, 0, row_id.encode(), "png")
        sink.write_metadata(pa.table({"id": ids, "variant": pa.array([0] * 4, pa.int32())}))
    sink.commit({})
    """
)


def test_crash_between_parts_leaves_no_success_and_resume_sees_committed_rows(store):
    endpoint = store.storage.options.endpoint_url or ""
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, store.root, endpoint], capture_output=True, text=True
    )
    assert crashed.returncode == 137, crashed.stderr

    sink = OutputSink(store.storage, store.root)
    assert not sink.is_committed()
    committed = keys_of(sink.committed_keys())
    assert committed == {(f"row-{b}-{i}", 0) for b in range(3) for i in range(4)}
    assert len(sink.metadata_parts()) == 3

    # Resume: do only what is not committed, then commit the whole run.
    for batch in range(5):
        ids = [f"row-{batch}-{i}" for i in range(4) if (f"row-{batch}-{i}", 0) not in committed]
        if ids:
            for row_id in ids:
                sink.write_image(row_id, 0, row_id.encode(), "png")
            sink.write_metadata(metadata(ids))
    summary = sink.commit({}, expected_rows=20)
    assert summary.images == 20 and summary.duplicates_removed == 0 and sink.is_committed()
    assert len(sink.read_metadata()) == 20
