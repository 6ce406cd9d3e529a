"""Credentials never reach logs, metadata, `_run.json` or error messages (issue #6, acceptance 3).

The session's S3 server, Ray cluster and clients all use `FAKE_SECRET` (tests/s3_services.py), a string
that appears nowhere else. The slow test runs the real job as its own driver process on the session's
Ray cluster, with rows that take every output and error path (images, a missing and a corrupt image, a
bad value, a bucket that does not exist, a botocore parameter error, a worker that dies, the secret
written into an image URI), then greps every object the run wrote (Parquet cells and PNG text chunks
decoded too), the driver's stdout and stderr, and every file under the Ray cluster's temp dir.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.output import OutputSink
from connectors.storage import Storage, StorageOptions, join_uri, redact_uri
from jobs.config import load_config
from tests.jobs.test_img2img import png_bytes, upload_model, write_manifest
from tests.ray_services import POISON_PROMPT
from tests.s3_services import FAKE_ACCESS_KEY_ID, FAKE_SECRET

SECRET = FAKE_SECRET.encode()
SAMPLED_BY_PLAN = 16  # jobs.plan.SAMPLE_IMAGES: the plan checks that the first rows' images exist


# ---- the grep ------------------------------------------------------------------------------------


@dataclass
class Scan:
    """What a grep looked at and where it found the secret."""

    files: int = 0
    lines: int = 0
    cells: int = 0
    bytes: int = 0
    hits: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)

    def check_bytes(self, where: str, data: bytes) -> None:
        self.files += 1
        self.bytes += len(data)
        self.lines += data.count(b"\n") + 1
        position = data.find(SECRET)
        if position >= 0:
            self.hits.append(f"{where} (byte {position}): {snippet(data, position)}")

    def check_value(self, where: str, value: object) -> None:
        """Every string (or bytes) inside a decoded value: Parquet cells, PNG text chunks, JSON."""
        for text in _strings(value):
            self.cells += 1
            if FAKE_SECRET in text:
                data = text.encode()
                self.hits.append(f"{where} (decoded): {snippet(data, data.find(SECRET))}")

    def report(self) -> str:
        return "\n".join(f"  - {hit}" for hit in self.hits)


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes):
        yield value.decode("latin-1")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def snippet(data: bytes, position: int, width: int = 80) -> str:
    """The text around a hit, with the secret masked, so the failure message does not leak it too."""
    start, end = max(0, position - width), position + len(SECRET) + width
    return repr(data[start:end].replace(SECRET, b"<FAKE_SECRET>").decode("utf-8", errors="replace"))


def scan_tree(scan: Scan, root: str | Path) -> list[str]:
    """Grep every regular file under `root` (symlinks not followed: `session_latest` is one)."""
    names = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                with open(path, "rb") as handle:
                    data = handle.read()
            except OSError as error:  # a file Ray removed meanwhile, or a socket
                scan.unreadable.append(f"{path}: {error}")
                continue
            scan.check_bytes(path, data)
            names.append(path)
    return names


def scan_objects(scan: Scan, storage: Storage, root_uri: str) -> list[str]:
    """Grep every object under `root_uri`: raw bytes, and decoded Parquet cells and PNG text chunks."""
    fs, path = storage.filesystem(root_uri)
    keys = sorted(fs.find(path))
    for key in keys:
        uri = f"s3://{key}"
        data = storage.read_bytes(uri)
        scan.check_bytes(uri, data)
        if key.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
            scan.check_value(uri, table.schema.metadata or {})
            scan.check_value(uri, table.to_pylist())
        elif key.endswith(".json") or key.rsplit("/", 1)[-1] == "_SUCCESS":
            scan.check_value(uri, json.loads(data))
        elif key.endswith(".png"):
            with PIL.Image.open(io.BytesIO(data)) as image:
                scan.check_value(uri, dict(image.info))  # zTXt chunks are compressed in the raw bytes
    return keys


def test_the_grep_finds_a_planted_secret(tmp_path):
    """A broken grep must not pass silently: it finds the secret in raw text, in a compressed Parquet
    cell and in a compressed PNG text chunk, and masks it in what it reports."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "worker.log").write_bytes(b"ok\nconnecting with " + SECRET + b" now\nok\n")
    (tmp_path / "clean.log").write_text("nothing here\n")
    scan = Scan()
    assert len(scan_tree(scan, tmp_path)) == 2
    assert len(scan.hits) == 1 and "worker.log" in scan.hits[0] and "<FAKE_SECRET>" in scan.hits[0]
    assert FAKE_SECRET not in scan.report()

    buffer = io.BytesIO()
    cells = pa.array([f"row {i} " + "x" * 50 for i in range(200)] + [f"error: {FAKE_SECRET}"])
    pq.write_table(pa.table({"message": pa.DictionaryArray.from_arrays(list(range(201)), cells)}), buffer)
    scan = Scan()
    scan.check_value("part.parquet", pq.read_table(io.BytesIO(buffer.getvalue())).to_pylist())
    assert len(scan.hits) == 1 and scan.cells >= 201

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", f"key {FAKE_SECRET}", zip=True)
    png = io.BytesIO()
    PIL.Image.new("RGB", (4, 4)).save(png, format="PNG", pnginfo=info)
    assert SECRET not in png.getvalue()  # compressed: only the decoded check can see it
    scan = Scan()
    with PIL.Image.open(io.BytesIO(png.getvalue())) as image:
        scan.check_value("image.png", dict(image.info))
    assert len(scan.hits) == 1


