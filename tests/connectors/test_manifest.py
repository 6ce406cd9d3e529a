"""Manifests: opening every layout, streaming, validation errors (column + row ids), image URI resolution."""

from __future__ import annotations

import io
import math
import uuid
from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import connectors.manifest as manifest_module
from connectors.manifest import (
    ManifestError,
    iter_manifest_batches,
    open_manifest,
    resolve_image_uri,
    row_problems,
    validate_manifest,
)


@pytest.fixture(params=["local", "memory", "s3"])
def root(request, tmp_path, monkeypatch) -> Iterator[str]:
    """A manifest root URI (no trailing '/'): local disk, fsspec's memory file system, or the real S3
    server (reached the way users reach S3-compatible stores: AWS_ENDPOINT_URL and the AWS_* chain)."""
    if request.param == "local":
        yield str(tmp_path)
        return
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        for name, value in {**server.env(), "AWS_ENDPOINT_URL": server.endpoint_url}.items():
            monkeypatch.setenv(name, value)
        yield f"s3://{server.bucket}/manifests-{uuid.uuid4().hex}"
        return
    uri = f"memory://manifests-{uuid.uuid4().hex}"
    yield uri
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def put(uri: str, data: pa.Table | bytes) -> str:
    if isinstance(data, pa.Table):
        buffer = io.BytesIO()
        pq.write_table(data, buffer)
        data = buffer.getvalue()
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)
    return uri


def rows(n: int, start: int = 0, **columns) -> pa.Table:
    base = {
        "id": [f"r{i}" for i in range(start, start + n)],
        "image": [f"img/{i}.png" for i in range(start, start + n)],
        "prompt": [f"prompt {i}" for i in range(start, start + n)],
    }
    return pa.table({**base, **columns})


def problems_of(uri: str) -> str:
    with pytest.raises(ManifestError) as caught:
        validate_manifest(uri)
    return str(caught.value)


def problem_line(message: str, column: str, words: str) -> str:
    lines = [line for line in message.splitlines() if f"column {column!r}" in line and words in line]
    assert len(lines) == 1, message
    return lines[0]


def test_good_manifest_with_extra_columns(root):
    table = rows(
        3,
        negative_prompt=["blurry", None, ""],
        strength=[0.0, 1.0, None],
        guidance_scale=[0.0, 7.5, None],
        num_inference_steps=[1, 1000, None],
        seed=pa.array([0, 2**63 - 1, None], pa.int64()),
        num_images=[1, 64, None],
        width=[64, 4096, None],
        height=[512, 768, None],
        resize_mode=["just_resize", "resize_and_fill", None],
        customer=["a", "b", "c"],
        score=[1, 2, 3],
    )
    uri = put(f"{root}/manifest.parquet", table)
    summary = validate_manifest(uri)
    assert summary.num_rows == 3
    assert summary.extra_columns == ("customer", "score")
    assert summary.columns == tuple(table.column_names)
    assert (summary.uri_images, summary.binary_images) == (3, 0)
    assert summary.base_uri == f"{root}/"
    streamed = pa.Table.from_batches(list(iter_manifest_batches(uri)))
    assert streamed.equals(table)


def test_explicit_filesystem_is_used(root):
    uri = put(f"{root}/m.parquet", rows(2))
    fs = fsspec.core.url_to_fs(uri)[0]
    assert validate_manifest(uri, filesystem=fs).num_rows == 2
    assert sum(b.num_rows for b in iter_manifest_batches(uri, filesystem=fs)) == 2


def test_binary_image_column(root):
    uri = put(f"{root}/m.parquet", rows(2, image=pa.array([b"\x89PNG", b"\xff\xd8"], pa.binary())))
    summary = validate_manifest(uri)
    assert (summary.binary_images, summary.uri_images) == (2, 0)


def test_directory_of_several_parts(root):
    for part in range(3):
        put(f"{root}/manifest/part-{part}.parquet", rows(4, start=4 * part))
    put(f"{root}/manifest/_SUCCESS", b"")
    summary = validate_manifest(f"{root}/manifest")
    assert summary.num_rows == 12
    assert summary.base_uri == f"{root}/manifest/"


def test_hive_partitions_become_columns(root):
    put(f"{root}/m/date=2026-11-25/part-0.parquet", rows(2))
    put(f"{root}/m/date=2026-11-26/part-0.parquet", rows(3, start=2))
    summary = validate_manifest(f"{root}/m/")
    assert summary.num_rows == 5
    assert summary.extra_columns == ("date",)
    table = pa.Table.from_batches(list(iter_manifest_batches(f"{root}/m", columns=["id", "date"])))
    assert table.column_names == ["id", "date"]
    assert sorted(table.column("date").to_pylist()) == ["2026-11-25"] * 2 + ["2026-11-26"] * 3


