"""local_copy: remote models and adapters downloaded once per node and committed by a marker; sha256_of."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from connectors.storage import Storage, join_uri
from jobs.model_cache import cached_sha256, local_copy, sha256_of
from tests.conftest import StoreUnderTest, s3_store

ROOT = Path(__file__).resolve().parents[2]

FOLDER = {
    "model_index.json": b'{"_class_name": "StableDiffusionImg2ImgPipeline"}',
    "unet/config.json": b"{}",
    "unet/diffusion_pytorch_model.safetensors": bytes(range(256)) * 64,
    "text_encoder/nested/deep.bin": b"deep",
}

# One of several processes on a node asking for the same URI: it logs every object it fetches, and waits
# at a gate so that all of them call `local_copy` at the same moment.
CONCURRENT_CHILD = """
import os, sys, time
from connectors.storage import Storage, StorageOptions
from jobs.model_cache import local_copy

endpoint, uri, cache, fetch_log, gate = sys.argv[1:]
storage = Storage(StorageOptions(endpoint_url=endpoint))
fs, _ = storage.filesystem(uri)
fetch = fs.get_file

def logged_fetch(source, destination, **kwargs):
    with open(fetch_log, "a") as log:
        log.write(source + "\\n")
    time.sleep(0.05)
    return fetch(source, destination, **kwargs)

fs.get_file = logged_fetch
open(os.path.join(os.path.dirname(gate), f"ready-{os.getpid()}"), "w").close()
while not os.path.exists(gate):
    time.sleep(0.005)
