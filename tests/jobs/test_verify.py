"""`sdbatch verify`: the accounting invariant checked on outputs built to be right or broken in one way."""

from __future__ import annotations

import io
import json

import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.output import ErrorRecord, OutputSink, errors_table
from connectors.storage import join_uri
from jobs.verify import main, verify_output


def png(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def built(store):
    """A committed output for a 4-row manifest (row 'c' has 2 variants, 'd' failed)."""
    storage, root = store.storage, store.root
    buffer = io.BytesIO()
    manifest = pa.table({"id": ["a", "b", "c", "d"], "image": ["x.png"] * 4, "prompt": ["p"] * 4,
                         "num_images": [1, 1, 2, 1]})  # fmt: skip
    pq.write_table(manifest, buffer)
    manifest_uri = join_uri(root, "manifest.parquet")
    storage.write_bytes(manifest_uri, buffer.getvalue())
    output = join_uri(root, "out")
    sink = OutputSink(storage, output)
    keys = [("a", 0), ("b", 0), ("c", 0), ("c", 1)]
    outputs = [sink.write_image(row_id, variant, png(), "png") for row_id, variant in keys]
    sink.write_metadata(metadata_table(keys, outputs))
    sink.write_errors(errors_table([ErrorRecord("d", 0, "decode", "ImageDecodeError", "bad", 1, False)]))
    sink.commit({}, expected_rows=5)
    return storage, output, manifest_uri, sink


def metadata_table(keys, outputs, width=64, height=48) -> pa.Table:
    return pa.table(
        {
            "id": [k[0] for k in keys],
            "variant": pa.array([k[1] for k in keys], pa.int32()),
            "output": outputs,
            "width": [width] * len(keys),
            "height": [height] * len(keys),
        }
    )


def test_a_good_output_passes(built, capsys):
    storage, output, manifest, _ = built
    report = verify_output(storage, output, manifest, check_all_images=True)
    assert report.ok, report.lines()
    assert report.counts == {"expected": 5, "images": 4, "errors": 1, "images_checked": 4}
    if "://" not in output:  # the CLI on local paths (S3 needs the endpoint flag, covered above)
        assert main([output, "--manifest", manifest, "--all"]) == 0
        assert capsys.readouterr().out.startswith("OK")


def test_a_row_in_both_tables_and_a_duplicate_are_found(built):
    storage, output, manifest, sink = built
    sink.write_errors(errors_table([ErrorRecord("a", 0, "denoise", "X", "y", 1, False)]))
    sink.write_metadata(metadata_table([("b", 0), ("d", 0)], [sink.layout.image_uri("b", 0, "png")] * 2))
    problems = "\n".join(verify_output(storage, output, manifest).problems)
    assert "in both metadata and errors: ('a', 0)" in problems
    assert "more than once in metadata: ('b', 0)" in problems
    assert "_SUCCESS says 4 images and 1 errors, the parts hold 6 and 2" in problems


def test_missing_rows_images_and_sizes_are_found(built):
    storage, output, manifest, sink = built
    storage.delete(sink.layout.image_uri("a", 0, "png"))
    storage.write_bytes(sink.layout.image_uri("b", 0, "png"), png(32, 32))
    storage.delete(sink.layout.success_marker)
    errors_part = sink.error_parts()[0]
    storage.delete(errors_part)
    problems = "\n".join(verify_output(storage, output, manifest, check_all_images=True).problems)
    assert "in the manifest but in neither metadata nor errors: ('d', 0)" in problems
    assert "2 of 4 checked images" in problems and "is 32x32, metadata says 64x48" in problems
    assert "no _SUCCESS" in problems


def test_orphan_images_are_information_only(built):
    storage, output, manifest, sink = built
    sink.write_image("zz", 0, png(), "png")
    report = verify_output(storage, output, manifest)
    assert report.ok and "1 image(s) no metadata row names" in report.info[0]
    assert json.loads(storage.read_bytes(sink.layout.success_marker))["images"] == 4