# ---- cheap, in-process ---------------------------------------------------------------------------


def test_configuration_and_storage_hold_no_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    config = load_config(
        None, flags={"model.path": "s3://m/model", "manifest": "s3://d/m.parquet", "output": "s3://d/out"}
    )
    recorded = json.dumps(config.to_dict()) + json.dumps(config.storage.to_options(config.retry).describe())
    storage = Storage(config.storage.to_options(config.retry))
    recorded += json.dumps(storage.describe()) + repr(storage.options)
    assert FAKE_SECRET not in recorded and FAKE_ACCESS_KEY_ID not in recorded

    # Credentials offered as options are refused, top level or nested, and the refusal names only the key.
    for extra in ({"secret": FAKE_SECRET}, {"client_kwargs": {"aws_secret_access_key": FAKE_SECRET}}):
        with pytest.raises(ValueError, match="must not carry credentials") as refused:
            StorageOptions(extra=extra)
        assert FAKE_SECRET not in str(refused.value)


def test_a_config_file_with_credentials_is_refused_without_echoing_them(tmp_path):
    """The configuration has no place for credentials: an unknown key is named, its value is not."""
    path = tmp_path / "job.yaml"
    path.write_text(f"manifest: a\noutput: b\nmodel: {{path: m}}\nstorage: {{secret: {FAKE_SECRET}}}\n")
    with pytest.raises(ValueError, match="storage.secret: unknown key") as refused:
        load_config(str(path))
    assert FAKE_SECRET not in str(refused.value)


def test_a_set_override_with_credentials_is_refused_without_echoing_them():
    with pytest.raises(ValueError, match="storage.secret") as refused:
        load_config(
            None, [f"storage.secret={FAKE_SECRET}"], {"manifest": "a", "output": "b", "model.path": "m"}
        )
    assert FAKE_SECRET not in str(refused.value)


@pytest.mark.parametrize(
    "uri, redacted",
    [
        (f"s3://{FAKE_ACCESS_KEY_ID}:{FAKE_SECRET}@bucket/x.png", "s3://***@bucket/x.png"),
        (f"s3://{FAKE_ACCESS_KEY_ID}:ab/{FAKE_SECRET}@bucket/x.png", "s3://***@bucket/x.png"),  # '/' in it
        (f"s3://{FAKE_ACCESS_KEY_ID}:{FAKE_SECRET}", "s3://***"),
        (f"gs://{FAKE_SECRET}@bucket/x.png", "gs://***@bucket/x.png"),
        (f"https://user:{FAKE_SECRET}@host:8443/x.png", "https://***@host:8443/x.png"),
    ],
)
def test_a_uri_with_credentials_is_refused_masked(uri, redacted):
    assert redact_uri(uri) == redacted
    with pytest.raises(ValueError, match="holds credentials") as refused:
        Storage().read_bytes(uri)
    assert FAKE_SECRET not in str(refused.value) and redacted in str(refused.value)