print(local_copy(uri, storage, cache))
"""


@pytest.fixture(params=["memory", "s3"])
def remote(request, monkeypatch) -> StoreUnderTest:
    """A store that `local_copy` must download from: in-process memory, and the real S3 server."""
    if request.param == "memory":
        return StoreUnderTest("memory", Storage(), f"memory://model-cache-{uuid.uuid4().hex}")
    return s3_store(request.getfixturevalue("s3_server"), monkeypatch)


@pytest.fixture
def cache(tmp_path) -> str:
    return str(tmp_path / "cache")


def upload(storage: Storage, root: str, files: dict[str, bytes]) -> str:
    for relative, data in files.items():
        storage.write_bytes(join_uri(root, relative), data)
    return root


def read_tree(folder: str | Path) -> dict[str, bytes]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def forbid_storage(monkeypatch, storage: Storage) -> None:
    def fail(uri: str):
        raise AssertionError(f"storage was asked for {uri} although the copy is cached")

    monkeypatch.setattr(storage, "filesystem", fail)


def test_folder_round_trips_and_a_second_call_does_no_io(store, cache, monkeypatch):
    uri = upload(store.storage, join_uri(store.root, "model"), FOLDER)
    path = local_copy(uri, store.storage, cache)
    assert read_tree(path) == FOLDER
    assert (path == uri) == (store.backend == "local")

    forbid_storage(monkeypatch, store.storage)
    assert local_copy(uri, store.storage, cache) == path


def test_single_file_round_trips_and_a_second_call_does_no_io(store, cache, monkeypatch):
    uri = join_uri(store.root, "adapters", "style.safetensors")
    store.storage.write_bytes(uri, b"lora weights")
    path = local_copy(uri, store.storage, cache)
    assert Path(path).read_bytes() == b"lora weights"
    assert os.path.basename(path) == "style.safetensors"

    forbid_storage(monkeypatch, store.storage)
    assert local_copy(uri, store.storage, cache) == path


def test_remote_copy_lives_in_the_cache_under_the_uri_digest(remote, cache, monkeypatch):
    uri = upload(remote.storage, join_uri(remote.root, "model"), FOLDER)
    path = local_copy(uri, remote.storage, cache)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:24]
    assert path == os.path.join(cache, digest, "model")
    assert read_tree(path) == FOLDER

    forbid_storage(monkeypatch, remote.storage)
    assert local_copy(uri, remote.storage, cache) == path


def test_marker_records_the_remote_listing(remote, cache):
    uri = upload(remote.storage, join_uri(remote.root, "model"), FOLDER)
    path = local_copy(uri, remote.storage, cache)
    marker = json.loads(Path(os.path.dirname(path) + ".complete").read_text())
    assert marker["uri"] == uri
    assert marker["path"] == path
    assert marker["files"] == len(FOLDER)
    assert marker["bytes"] == sum(len(data) for data in FOLDER.values())
    assert {name: item["size"] for name, item in marker["listing"].items()} == {
        name: len(data) for name, data in FOLDER.items()
    }
    if remote.backend == "s3":
        assert all(item["etag"] for item in marker["listing"].values())


def test_real_tiny_model_round_trips_through_s3(s3_server, monkeypatch, model_dirs, cache):
    s3 = s3_store(s3_server, monkeypatch)
    model = read_tree(model_dirs["v1"])
    uri = upload(s3.storage, join_uri(s3.root, "tiny-v1"), model)
    path = local_copy(uri, s3.storage, cache)
    assert read_tree(path) == model
    assert sha256_of(path) == sha256_of(str(model_dirs["v1"]))


def test_concurrent_processes_download_once(s3_server, monkeypatch, tmp_path, cache):
    s3 = s3_store(s3_server, monkeypatch)
    uri = upload(s3.storage, join_uri(s3.root, "model"), FOLDER)
    fetch_log, gate = tmp_path / "fetches.log", tmp_path / "gate" / "open"
    gate.parent.mkdir()
    arguments = [s3_server.endpoint_url, uri, cache, str(fetch_log), str(gate)]
    children = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT_CHILD, *arguments], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    deadline = time.monotonic() + 60
    while len(list(gate.parent.glob("ready-*"))) < len(children) and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.touch()
    results = [child.communicate(timeout=60) for child in children]

    assert all(child.returncode == 0 for child in children), [err for _, err in results]
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    assert read_tree(paths.pop()) == FOLDER
    _, bucket_path = s3.storage.filesystem(uri)
    fetched = fetch_log.read_text().split()
    assert sorted(fetched) == sorted(f"{bucket_path}/{name}" for name in FOLDER)
    assert not [name for name in os.listdir(cache) if ".tmp-" in name]


def test_crashed_download_is_cleaned_and_redone(remote, cache):
    uri = upload(remote.storage, join_uri(remote.root, "model"), FOLDER)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:24]
    leftover = Path(cache, f"{digest}.tmp-{uuid.uuid4().hex}", "model")
    leftover.mkdir(parents=True)
    (leftover / "model_index.json").write_bytes(b"trunc")
    uncommitted = Path(cache, digest, "model")  # renamed into place, then the process died before the marker
    uncommitted.mkdir(parents=True)
    (uncommitted / "stale.bin").write_bytes(b"stale")

    path = local_copy(uri, remote.storage, cache)
    assert read_tree(path) == FOLDER
    assert not [name for name in os.listdir(cache) if ".tmp-" in name]


def test_cache_is_trusted_until_a_refresh(remote, cache):
    uri = join_uri(remote.root, "model.safetensors")
    remote.storage.write_bytes(uri, b"first")
    path = local_copy(uri, remote.storage, cache)
    remote.storage.write_bytes(uri, b"overwritten in place")

    assert Path(local_copy(uri, remote.storage, cache)).read_bytes() == b"first"
    assert local_copy(uri, remote.storage, cache, refresh=True) == path
    assert Path(path).read_bytes() == b"overwritten in place"


def test_missing_uri_is_an_error_naming_it(remote, cache):
    uri = join_uri(remote.root, "no-such-model")
    with pytest.raises(FileNotFoundError, match=re.escape(uri)):
        local_copy(uri, remote.storage, cache)
    assert all(name.endswith(".lock") for name in os.listdir(cache))


def test_missing_local_path_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"model path {re.escape(missing)} does not exist"):
        local_copy(missing, Storage())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        local_copy(f"file://{missing}", Storage())


def test_file_uri_is_returned_as_a_local_path(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    assert local_copy(f"file://{tmp_path}/model.safetensors", Storage()) == f"{tmp_path}/model.safetensors"


def test_cache_folder_comes_from_the_environment(remote, tmp_path, monkeypatch):
    monkeypatch.setenv("SDBATCH_CACHE_DIR", str(tmp_path / "from-env"))
    uri = join_uri(remote.root, "embedding.pt")
    remote.storage.write_bytes(uri, b"vectors")
    assert local_copy(uri, remote.storage).startswith(str(tmp_path / "from-env") + os.sep)


def test_sha256_of_a_file_is_hashlibs(tmp_path):
    data = os.urandom(3 * 1024 * 1024)
    (tmp_path / "weights.bin").write_bytes(data)
    assert sha256_of(str(tmp_path / "weights.bin")) == hashlib.sha256(data).hexdigest()


def test_sha256_of_a_folder_names_its_visible_content_only(tmp_path):
    def folder(name: str, files: dict[str, bytes]) -> str:
        for relative, data in files.items():
            (tmp_path / name / relative).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / relative).write_bytes(data)
        return str(tmp_path / name)

    reference = sha256_of(folder("a", FOLDER))
    assert sha256_of(folder("reversed", dict(reversed(FOLDER.items())))) == reference
    hidden = {".cache/huggingface/lock": b"x", "unet/.DS_Store": b"y"}
    assert sha256_of(folder("with-hidden", {**FOLDER, **hidden})) == reference
    assert sha256_of(folder("changed", {**FOLDER, "unet/config.json": b"{ }"})) != reference
    renamed = {("unet/other.json" if k == "unet/config.json" else k): v for k, v in FOLDER.items()}
    assert sha256_of(folder("renamed", renamed)) != reference
    assert sha256_of(str(tmp_path / "a")) == reference


def test_cached_sha256_is_kept_beside_cached_copies_only(remote, cache, tmp_path):
    uri = upload(remote.storage, join_uri(remote.root, "model"), FOLDER)
    path = local_copy(uri, remote.storage, cache)
    assert cached_sha256(path) == sha256_of(path)
    assert Path(path + ".sha256").read_text() == sha256_of(path)
    assert cached_sha256(path) == sha256_of(path)

    user_file = tmp_path / "mine.safetensors"
    user_file.write_bytes(b"weights")
    assert cached_sha256(str(user_file)) == hashlib.sha256(b"weights").hexdigest()
    assert not Path(f"{user_file}.sha256").exists()
