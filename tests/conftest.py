"""Shared fixtures: tiny Stable Diffusion models in the real diffusers layout, written by diffusers itself."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from sd_core.tiny_configs import TINY_CONFIGS  # noqa: E402

# Tiny models are dominated by per-op overhead; a second OpenMP thread only adds spin-waiting (and
# slows 50x when another process holds the other core).
torch.set_num_threads(1)


def write_model_with_diffusers(folder, family: str, seed: int = 0):
    """A tiny random model saved by diffusers' own `save_pretrained` (the format's reference writer)."""
    from tests.diffusers_models import write_diffusers_model

    return write_diffusers_model(folder, TINY_CONFIGS[family], seed)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict:
    """{"v1": folder, "v2": folder}: SD1-style and SD2-style (v-prediction, linear projections) models."""
    root = tmp_path_factory.mktemp("models")
    return {family: write_model_with_diffusers(root / family, family) for family in ("v1", "v2")}


@pytest.fixture(scope="session")
def xl_model_dirs(tmp_path_factory) -> dict:
    """{"xl_base": folder, "xl_refiner": folder}: SDXL-style base (two text towers, sizes and crop as
    micro-conditioning) and refiner (the second tower only, aesthetic score) models."""
    root = tmp_path_factory.mktemp("xl-models")
    return {family: write_model_with_diffusers(root / family, family) for family in ("xl_base", "xl_refiner")}


def diffusers_images(pipe, images, prompts, seeds, **kwargs) -> np.ndarray:
    """diffusers' img2img as every parity test calls it: one seeded CPU generator per row, np output."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return pipe(image=images, prompt=prompts, generator=generators, output_type="np", **kwargs).images


def make_images(count: int, width: int = 64, height: int = 48, seed: int = 0) -> list[PIL.Image.Image]:
    """Distinct random RGB images."""
    g = torch.Generator().manual_seed(seed)
    arrays = (torch.rand(count, height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    return [PIL.Image.fromarray(a) for a in arrays]


@pytest.fixture(scope="session")
def s3_server():
    """A real SeaweedFS S3 server for the whole session, on free loopback ports."""
    from tests.s3_services import SeaweedServer

    with SeaweedServer() as server:
        yield server


class StoreUnderTest:
    """A Storage and a fresh root URI on one backend; tests written against it run on every backend."""

    def __init__(self, backend: str, storage, root: str):
        self.backend, self.storage, self.root = backend, storage, root

    def __repr__(self) -> str:
        return f"StoreUnderTest({self.backend}, {self.root})"


def s3_store(server, monkeypatch, endpoint_url: str | None = None, retry=None) -> StoreUnderTest:
    """A Storage on `server` (or on a proxy of it at `endpoint_url`) with a unique prefix."""
    import uuid

    from connectors.storage import RetryPolicy, Storage, StorageOptions

    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    options = StorageOptions(endpoint_url=endpoint_url or server.endpoint_url, retry=retry or RetryPolicy())
    return StoreUnderTest("s3", Storage(options), f"s3://{server.bucket}/{uuid.uuid4().hex}")


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch) -> StoreUnderTest:
    """The same test body on local disk and on the real S3 server."""
    from connectors.storage import Storage

    if request.param == "local":
        return StoreUnderTest("local", Storage(), str(tmp_path / "store"))
    return s3_store(request.getfixturevalue("s3_server"), monkeypatch)


@pytest.fixture(scope="session")
def ray_cluster(s3_server, tmp_path_factory):
    """A real `ray start --head` cluster whose workers hold the S3 test server's credentials."""
    from tests.ray_services import POISON_PROMPT, RayCluster

    env = {
        **s3_server.env(),
        "SDBATCH_TEST_POISON_PROMPT": POISON_PROMPT,
        "SDBATCH_CACHE_DIR": str(tmp_path_factory.mktemp("model-cache")),
    }
    with RayCluster(env) as cluster:
        yield cluster
        import ray

        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture
def ray_driver(ray_cluster, monkeypatch):
    """This process as a Ray driver on the test cluster (connected once per session), with the
    cluster's environment, so the job's driver code can run in-process."""
    import logging

    import ray

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "SDBATCH_CACHE_DIR"):
        monkeypatch.setenv(name, ray_cluster.env[name])
    # pytest's log capture keeps Ray's error records, and their tracebacks keep the actor handles of a
    # finished pass alive, so its actors would hold the cluster's CPUs into the next test. Ray's own
    # handlers still print them.
    monkeypatch.setattr(logging.getLogger("ray"), "propagate", False)
    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, log_to_driver=False)
    return ray_cluster
