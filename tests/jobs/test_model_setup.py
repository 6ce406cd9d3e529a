"""The actor's warm-up call: tiny by default, the job's own batch shape when the UNet is compiled."""

from __future__ import annotations

import pytest

from jobs.config import RunConfig, from_dict
from jobs.model_setup import WARMUP_SIZE, resolve_device, warm_up_shape

BASE = {"manifest": "/in/m.parquet", "output": "/out/run", "model": {"path": "/models/sd15"}}


def config(compile_unet: bool, **defaults) -> RunConfig:
    data = {**BASE, "model": {**BASE["model"], "compile": compile_unet}, "defaults": defaults}
    return from_dict(RunConfig, {**data, "compute": {"batch_size": 6}})


@pytest.mark.parametrize(
    ("compile_unet", "defaults", "expected"),
    [
        (False, {"width": 512, "height": 768}, (1, WARMUP_SIZE, WARMUP_SIZE)),  # eager: nothing to compile
        (True, {}, (1, WARMUP_SIZE, WARMUP_SIZE)),  # sizes come from the inputs: unknown until rows arrive
        (True, {"width": 512}, (1, WARMUP_SIZE, WARMUP_SIZE)),
        (True, {"width": 512, "height": 768}, (6, 768, 512)),
    ],
)
def test_warm_up_shape(compile_unet, defaults, expected):
    assert warm_up_shape(config(compile_unet, **defaults)) == expected


def test_an_actor_holding_a_gpu_that_torch_cannot_see_says_so_and_runs_on_the_cpu(caplog):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine's torch sees a GPU")
    with_gpu = from_dict(RunConfig, {**BASE, "compute": {"gpus_per_actor": 1}})
    with caplog.at_level("WARNING", logger="sdbatch"):
        assert resolve_device(with_gpu) == "cpu"
    assert "holds a GPU but torch" in caplog.text and "install a CUDA build of torch" in caplog.text
    caplog.clear()
    assert resolve_device(from_dict(RunConfig, {**BASE, "compute": {"gpus_per_actor": 0}})) == "cpu"
    assert not caplog.text