def test_glob(root):
    put(f"{root}/m/a.parquet", rows(2))
    put(f"{root}/m/b.parquet", rows(2, start=2))
    put(f"{root}/m/notes.txt", b"not parquet")
    summary = validate_manifest(f"{root}/m/*.parquet")
    assert summary.num_rows == 4
    assert summary.base_uri == f"{root}/m/"


def test_streaming_batches_cover_all_rows(root):
    put(f"{root}/m/part-0.parquet", rows(2500))
    put(f"{root}/m/part-1.parquet", rows(700, start=2500))
    batches = list(iter_manifest_batches(f"{root}/m", columns=["id"], batch_size=1000))
    assert all(b.num_rows <= 1000 for b in batches)
    assert all(b.schema.names == ["id"] for b in batches)
    ids = [i for b in batches for i in b.column("id").to_pylist()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(3200))


def test_unknown_stream_column(root):
    uri = put(f"{root}/m.parquet", rows(1))
    with pytest.raises(ManifestError, match="nope"):
        list(iter_manifest_batches(uri, columns=["id", "nope"]))


def test_missing_required_columns(root):
    uri = put(f"{root}/m.parquet", pa.table({"id": ["a"]}))
    message = problems_of(uri)
    assert "column 'image': missing required column" in message
    assert "column 'prompt': missing required column" in message


def test_wrong_types(root):
    uri = put(f"{root}/m.parquet", rows(2, strength=["0.5", "0.7"], seed=[1.0, 2.0]))
    message = problems_of(uri)
    assert "column 'strength': wrong type string" in message
    assert "column 'seed': wrong type double" in message and "Int64" in message
    uri = put(f"{root}/n.parquet", pa.table({"id": [1, 2], "image": ["a", "b"], "prompt": ["p", "q"]}))
    assert "column 'id': wrong type int64; expected a string" in problems_of(uri)


def test_nulls_in_required_columns_and_empty_ids(root):
    table = pa.table(
        {"id": ["a", None, "", "d"], "image": ["x.png", "y.png", None, "z"], "prompt": [None, "p", "", "q"]}
    )
    message = problems_of(put(f"{root}/m.parquet", table))
    assert "'a'" in problem_line(message, "prompt", "null values")
    assert "row #1" in problem_line(message, "id", "null values")
    assert "''" in problem_line(message, "id", "empty ids")
    assert "''" in problem_line(message, "image", "null values")


def test_empty_prompt_is_allowed(root):
    assert validate_manifest(put(f"{root}/m.parquet", rows(1, prompt=[""]))).num_rows == 1


def test_duplicate_ids_across_files(root):
    put(f"{root}/m/part-0.parquet", rows(3, id=["a", "b", "c"]))
    put(f"{root}/m/part-1.parquet", rows(3, id=["a", "b", "z"]))
    put(f"{root}/m/part-2.parquet", rows(1, id=["a"]))
    line = problem_line(problems_of(f"{root}/m"), "id", "duplicate")
    assert "2 ids" in line and "5 rows" in line
    assert "'a'" in line and "'b'" in line and "'z'" not in line


def test_out_of_range_values_name_column_and_rows(root):
    nan = math.nan
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(7)],
            "image": ["i.png"] * 7,
            "prompt": ["p"] * 7,
            "strength": [0.5, nan, -0.1, 1.5, None, math.inf, 1.0],
            "guidance_scale": [nan, -1.0, 7.0, math.inf, None, 0.0, 30.0],
            "num_inference_steps": [0, 10**6, 30, 1, 1000, None, -3],
            "seed": pa.array([0, 2**64 - 1, 2**63, 2**63 - 1, None, 5, 6], pa.uint64()),
            "num_images": [0, 1, 64, 65, None, 2, 3],
            "width": [512, 513, 60, 4104, None, 64, 4096],
            "height": [512, 512, 512, 512, 512, 512, 100],
            "resize_mode": ["just_resize", "stretch", None, "crop_and_resize", "CROP", "resize_and_fill", ""],
        }
    )
    message = problems_of(put(f"{root}/m.parquet", table))
    expected_bad = {
        "strength": ["r1", "r2", "r3", "r5"],
        "guidance_scale": ["r0", "r1", "r3"],
        "num_inference_steps": ["r0", "r1", "r6"],
        "seed": ["r1", "r2"],
        "num_images": ["r0", "r3"],
        "width": ["r1", "r2", "r3"],
        "height": ["r6"],
        "resize_mode": ["r1", "r4", "r6"],
    }
    for column, bad in expected_bad.items():
        line = problem_line(message, column, "out of range")
        named = {f"r{i}" for i in range(7) if f"'r{i}'" in line}
        assert named == set(bad), (column, line)
        assert f"[{len(bad)} row" in line


