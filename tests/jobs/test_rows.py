"""Manifest rows → work items: input URIs confined to the allowed roots, bad rows as error items."""

from __future__ import annotations

import pyarrow as pa

from jobs.config import RowDefaults
from jobs.rows import expand_rows

BASE = "s3://in/manifests/"
ROOTS = ("s3://in/images/", "/mnt/data/")


def expand(images: list, roots=ROOTS, base: str = BASE, **columns) -> list[dict]:
    """The work items of one row per image value, as dicts."""
    ids = [f"r{i}" for i in range(len(images))]
    image_type = pa.binary() if images and isinstance(images[0], bytes) else pa.string()
    table = pa.table(
        {"id": ids, "image": pa.array(images, image_type), "prompt": ["a cat"] * len(images), **columns}
    )
    return expand_rows(table, RowDefaults(), 0, base, allowed_roots=roots).to_pylist()


def test_an_image_inside_a_root_is_a_work_item():
    (item,) = expand(["s3://in/images/a.png"])
    assert item["image"] == "s3://in/images/a.png"
    assert item["error_type"] is None and item["seed"] is not None


def test_an_image_outside_the_roots_is_an_error_item_that_names_it():
    (item,) = expand(["s3://secret/a.png"])
    assert (item["error_stage"], item["error_type"], item["attempts"]) == ("validate", "InputNotAllowed", 1)
    assert item["error_message"] == (
        "image URI 's3://secret/a.png' is outside the allowed input roots (s3://in/images/, /mnt/data/); "
        "move the file under an allowed root or add its root to inputs.allowed_roots"
    )
    assert item["image"] is None and not item["retryable"]


def test_every_variant_of_a_refused_row_is_an_error_item():
    items = expand(["/etc/passwd", "/mnt/data/ok.png"], num_images=[2, 2])
    assert [item["error_type"] for item in items] == ["InputNotAllowed"] * 2 + [None] * 2


def test_relative_values_are_resolved_against_the_manifest_then_checked():
    (inside,) = expand(["sub/../a.png"], base="s3://in/images/m/")
    (outside,) = expand(["a.png"], base=BASE)
    assert inside["image"] == "s3://in/images/m/a.png" and inside["error_type"] is None
    assert (
        outside["error_type"] == "InputNotAllowed" and "'s3://in/manifests/a.png'" in outside["error_message"]
    )


def test_tricks_with_dots_and_schemes_are_refused():
    items = expand(["/mnt/data/../../etc/passwd", "file:///etc/passwd", "s3://in/images/../secret/x.png"])
    assert [item["error_type"] for item in items] == ["InputNotAllowed"] * 3


def test_inline_image_bytes_are_always_allowed():
    (item,) = expand([b"\x89PNG..."])
    assert item["error_type"] is None and item["image"] is None and item["image_bytes"] == b"\x89PNG..."


def test_no_roots_allow_anything():
    (item,) = expand(["s3://secret/a.png"], roots=())
    assert item["error_type"] is None and item["image"] == "s3://secret/a.png"


def test_a_row_already_bad_keeps_its_own_error():
    (item,) = expand(["s3://secret/a.png"], strength=[2.0])
    assert item["error_type"] == "BadManifestRow" and item["error_message"].startswith("column 'strength'")


def test_a_too_long_prompt_is_a_short_error():
    table = pa.table({"id": ["r0"], "image": ["s3://in/images/a.png"], "prompt": ["x" * 1_000_000]})
    (item,) = expand_rows(table, RowDefaults(), 0, BASE, allowed_roots=ROOTS).to_pylist()
    assert item["error_type"] == "BadManifestRow" and len(item["error_message"]) < 200
    assert (
        "longer than 10000 characters" in item["error_message"]
        and "1000000 characters" in item["error_message"]
    )
