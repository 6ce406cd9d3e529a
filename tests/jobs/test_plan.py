"""The plan's work count: expected keys per (id, variant), and the allocator planning runs under."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.manifest import open_manifest
from connectors.output import key_strings
from jobs.plan import expected_keys, planning_memory
from jobs.rows import variant_count


def reference_keys(table: pa.Table, default: int) -> pa.Array:
    """One key per (id, variant), row by row with `variant_count`: the rule expected_keys must keep."""
    counts = table["num_images"].to_pylist() if "num_images" in table.column_names else [None] * len(table)
    ids, variants = [], []
    for row_id, num_images in zip(table["id"].to_pylist(), counts, strict=True):
        count = variant_count(num_images, default)
        ids += [row_id] * count
        variants += range(count)
    return key_strings(pa.array(ids, pa.string()), pa.array(variants, pa.int32()))


@pytest.mark.parametrize(
    "num_images",
    [
        None,
        pa.array([None, 0, 1, 3, 64, 65, -2, 2**40, 2] * 4, pa.int64()),
        pa.array([None, 0, 1, 3, 64, 65, 2**64 - 1, 2**63, 2] * 4, pa.uint64()),
        pa.array([None, 2.0, 1.5, 3.0, 0.0, 70.0, 1.0, 2.0, 4.0] * 4, pa.float64()),
    ],
    ids=["no column", "int64", "uint64", "float64"],
)
@pytest.mark.parametrize("default", [1, 3, 0, 65])
def test_expected_keys_follow_variant_count(tmp_path, monkeypatch, num_images, default):
    monkeypatch.setattr("jobs.plan.KEY_BATCH_ROWS", 5)  # several batches, variants across their edges
    columns = {"id": pa.array([f"r{i}" for i in range(35)] + [None], pa.large_string())}
    if num_images is not None:
        columns["num_images"] = num_images
    table = pa.table(columns)
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=7)
    keys = expected_keys(open_manifest(str(tmp_path / "m.parquet")), default)
    assert keys.equals(reference_keys(table, default))


def test_planning_memory_restores_the_default_pool():
    before = pa.default_memory_pool().backend_name
    with pytest.raises(RuntimeError), planning_memory():
        assert pa.default_memory_pool().backend_name == "system"
        kept = pa.array(range(1000))
        raise RuntimeError
    assert pa.default_memory_pool().backend_name == before
    assert kept.sum().as_py() == 499500  # allocated under the system pool, still valid after