def test_negative_int64_seed(root):
    uri = put(f"{root}/m.parquet", rows(2, seed=pa.array([-1, 3], pa.int64())))
    assert "'r0'" in problem_line(problems_of(uri), "seed", "out of range")


def test_at_most_sample_ids_rows_are_named(root):
    uri = put(f"{root}/m.parquet", rows(20, strength=[2.0] * 20))
    line = problem_line(problems_of(uri), "strength", "out of range")
    assert "[20 rows: 'r0', 'r1', 'r2', 'r3', 'r4', ...]" in line
    with pytest.raises(ManifestError, match=r"\[20 rows: 'r0', 'r1', \.\.\.\]"):
        validate_manifest(uri, sample_ids=2)


def test_every_problem_is_listed_at_once(root):
    uri = put(f"{root}/m.parquet", rows(2, id=["a", "a"], strength=[2.0, 0.1], width=[65, 64]))
    message = problems_of(uri)
    assert "3 problem(s)" in message
    assert all(words in message for words in ("duplicate", "'strength'", "'width'"))


def test_relative_image_climbing_out_is_a_problem(root):
    uri = put(f"{root}/m.parquet", rows(3, image=["ok/../a.png", "../b.png", "s3://x/../y.png"]))
    line = problem_line(problems_of(uri), "image", "climb out")
    assert "'r1'" in line and "'r0'" not in line and "'r2'" not in line


def test_empty_image_value(root):
    uri = put(f"{root}/m.parquet", rows(2, image=["", "a.png"]))
    assert "'r0'" in problem_line(problems_of(uri), "image", "empty values")


def test_manifest_not_found(root):
    with pytest.raises(ManifestError, match="nope.parquet: manifest not found"):
        validate_manifest(f"{root}/nope.parquet")
    with pytest.raises(ManifestError, match="no files match"):
        validate_manifest(f"{root}/nope/*.parquet")


def test_not_a_parquet_file(root):
    uri = put(f"{root}/m.parquet", b"id,image,prompt\na,b,c\n")
    with pytest.raises(ManifestError, match="m.parquet: not a Parquet file"):
        validate_manifest(uri)


def test_bad_file_in_a_directory(root):
    put(f"{root}/m/part-0.parquet", rows(2))
    put(f"{root}/m/part-1.parquet", b"garbage that is not parquet")
    with pytest.raises(ManifestError, match="must be Parquet"):
        validate_manifest(f"{root}/m")


def test_empty_directory(root):
    put(f"{root}/m/_SUCCESS", b"")
    with pytest.raises(ManifestError, match="no Parquet files"):
        open_manifest(f"{root}/m")


def test_zero_rows(root):
    uri = put(f"{root}/m.parquet", rows(0))
    assert "0 rows" in problems_of(uri)


@pytest.mark.parametrize(
    ("manifest", "value", "expected"),
    [
        ("s3://bucket/prefix/manifest.parquet", "img/a.png", "s3://bucket/prefix/img/a.png"),
        ("s3://bucket/prefix/manifest.parquet", "./a/./b/../c.png", "s3://bucket/prefix/a/c.png"),
        ("s3://bucket/prefix/", "a.png", "s3://bucket/prefix/a.png"),
        ("s3://bucket/prefix/*.parquet", "a.png", "s3://bucket/prefix/a.png"),
        ("/data/run/m.parquet", "a.png", "/data/run/a.png"),
        ("file:///data/run/m.parquet", "x/a.png", "file:///data/run/x/a.png"),
        ("m.parquet", "a.png", "a.png"),
        ("s3://bucket/prefix/m.parquet", "s3://other/k.png", "s3://other/k.png"),
        ("s3://bucket/prefix/m.parquet", "/abs/x.png", "/abs/x.png"),
        ("s3://bucket/prefix/m.parquet", "file:///a/../b.png", "file:///a/../b.png"),
        ("/data/m.parquet", "/abs/../x.png", "/abs/../x.png"),
    ],
)
def test_resolve_image_uri(manifest, value, expected):
    assert resolve_image_uri(manifest, value) == expected


