"""Scenario (b) of the chaos tests, run as its own process: the job on a three-node local cluster
(`ray.cluster_utils.Cluster`: a head without CPUs and two worker nodes), and a worker node that ran the
model removed, processes killed, once the first part is committed. Prints one JSON line with the result.

A separate process because the test process is already a driver of the suite's session cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time

import pyarrow.compute as pc

from connectors.output import OutputSink
from connectors.storage import Storage
from jobs.config import load_config
from jobs.img2img import run
from jobs.plan import make_plan

# Node death is noticed after health_check_period_ms x failure_threshold: seconds instead of the default ~30.
FAST_FAILURE_DETECTION = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}


def remove_a_model_node(cluster, workers: list, output: str, removed: dict) -> None:
    """Once a part is committed, remove (kill) the worker node whose actor wrote it."""
    sink = OutputSink(Storage(), output)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if sink.metadata_parts():
            actors = sink.read_part_tables(sink.metadata_parts()[:1], ["actor_id"])[0]["actor_id"]
            prefix = pc.unique(actors).to_pylist()[0].split("/")[0]
            for node in workers:
                if node.node_id.startswith(prefix):
                    removed.update(node_id=node.node_id, parts_before=len(sink.metadata_parts()))
                    cluster.remove_node(node, allow_graceful=False)
                    return
            removed["error"] = f"no worker node matches actor node prefix {prefix}"
            return
        time.sleep(0.1)
    removed["error"] = "no part was committed within 300 s"


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    parser = argparse.ArgumentParser()
    for flag in ("--model", "--manifest", "--output"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "_system_config": FAST_FAILURE_DETECTION},
    )
    workers = [cluster.add_node(num_cpus=3) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        config = load_config(
            None,
            flags={
                "model.path": args.model,
                "manifest": args.manifest,
                "output": args.output,
                "defaults.num_inference_steps": 40,
                "defaults.strength": 1.0,
                "compute.batch_size": 2,
                "compute.rows_per_call": 2,
                "compute.rows_per_part": 2,
                "compute.actors_min": 2,
                "compute.actors_max": 2,
                "compute.gpus_per_actor": 0,
                "contact_sheet_rows": 0,
            },
        )
        removed: dict = {}
        threading.Thread(
            target=remove_a_model_node, args=(cluster, workers, args.output, removed), daemon=True
        ).start()
        summary = run(make_plan(config))
        print("RESULT " + json.dumps({"exit_code": summary["exit_code"], "removed": removed}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
