"""Sizing the actor pool from the cluster: GPU actors only where GPUs exist, every GPU (or CPU) used by
default, requests no node can hold refused at once, a pool waiting for busy resources says so."""

from __future__ import annotations

import logging
import threading

import pyarrow as pa
import pytest

from jobs.config import ComputeConfig
from jobs.img2img import RunStats
from jobs.resources import ClusterView, NodeShape, ResourceError, local_machine_view, size_actor_pool
from jobs.write_stage import SUMMARY_SCHEMA

CPU_ONLY = ClusterView("a test cluster", (NodeShape(cpus=4, gpus=0),))
EIGHT_GPUS = ClusterView("a test cluster", (NodeShape(cpus=64, gpus=8),))
HEAD_PLUS_GPU_GROUP = ClusterView(  # KubeRay / `ray up`: a CPU head now, GPU workers added on demand
    "a test cluster", (NodeShape(cpus=0, gpus=0),), scalable=(NodeShape(cpus=8, gpus=1, count=4),)
)


def test_auto_device_on_a_cpu_only_cluster_runs_cpu_actors_on_all_but_one_cpu():
    pool = size_actor_pool(ComputeConfig(), CPU_ONLY)
    assert pool.compute.gpus_per_actor == 0 and pool.compute.actors_max == 3
    line = pool.describe()
    assert "the cluster has no GPU" in line and "1 to 3 (autoscaling) CPU actors" in line


def test_auto_device_with_gpus_autoscales_to_every_gpu():
    pool = size_actor_pool(ComputeConfig(), EIGHT_GPUS)
    assert (pool.compute.gpus_per_actor, pool.compute.actors_min, pool.compute.actors_max) == (1, 1, 8)
    assert "GPU actors of 1 GPU + 1 CPU each" in pool.describe()


def test_gpus_on_several_nodes_are_all_counted_and_cpus_bound_each_node():
    cluster = ClusterView("c", (NodeShape(cpus=16, gpus=4, count=2), NodeShape(cpus=2, gpus=4)))
    assert size_actor_pool(ComputeConfig(), cluster).compute.actors_max == 4 + 4 + 2


def test_gpu_node_groups_the_autoscaler_can_add_count_before_they_exist():
    pool = size_actor_pool(ComputeConfig(), HEAD_PLUS_GPU_GROUP)
    assert pool.compute.gpus_per_actor == 1 and pool.compute.actors_max == 4
    assert "the autoscaler may add up to 4 x (8 CPUs, 1 GPUs)" in pool.describe()


def test_configured_sizes_are_kept():
    compute = ComputeConfig(actors_min=2, actors_max=2, gpus_per_actor=0.5)
    pool = size_actor_pool(compute, EIGHT_GPUS)
    assert (pool.compute.actors_min, pool.compute.actors_max, pool.compute.gpus_per_actor) == (2, 2, 0.5)
    assert pool.describe().startswith("actors    2 GPU actors of 0.5 GPU + 1 CPU each")


def test_device_cpu_on_a_gpu_cluster_runs_cpu_actors():
    pool = size_actor_pool(ComputeConfig(device="cpu"), EIGHT_GPUS)
    assert pool.compute.gpus_per_actor == 0 and pool.compute.actors_max == 63


@pytest.mark.parametrize(
    ("compute", "cluster", "message"),
    [
        (ComputeConfig(gpus_per_actor=2), CPU_ONLY, "each actor asks for 2 GPU + 1 CPU, which no node can "
         "ever hold: no node has a GPU (a test cluster: 1 node, 4 CPUs, 0 GPUs now). Set "
         "compute.gpus_per_actor: 0"),
        (ComputeConfig(device="cuda"), CPU_ONLY, "no node has a GPU"),
        (ComputeConfig(gpus_per_actor=2), ClusterView("c", (NodeShape(8, 1),)),
         "no node has more than 1 GPUs (c: 1 node, 8 CPUs, 1 GPUs now). Lower compute.gpus_per_actor to at "
         "most 1"),
        (ComputeConfig(cpus_per_actor=8), CPU_ONLY, "lower compute.cpus_per_actor to at most 4"),
        (ComputeConfig(actors_min=9), EIGHT_GPUS, "compute.actors_min is 9, but a test cluster: 1 node, "
         "64 CPUs, 8 GPUs now, which holds at most 8 actors of 1 GPU + 1 CPU"),
    ],
)  # fmt: skip
def test_requests_no_node_can_hold_are_refused_with_what_was_asked_and_what_exists(compute, cluster, message):
    with pytest.raises(ResourceError) as error:
        size_actor_pool(compute, cluster)
    assert message.lower() in str(error.value).lower()


def test_local_machine_view_counts_this_machines_cpus():
    view = local_machine_view()
    assert view.nodes[0].cpus >= 1 and view.where.startswith("this machine")


def summaries(rows: list[tuple[str, bool]]) -> pa.Table:
    return pa.Table.from_pylist(
        [
            {"id": row_id, "variant": 0, "ok": ok, "retryable": not ok, "core_batch_rows": 1,
             "core_encoded_images": 1, "decode_ms": 0.0, "denoise_ms": 0.0, "write_ms": 0.0,
             "actor_id": "a", "actor_start_s": 1.0}
            for row_id, ok in rows
        ],
        schema=SUMMARY_SCHEMA,
    )  # fmt: skip


def test_retry_rounds_count_each_row_once():
    stats = RunStats()
    stats.add(summaries([("a", True), ("b", False), ("c", False)]))  # main pass: d's worker died
    assert (stats.processed, stats.errors) == (3, 2)
    counted = pa.array(["b\x000", "c\x000"])  # the retry round's rows already counted as errors
    stats.add(summaries([("b", True), ("c", False), ("d", True)]), counted)
    assert (stats.processed, stats.errors) == (4, 1)  # b turned into an image, d is new, c is still an error


@pytest.mark.slow
def test_a_pool_waiting_for_busy_cpus_logs_what_it_waits_for(ray_driver, model_dirs, tmp_path, caplog):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from connectors.storage import Storage
    from jobs.config import load_config
    from jobs.img2img import run_command
    from tests.jobs.test_img2img import write_dataset

    manifest = write_dataset(Storage(), str(tmp_path / "data"), [(64, 64)] * 2)
    flags = {
        "model.path": str(model_dirs["v1"]), "manifest": manifest, "output": str(tmp_path / "out"),
        "defaults.num_inference_steps": 2, "compute.actors_max": 1, "log_every_s": 1.0,
    }  # fmt: skip
    busy = placement_group([{"CPU": ray.available_resources().get("CPU", 0)}])  # another job holds them
    ray.get(busy.ready(), timeout=60)
    release = threading.Timer(4.0, remove_placement_group, args=(busy,))
    release.start()
    try:
        with caplog.at_level(logging.INFO, logger="sdbatch"):
            code = run_command(lambda: load_config(None, flags=flags), dry_run=False)
    finally:
        release.cancel()
        release.join()
    remove_placement_group(busy)  # idempotent: the timer removed it already
    assert code == 0
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for resources")]
    assert waits and "each needs 1 CPU; free now: 0 CPUs, 0 GPUs" in waits[0], waits