@pytest.mark.parametrize("value", ["../a.png", "a/../../b.png", "..", ""])
def test_resolve_image_uri_refuses_climbing_out_and_empty(value):
    with pytest.raises(ValueError, match="s3://bucket/p/m.parquet"):
        resolve_image_uri("s3://bucket/p/m.parquet", value)


def test_resolve_against_opened_local_manifest(tmp_path):
    put(f"{tmp_path}/m/part-0.parquet", rows(1))
    assert resolve_image_uri(open_manifest(f"{tmp_path}/m").base_uri, "a.png") == f"{tmp_path}/m/a.png"


def test_rows_as_errors_reports_bad_values_but_refuses_what_stops_the_run(root):
    table = rows(4, strength=[0.5, 1.5, None, math.nan], prompt=["a", None, "c", "d"])
    summary = validate_manifest(put(f"{root}/m.parquet", table), rows_as_errors=True)
    assert summary.num_rows == 4
    report = "\n".join(summary.bad_rows)
    assert "'strength'" in report and "'r1'" in report and "'r3'" in report
    assert "'prompt'" in report and "null values" in report
    # Schema and id problems still refuse the run.
    put(f"{root}/d/part-1.parquet", rows(2))
    put(f"{root}/d/part-2.parquet", rows(1))
    with pytest.raises(ManifestError, match="duplicate ids"):
        validate_manifest(f"{root}/d", rows_as_errors=True)
    with pytest.raises(ManifestError, match="missing required column"):
        no_prompt = put(f"{root}/n.parquet", pa.table({"id": ["a"], "image": ["x"]}))
        validate_manifest(no_prompt, rows_as_errors=True)


def test_row_problems_names_the_column_and_value_per_row():
    steps = [10, 10, 0, 10]
    table = rows(4, strength=[0.5, 2.0, None, 0.1], num_inference_steps=steps, image=["a", "b", "c", ""])
    problems = row_problems(table).to_pylist()
    assert problems[0] is None
    assert problems[1].startswith("column 'strength': out of range") and "(got 2.0)" in problems[1]
    assert problems[2].startswith("column 'num_inference_steps'") and "(got 0)" in problems[2]
    assert problems[3].startswith("column 'image': empty values")


@pytest.mark.parametrize("column", ["prompt", "negative_prompt"])
def test_too_long_prompts_are_short_row_problems(root, column):
    long_text = "x" * 250_000
    table = rows(3, **{column: ["ok", long_text, "y" * 10_000]})
    summary = validate_manifest(put(f"{root}/m.parquet", table), rows_as_errors=True)
    (line,) = summary.bad_rows
    assert line == (
        f"  - column {column!r}: longer than 10000 characters; CLIP reads only the first 77 tokens, "
        "so shorten it [1 row: 'r1']"
    )
    with pytest.raises(ManifestError, match="longer than 10000 characters"):
        validate_manifest(f"{root}/m.parquet")
    problems = row_problems(table).to_pylist()
    assert problems[0] is None and problems[2] is None
    assert problems[1] == (
        f"column {column!r}: longer than 10000 characters; CLIP reads only the first 77 tokens, "
        "so shorten it (got 250000 characters)"
    )


def test_duplicate_ids_are_counted_exactly_across_batches(tmp_path):
    ids = ["b", "a", "", None, "c", "a", "b", "", None, "a", "d"]
    path = put(f"{tmp_path}/m.parquet", rows(len(ids), id=ids))
    with pytest.raises(ManifestError) as caught:
        validate_manifest(path, batch_size=3)
    line = problem_line(str(caught.value), "id", "duplicate")
    # First-seen order; empty and null ids are their own problems, never duplicates.
    assert line.endswith("duplicate ids (5 rows share them); ids must be unique [2 ids: 'b', 'a']")


def test_colliding_id_hashes_are_not_duplicates(tmp_path, monkeypatch):
    """A repeated hash only makes candidates: the ids themselves are compared."""
    monkeypatch.setattr(manifest_module, "_id_hashes", lambda ids: np.zeros(len(ids), np.int64))
    assert validate_manifest(put(f"{tmp_path}/m.parquet", rows(5)), batch_size=2).num_rows == 5
    path = put(f"{tmp_path}/d.parquet", rows(5, id=["x", "y", "x", "z", "y"]))
    line = problem_line(problems_of(path), "id", "duplicate")
    assert line.endswith("(4 rows share them); ids must be unique [2 ids: 'x', 'y']")
