"""Input URI policy: normalising URIs and confining them to the operator's allowed roots."""

from __future__ import annotations

import pytest

from connectors.uri_policy import check_allowed, normalise_uri, root_problem

DATA = ("s3://b/data/",)
LOCAL = ("/mnt/data/",)


@pytest.mark.parametrize(
    ("uri", "roots", "allowed"),
    [
        # no roots: no restriction
        ("s3://anything/x.png", (), True),
        ("relative/x.png", (), True),
        # plain prefixes
        ("s3://b/data/x.png", DATA, True),
        ("s3://b/data/sub/x.png", DATA, True),
        ("s3://b/data/x.png", ("s3://b/data",), True),
        ("s3://other/x.png", DATA, False),
        ("s3://b/x.png", DATA, False),
        # path-segment boundary
        ("s3://b/database/x.png", ("s3://b/data",), False),
        ("s3://b/database/x.png", DATA, False),
        ("/mnt/database/x.png", ("/mnt/data",), False),
        # dot segments
        ("s3://b/data/../secret/x.png", DATA, False),
        ("s3://b/data/sub/../x.png", DATA, True),
        ("s3://b/data/./x.png", DATA, True),
        ("s3://b/data//x.png", DATA, True),
        ("s3://b/other/../data/x.png", DATA, False),  # S3 reads the key as written: other/../data/x.png
        ("s3://b//data/x.png", DATA, False),  # s3fs reads the key /data/x.png
        ("s3://b/../data/x.png", DATA, False),  # climbs above the bucket
        ("s3://b/data/../../other/x.png", ("s3://",), False),
        ("/mnt/data/../../etc/passwd", LOCAL, False),
        ("/mnt/data/sub/../x.png", LOCAL, True),
        ("/mnt//data/./x.png", LOCAL, True),
        ("/../mnt/data/x.png", LOCAL, True),  # the OS reads /.. as /
        # percent escapes are names, not decoded
        ("s3://b/data/%2e%2e/secret/x.png", DATA, True),
        ("s3://b/%2e%2e/data/x.png", DATA, False),
        ("/mnt/data/%2E%2E/x.png", LOCAL, True),
        # file:// is a local path
        ("file:///mnt/data/x.png", LOCAL, True),
        ("file:///etc/passwd", LOCAL, False),
        ("/mnt/data/x.png", ("file:///mnt/data/",), True),
        ("/etc/passwd", ("file:///mnt/data/",), False),
        ("file:////mnt/data/x.png", LOCAL, True),
        ("file://mnt/data/x.png", LOCAL, False),  # fsspec reads this relative to the working directory
        ("file://localhost/mnt/data/x.png", LOCAL, False),
        # schemes
        ("S3://b/data/x.png", DATA, True),
        ("s3://b/data/x.png", ("S3://b/data/",), True),
        ("FILE:///etc/passwd", LOCAL, False),
        ("s3a://b/data/x.png", DATA, False),
        ("gs://b/data/x.png", DATA, False),
        ("s3://b/data/x.png", LOCAL, False),
        ("/mnt/data/x.png", DATA, False),
        # a bare scheme allows the whole scheme
        ("s3://any/where/x.png", ("s3://",), True),
        ("gs://b/x.png", ("s3://",), False),
        ("/anything", ("/",), True),
        ("/anything", ("file://",), True),
        ("s3:///b/x.png", ("s3://",), False),  # no bucket
        # buckets compare exactly
        ("s3://B/data/x.png", DATA, False),
        # several roots
        ("/mnt/data/x.png", DATA + LOCAL, True),
        ("gs://g/x.png", (*DATA, "gs://g/"), True),
        # relative URIs cannot be placed
        ("data/x.png", LOCAL, False),
        ("./x.png", LOCAL, False),
        ("", LOCAL, False),
    ],
)
def test_check_allowed(uri, roots, allowed):
    assert (check_allowed(uri, roots) is None) == allowed


def test_a_refusal_names_the_uri_the_roots_and_the_fix():
    message = check_allowed("s3://other/x.png", ("s3://bucket/data/", "/mnt/data/"))
    assert message == (
        "image URI 's3://other/x.png' is outside the allowed input roots (s3://bucket/data/, /mnt/data/); "
        "move the file under an allowed root or add its root to inputs.allowed_roots"
    )


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("data/x.png", "is a relative path"),
        ("s3://b/../x.png", "climbs above its bucket"),
        ("s3:///x.png", "names no bucket"),
    ],
)
def test_a_uri_that_cannot_be_placed_says_why(uri, words):
    message = check_allowed(uri, DATA)
    assert message.startswith(f"image URI {uri!r} {words}") and "absolute paths or URIs" in message


def test_a_huge_uri_is_cut_in_the_message():
    message = check_allowed("s3://other/" + "x" * 1_000_000, DATA)
    assert len(message) < 400 and "...'" not in message and "'... is outside" in message


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("S3://b/data/./x//y.png", "s3://b/data/x/y.png"),
        ("s3://b/data/sub/../x.png", "s3://b/data/x.png"),
        ("s3://b/data/", "s3://b/data"),
        ("file:///mnt//data/../x.png", "/mnt/x.png"),
        ("FILE:///mnt/x.png", "/mnt/x.png"),
        ("/mnt/data/../../../etc", "/etc"),
        ("/", "/"),
        ("s3://b/%2e%2e/x.png", "s3://b/%2e%2e/x.png"),
        ("gs://b/a/./b", "gs://b/a/b"),
    ],
)
def test_normalise_uri(uri, expected):
    assert normalise_uri(uri) == expected


@pytest.mark.parametrize("uri", ["x.png", "file://relative/x.png", "s3://b/../x", "s3:///x", "gs://"])
def test_normalise_uri_refuses_what_it_cannot_place(uri):
    with pytest.raises(ValueError, match=repr(uri)):
        normalise_uri(uri)


@pytest.mark.parametrize(
    "root", ["s3://", "gs://b/", "s3://bucket/data/", "/mnt/data", "/", "file:///mnt/", "file://"]
)
def test_good_roots(root):
    assert root_problem(root) is None


@pytest.mark.parametrize(
    ("root", "words"),
    [
        ("", "must not be empty"),
        ("  ", "must not be empty"),
        ("data/", "'data/' is a relative path; give an absolute path"),
        ("./data", "is a relative path"),
        ("file://data/", "is a relative path"),
        ("/mnt/data/../other", "contains '..'; write the root without it"),
        ("s3://b/data/..", "contains '..'"),
        ("s3:///data/", "names no bucket"),
    ],
)
def test_bad_roots(root, words):
    assert words in root_problem(root)
