"""Acceptance 2 of issue #4: a store that throttles and drops connections loses and duplicates nothing."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest

from connectors.output import OutputSink
from connectors.storage import RetryPolicy, join_uri
from tests.conftest import s3_store
from tests.s3_services import FaultProxy

ROWS = 120
PER_PART = 20


def image_bytes(row_id: str) -> bytes:
    return hashlib.sha256(row_id.encode()).digest() * 64


@pytest.fixture
def faulty_store(s3_server, monkeypatch):
    """Storage reaching the real server through a proxy failing ~10 % (503 SlowDown) and resetting ~5 %."""
    with FaultProxy(s3_server.endpoint_url, error_rate=0.10, reset_rate=0.05, seed=7) as proxy:
        retry = RetryPolicy(attempts=8, initial_backoff_s=0.01, max_backoff_s=0.2, budget_s=60)
        faulty = s3_store(s3_server, monkeypatch, endpoint_url=proxy.endpoint_url, retry=retry)
        direct = s3_store(s3_server, monkeypatch)
        direct.root = faulty.root
        yield faulty, direct, proxy


def test_every_write_and_read_survives_throttling_and_resets(faulty_store):
    faulty, direct, proxy = faulty_store
    sink = OutputSink(faulty.storage, faulty.root)
    sink.begin()
    ids = [f"row-{i:03d}" for i in range(ROWS)]

    def write_part(part_ids: list[str]) -> None:
        for row_id in part_ids:
            sink.write_image(row_id, 0, image_bytes(row_id), "png")
        sink.write_metadata(pa.table({"id": part_ids, "variant": pa.array([0] * len(part_ids), pa.int32())}))

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(write_part, [ids[i : i + PER_PART] for i in range(0, ROWS, PER_PART)]))
    summary = sink.commit({"run": "faults"}, expected_rows=ROWS)
    assert summary.images == ROWS and summary.duplicates_removed == 0

    # Reads through the faulty proxy return exactly what was written.
    assert len(sink.read_metadata()) == ROWS
    for row_id in ids[::7]:
        assert faulty.storage.read_bytes(sink.layout.image_uri(row_id, 0, "png")) == image_bytes(row_id)

    # Faults really happened, including resets after the server had applied the request.
    assert proxy.errors_injected > 10 and proxy.resets_injected > 5 and proxy.resets_after_upstream > 0
    assert (proxy.errors_injected + proxy.resets_injected) / proxy.requests > 0.1

    # Seen directly: exactly the expected objects, each whole, nothing extra, nothing twice.
    fs, root_path = direct.storage.filesystem(direct.root)
    listing = fs.find(root_path, detail=True)
    found = {path[len(root_path) + 1 :]: info["size"] for path, info in listing.items()}
    images = {f"images/{row_id}/0.png" for row_id in ids}
    assert {k for k in found if k.startswith("images/")} == images
    assert all(found[k] == len(image_bytes("x")) for k in images)
    assert len([k for k in found if k.startswith("metadata/")]) == ROWS // PER_PART
    assert set(found) - images - {k for k in found if k.startswith("metadata/")} == {"_run.json", "_SUCCESS"}
    direct_sink = OutputSink(direct.storage, direct.root)
    assert direct_sink.is_committed() and len(direct_sink.read_metadata()) == ROWS
    for row_id in ids:
        image = direct.storage.read_bytes(join_uri(direct.root, "images", row_id, "0.png"))
        assert image == image_bytes(row_id)