@pytest.mark.parametrize(
    "uri",
    ["s3://bucket/a@2x.png", "s3://bucket/k:v@x", "http://host:80/p@x", "/tmp/a@b", "file:///tmp/a@b",
     "s3://arn:aws:s3:us-east-1:123456789012:accesspoint/ap/key"],
)  # fmt: skip
def test_uris_without_credentials_stay_as_they_are(uri):
    assert redact_uri(uri) == uri


# ---- the real job --------------------------------------------------------------------------------


def build_inputs(storage: Storage, root: str, bucket: str) -> tuple[str, set[str], dict[str, str | None]]:
    """Inputs and a manifest with every kind of row; returns the manifest URI, the ids that must make an
    image and {id: expected error stage (None: not checked)} of the rows that must fail."""
    storage.write_bytes(join_uri(root, "inputs", "corrupt.png"), b"\x89PNG\r\n\x1a\n not really a png")
    rows: list[tuple[str, str, str, float]] = []  # id, image, prompt, strength
    for i in range(4):
        storage.write_bytes(join_uri(root, "inputs", f"good-{i}.png"), png_bytes(i, 64, 64))
        rows.append((f"good-{i}", f"inputs/good-{i}.png", f"a picture number {i}", 0.75))
    rows += [
        ("missing", "inputs/nope.png", "ok", 0.75),
        ("corrupt", "inputs/corrupt.png", "ok", 0.75),
        ("strong", "inputs/good-0.png", "ok", 1.5),
        ("no-bucket", f"s3://sdbatch-no-such-bucket-{uuid.uuid4().hex[:8]}/x.png", "ok", 0.75),
        ("poison", "inputs/good-1.png", POISON_PROMPT, 0.75),
    ]
    rows += [(f"pad-{i}", "inputs/good-2.png", "ok", 2.0) for i in range(SAMPLED_BY_PLAN - len(rows))]
    # Rows the plan does not sample (it checks that the first rows' images exist, and an invalid
    # bucket name makes that check raise rather than answer).
    good_key = storage.filesystem(join_uri(root, "inputs", "good-3.png"))[1].split("/", 1)[1]
    rows += [
        ("creds-in-uri", f"s3://{FAKE_ACCESS_KEY_ID}:{FAKE_SECRET}@{bucket}/{good_key}", "ok", 0.75),
        ("bad-bucket-name", "s3://Not!A!Bucket/x.png", "ok", 0.75),
    ]
    ids, images, prompts, strengths = (list(column) for column in zip(*rows, strict=True))
    table = pa.table({"id": ids, "image": images, "prompt": prompts, "strength": strengths})
    failing = {
        "missing": "read", "corrupt": "decode", "strong": "validate", "no-bucket": "read", "poison": None,
        "creds-in-uri": "read", "bad-bucket-name": "read",
        **{row_id: "validate" for row_id in ids if row_id.startswith("pad-")},
    }  # fmt: skip
    return write_manifest(storage, root, table), {i for i in ids if i.startswith("good-")}, failing


