"""`sdbatch verify`: the accounting invariant checked on outputs built to be right or broken in one way."""

from __future__ import annotations

import io
import json

import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.output import ErrorRecord, OutputSink, errors_table
from connectors.storage import Storage, join_uri
from jobs.config import ConfigError, load_config
from jobs.verify import main, storage_options, verify_output


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


def write_job_record(sink: OutputSink, manifest: str, **flags: object) -> None:
    """`_job.json` as a run writes it when it starts: the fingerprint and the whole config."""
    flags = {"manifest": manifest, "output": sink.layout.root, "model.path": "m", **flags}
    config = load_config(None, flags=flags)
    sink.write_job_record({"fingerprint": config.fingerprint(), "config": config.to_dict()})


def endpoint_flags(storage: Storage) -> list[str]:
    endpoint = storage.options.endpoint_url
    return ["--storage-endpoint", endpoint] if endpoint else []


def test_a_good_output_passes(built, capsys):
    storage, output, manifest, _ = built
    report = verify_output(storage, output, manifest, check_all_images=True)
    assert report.ok, report.lines()
    assert report.counts == {"expected": 5, "images": 4, "errors": 1, "images_checked": 4}
    assert main([output, "--manifest", manifest, "--all", *endpoint_flags(storage)]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("OK")


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


def test_verify_takes_the_manifest_from_the_output_s_job_record(built, capsys):
    storage, output, manifest, sink = built
    write_job_record(sink, manifest, **{"storage.endpoint_url": storage.options.endpoint_url})
    assert main([output, *endpoint_flags(storage)]) == 0
    out = capsys.readouterr().out
    assert f"against {manifest} (manifest from {sink.layout.job_record})" in out and "\nOK" in out


def test_verify_reads_the_record_of_a_run_not_yet_committed(built, capsys):
    storage, output, manifest, sink = built
    write_job_record(sink, manifest, **{"storage.endpoint_url": storage.options.endpoint_url})
    storage.delete(sink.layout.success_marker)
    assert main([output, *endpoint_flags(storage)]) == 1
    assert "no _SUCCESS: the run has not committed" in capsys.readouterr().out


def test_verify_reaches_the_manifest_with_the_storage_settings_the_run_recorded(
    s3_server, tmp_path, monkeypatch, capsys
):
    """The manifest is on an S3-compatible store, the output on local disk: only the record names the
    endpoint the manifest needs."""
    from tests.conftest import s3_store

    remote = s3_store(s3_server, monkeypatch)
    manifest = join_uri(remote.root, "manifest.parquet")
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": ["a"], "image": ["x.png"], "prompt": ["p"]}), buffer)
    remote.storage.write_bytes(manifest, buffer.getvalue())
    sink = OutputSink(Storage(), str(tmp_path / "out"))
    sink.write_metadata(metadata_table([("a", 0)], [sink.write_image("a", 0, png(), "png")]))
    sink.commit({}, expected_rows=1)
    write_job_record(sink, manifest, **{"storage.endpoint_url": s3_server.endpoint_url})
    assert main([sink.layout.root]) == 0, capsys.readouterr().err
    assert "\nOK" in capsys.readouterr().out


def test_verify_without_a_record_or_manifest_says_to_pass_one(tmp_path, capsys):
    never = str(tmp_path / "never-written")
    assert main([never]) == 2
    err = capsys.readouterr().err
    assert f"{never} has no _job.json (no run has started there); pass --manifest URI" in err
    sink = OutputSink(Storage(), str(tmp_path / "out"))
    sink.write_job_record({"fingerprint": "0" * 64})
    assert main([sink.layout.root]) == 2
    assert f"{sink.layout.job_record} names no manifest; pass --manifest URI" in capsys.readouterr().err


def test_verify_of_a_manifest_that_is_not_there_is_a_message_not_a_traceback(built, capsys):
    storage, output, _, _ = built
    missing = join_uri(output, "no-such-manifest.parquet")
    assert main([output, "--manifest", missing, *endpoint_flags(storage)]) == 2
    err = capsys.readouterr().err
    assert "nothing checked" in err and "manifest not found" in err and "Traceback" not in err


def test_verify_storage_flags_override_the_record_and_set_takes_storage_and_retry_keys():
    recorded = {"storage": {"endpoint_url": "http://recorded:8333", "profile": "batch"}, "retry": {}}
    flags = {"storage.endpoint_url": "http://flag:8333"}
    options = storage_options(recorded, ["retry.storage_attempts=2"], flags)
    assert (options.endpoint_url, options.profile, options.retry.attempts) == ("http://flag:8333", "batch", 2)
    assert storage_options(recorded, ["storage.profile=null"]).profile is None
    with pytest.raises(ConfigError) as raised:
        storage_options(recorded, ["model.path=x"])
    assert "--set model.path=x: verify takes only storage.KEY and retry.KEY settings" in str(raised.value)


def test_verify_flags_that_conflict_with_the_record_are_refused_naming_both(tmp_path, capsys):
    sink = OutputSink(Storage(), str(tmp_path / "out"))
    write_job_record(sink, str(tmp_path / "manifest.parquet"), **{"storage.profile": "batch"})
    assert main([sink.layout.root, "--storage-anonymous"]) == 2
    err = capsys.readouterr().err
    assert f"in {sink.layout.job_record}" in err and "storage.anonymous (from --storage-anonymous)" in err


def test_verify_of_an_output_it_may_not_read_names_it_and_the_storage_flags(s3_server, monkeypatch, capsys):
    from tests.conftest import s3_store

    remote = s3_store(s3_server, monkeypatch)
    sink = OutputSink(remote.storage, join_uri(remote.root, "out"))
    write_job_record(sink, join_uri(remote.root, "manifest.parquet"))
    anonymous = [sink.layout.root, "--storage-endpoint", s3_server.endpoint_url, "--storage-anonymous"]
    assert main([*anonymous, "--set", "retry.storage_attempts=1"]) == 2
    err = capsys.readouterr().err
    assert f"reading {sink.layout.root} or its manifest failed with" in err and "--storage-profile" in err