@pytest.mark.slow
def test_the_secret_appears_in_no_output_log_or_ray_file(
    ray_cluster, s3_server, model_dirs, tmp_path, monkeypatch
):
    assert s3_server.secret_key == FAKE_SECRET and ray_cluster.env["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET
    for name, value in s3_server.env().items():  # this process writes the inputs and reads the output
        monkeypatch.setenv(name, value)
    storage = Storage(StorageOptions(endpoint_url=s3_server.endpoint_url))
    root = f"s3://{s3_server.bucket}/secrets-{uuid.uuid4().hex[:8]}"
    model = upload_model(storage, model_dirs["v1"], join_uri(root, "model"))  # fetched through the cache
    manifest, expected_images, expected_errors = build_inputs(storage, root, s3_server.bucket)
    output = join_uri(root, "out")
    config = tmp_path / "job.yaml"
    config.write_text(
        f"manifest: {manifest}\noutput: {output}\n"
        "max_error_rate: 1.0\nlog_every_s: 1\ncontact_sheet_rows: 4\n"
        f"model: {{path: {model}}}\n"
        "defaults: {num_inference_steps: 4, strength: 0.75, negative_prompt: blurry}\n"
        "compute: {batch_size: 2, gpus_per_actor: 0, actors_max: 1}\n"
        f"storage: {{endpoint_url: '{s3_server.endpoint_url}'}}\n"
    )
    log_path = tmp_path / "driver.log"
    # The driver gets the cluster's environment (the AWS_* credentials included), as `ray job submit`'s
    # entrypoint or an operator's shell would have it.
    env = {**ray_cluster.client_env(), "PYTHONPATH": os.getcwd()}
    with open(log_path, "wb") as log:
        driver = subprocess.run(
            [sys.executable, "-m", "jobs.img2img", "--config", str(config)],
            env=env, stdout=log, stderr=subprocess.STDOUT, timeout=420, check=False,
        )  # fmt: skip
    driver_log = log_path.read_bytes()
    tail = driver_log[-4000:].replace(SECRET, b"<FAKE_SECRET>").decode(errors="replace")
    assert driver.returncode == 0, f"the job exited with {driver.returncode}:\n{tail}"

    # The run really took every path: images, error rows of each kind, a commit (details after the grep,
    # so that a leak is reported by the grep, with every place it reached, and never echoed here).
    sink = OutputSink(storage, output)
    assert sink.is_committed()
    images = {row["id"] for row in sink.read_metadata().to_pylist()}
    errors = {row["id"]: row for row in sink.read_errors().to_pylist()}
    assert images == expected_images and set(errors) == set(expected_errors), (images, sorted(errors))
    assert b"progress:" in driver_log  # the job's own log lines are in what we grep

    outputs, driver_scan, ray_scan = Scan(), Scan(), Scan()
    keys = scan_objects(outputs, storage, output)
    assert {"_SUCCESS", "_run.json", "_job.json", "contact_sheet.png"} <= {k.rsplit("/", 1)[1] for k in keys}
    assert sum(k.endswith(".parquet") for k in keys) >= 2 and sum(k.endswith(".png") for k in keys) > 4
    driver_scan.check_bytes(str(log_path), driver_log)
    ray_files = scan_tree(ray_scan, ray_cluster.temp_dir)
    log_names = [os.path.basename(name) for name in ray_files]
    # The Ray tree holds what the cluster logged, the workers' output included (the grep saw it).
    assert any(name.startswith("raylet") for name in log_names), log_names
    assert any(name.startswith("worker-") and name.endswith((".out", ".err")) for name in log_names)
    counts = (
        f"scanned {outputs.files} objects ({outputs.cells} decoded strings), driver log "
        f"({driver_scan.lines} lines), {ray_scan.files} Ray files ({ray_scan.lines} lines, "
        f"{ray_scan.bytes} bytes; {len(ray_scan.unreadable)} unreadable)"
    )
    print(counts)
    hits = outputs.hits + driver_scan.hits + ray_scan.hits
    assert not hits, f"the fake S3 secret leaked ({counts}):\n" + "\n".join(f"  - {h}" for h in hits)

    for row_id, stage in expected_errors.items():
        assert stage is None or errors[row_id]["stage"] == stage, errors[row_id]
    assert errors["poison"]["error_type"] == "WorkerDied"
    assert errors["bad-bucket-name"]["error_type"] == "ParamValidationError", errors["bad-bucket-name"]
    assert "does not exist" in errors["no-bucket"]["message"]
    creds = errors["creds-in-uri"]["message"]
    assert "holds credentials" in creds and f"s3://***@{s3_server.bucket}/" in creds, creds
    run_record = sink.read_run_manifest()
    assert run_record["counts"] == {"images": len(images), "errors": len(errors)}
    assert run_record["config"]["storage"]["endpoint_url"] == s3_server.endpoint_url
