"""Sizing the denoise actor pool from what the Ray cluster has, before any work starts.

`compute.device: auto` with `gpus_per_actor` unset asks for a GPU per actor only when the cluster has
GPUs (now, or in a node group its autoscaler can add); on a CPU-only cluster the actors run on CPUs. With
`actors_max` unset the pool autoscales up to every GPU the cluster offers (CPU-only: its CPUs, one per
node kept for the read, decode and write tasks). A request no node could ever hold is refused here,
naming what was asked and what the cluster has, instead of waiting forever for Ray to schedule it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from jobs.config import ComputeConfig

log = logging.getLogger("sdbatch")

IO_CPUS_PER_NODE = 1  # CPUs a node keeps for read/decode/write tasks when CPU actors fill it
UNBOUNDED_GROUP_NODES = 64  # nodes counted for an autoscaler node group without a maximum


class ResourceError(ValueError):
    """The actor pool can never start on this cluster: the message says what was asked and what exists."""


@dataclass(frozen=True)
class NodeShape:
    """Nodes of one size: `count` of them alive now, or at most `count` for an autoscaler node group."""

    cpus: float
    gpus: float
    count: int = 1


@dataclass(frozen=True)
class ClusterView:
    """What the actors could run on: the alive nodes, and the node groups the autoscaler may add."""

    where: str  # "the Ray cluster at 10.0.0.1:6379", "this machine (a local Ray instance)"
    nodes: tuple[NodeShape, ...]
    scalable: tuple[NodeShape, ...] = ()  # () = a fixed cluster

    @property
    def shapes(self) -> tuple[NodeShape, ...]:
        return self.nodes + self.scalable

    @property
    def has_gpus(self) -> bool:
        return any(shape.gpus >= 1 for shape in self.shapes)

    def describe(self) -> str:
        cpus = sum(node.cpus * node.count for node in self.nodes)
        gpus = sum(node.gpus * node.count for node in self.nodes)
        count = sum(node.count for node in self.nodes)
        text = f"{where_nodes(count)}, {_number(cpus)} CPUs, {_number(gpus)} GPUs now"
        if self.scalable:
            groups = "; ".join(
                f"up to {group.count} x ({_number(group.cpus)} CPUs, {_number(group.gpus)} GPUs)"
                for group in self.scalable
            )
            text += f"; the autoscaler may add {groups}"
        return f"{self.where}: {text}"


@dataclass(frozen=True)
class ActorPool:
    """The resolved pool: how many actors of what size, and the sentence saying why."""

    compute: ComputeConfig  # gpus_per_actor and actors_max filled in
    capacity: int  # actors the cluster could hold at its largest
    reason: str

    def describe(self) -> str:
        compute = self.compute
        kind = "GPU" if compute.gpus_per_actor > 0 else "CPU"
        count = (
            str(compute.actors_min)
            if compute.actors_min == compute.actors_max
            else f"{compute.actors_min} to {compute.actors_max} (autoscaling)"
        )
        plural = "" if compute.actors_max == 1 else "s"
        size = _request(compute.gpus_per_actor, compute.cpus_per_actor)
        return f"actors    {count} {kind} actor{plural} of {size} each: {self.reason}"


def size_actor_pool(compute: ComputeConfig, cluster: ClusterView) -> ActorPool:
    """Resolve `gpus_per_actor` and `actors_max` for this cluster; ResourceError if it can never run."""
    gpus, why_kind = _gpus_per_actor(compute, cluster)
    cpus = compute.cpus_per_actor
    per_node = _gpu_actors_on if gpus > 0 else _cpu_actors_on
    now = sum(per_node(node, gpus, cpus) * node.count for node in cluster.nodes)
    possible = sum(per_node(group, gpus, cpus) * group.count for group in cluster.scalable)
    capacity = max(now, possible)
    if capacity == 0:
        raise ResourceError(_no_node_message(gpus, cpus, cluster))
    if compute.actors_min > capacity:
        raise ResourceError(
            f"compute.actors_min is {compute.actors_min}, but {cluster.describe()}, which holds at most "
            f"{capacity} actors of {_request(gpus, cpus)}. Lower compute.actors_min (or --actors), or add "
            "nodes to the cluster"
        )
    if compute.actors_max is None:
        actors_max = max(compute.actors_min, capacity)
        kept = f"{IO_CPUS_PER_NODE} per node kept for reading/writing"
        offers = "every GPU" if gpus > 0 else f"its CPUs, {kept}"
        why_count = f"{capacity} at most: {offers}"
    else:
        actors_max = compute.actors_max
        why_count = f"actors_max {actors_max} as configured"
        if actors_max > capacity:
            why_count += f" (the cluster holds at most {capacity}: the rest will never start)"
    resolved = dataclasses.replace(compute, gpus_per_actor=gpus, actors_max=actors_max)
    return ActorPool(resolved, capacity, f"{why_kind}; {why_count}. {cluster.describe()}")


def _gpus_per_actor(compute: ComputeConfig, cluster: ClusterView) -> tuple[float, str]:
    if compute.gpus_per_actor is not None:
        return compute.gpus_per_actor, f"gpus_per_actor {_number(compute.gpus_per_actor)} as configured"
    if compute.device == "cpu":
        return 0.0, "device cpu"
    if compute.device == "cuda":
        return 1.0, "device cuda: one GPU per actor"
    if cluster.has_gpus:
        return 1.0, "device auto and the cluster has GPUs: one GPU per actor"
    return 0.0, "device auto and the cluster has no GPU: the actors run on CPUs"


def _gpu_actors_on(node: NodeShape, gpus: float, cpus: float) -> int:
    by_gpu = math.floor(node.gpus / gpus + 1e-9)
    return by_gpu if cpus <= 0 else min(by_gpu, math.floor(node.cpus / cpus + 1e-9))


def _cpu_actors_on(node: NodeShape, gpus: float, cpus: float) -> int:
    """CPU actors on a node, leaving IO_CPUS_PER_NODE for the other stages where one actor still fits."""
    per_actor = cpus if cpus > 0 else 1.0
    if node.cpus < per_actor:
        return 0
    spare = node.cpus - IO_CPUS_PER_NODE
    return max(1, math.floor(spare / per_actor + 1e-9))


def _no_node_message(gpus: float, cpus: float, cluster: ClusterView) -> str:
    largest_gpus = max((shape.gpus for shape in cluster.shapes), default=0)
    largest_cpus = max((shape.cpus for shape in cluster.shapes), default=0)
    if gpus > 0 and largest_gpus == 0:
        fix = "set compute.gpus_per_actor: 0 (or leave it unset with device: auto) to run on CPUs"
        found = "no node has a GPU"
    elif gpus > largest_gpus:
        fix = f"lower compute.gpus_per_actor to at most {_number(largest_gpus)}"
        found = f"no node has more than {_number(largest_gpus)} GPUs"
    else:
        fix = f"lower compute.cpus_per_actor to at most {_number(largest_cpus)}"
        found = f"no node has more than {_number(largest_cpus)} CPUs"
    return (
        f"each actor asks for {_request(gpus, cpus)}, which no node can ever hold: {found} "
        f"({cluster.describe()}). {fix[0].upper()}{fix[1:]}, or run on a cluster with such nodes"
    )


def _request(gpus: float, cpus: float) -> str:
    return f"{_number(gpus)} GPU + {_number(cpus)} CPU" if gpus > 0 else f"{_number(cpus)} CPU"


def _number(value: float) -> str:
    return f"{value:g}"


def where_nodes(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


# -- reading the cluster ------------------------------------------------------------------------------


def ray_cluster_view(ray: Any) -> ClusterView:
    """The connected cluster: alive nodes from `ray.nodes()`, node groups from the autoscaler's config."""
    nodes = tuple(
        NodeShape(node["Resources"].get("CPU", 0.0), node["Resources"].get("GPU", 0.0))
        for node in ray.nodes()
        if node.get("Alive")
    )
    address = ray.get_runtime_context().gcs_address
    return ClusterView(f"the Ray cluster at {address}", _merge(nodes), _scalable_groups())


def _scalable_groups() -> tuple[NodeShape, ...]:
    """Node groups an autoscaler (KubeRay, `ray up`) can still grow, as Ray Data and Train read them."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an internal API: without it the cluster counts as fixed
        return ()
    if not config:
        return ()
    groups = []
    for group in config.node_group_configs:
        growable = group.max_count == -1 or group.max_count > group.min_count
        if not group.resources or group.max_count == 0 or not growable:
            continue
        count = UNBOUNDED_GROUP_NODES if group.max_count == -1 else group.max_count
        groups.append(NodeShape(group.resources.get("CPU", 0), group.resources.get("GPU", 0), count))
    return tuple(groups)


def local_machine_view() -> ClusterView:
    """What `ray.init()` without an address would start with here (the dry run's view without a cluster)."""
    cpus = float(os.cpu_count() or 1)
    gpus = 0.0
    try:
        import ray._private.utils
        from ray._private.accelerators import get_accelerator_manager_for_resource

        cpus = float(ray._private.utils.get_num_cpus())
        manager = get_accelerator_manager_for_resource("GPU")
        gpus = float(manager.get_current_node_num_accelerators())
        visible = manager.get_current_process_visible_accelerator_ids()
        if visible is not None:
            gpus = min(gpus, float(len(visible)))
    except Exception:  # noqa: BLE001 - internal helpers: fall back to the CPU count alone
        pass
    return ClusterView("this machine (a local Ray instance)", (NodeShape(cpus, gpus),))


def _merge(nodes: Sequence[NodeShape]) -> tuple[NodeShape, ...]:
    counts: dict[tuple[float, float], int] = {}
    for node in nodes:
        counts[(node.cpus, node.gpus)] = counts.get((node.cpus, node.gpus), 0) + node.count
    return tuple(NodeShape(cpus, gpus, count) for (cpus, gpus), count in counts.items())


# -- while the pool waits ------------------------------------------------------------------------------


class ResourceWait:
    """Logs, every `every_s` while no actor of the pass has started, what the pool waits for and what the
    cluster has free: a pool whose GPUs are taken by other jobs says so instead of sitting silent."""

    def __init__(
        self, started: Callable[[], bool], available: Callable[[], dict], pool: ActorPool, every_s: float
    ) -> None:
        self._started, self._available, self._pool, self._every_s = started, available, pool, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sdbatch-resource-wait", daemon=True)

    def __enter__(self) -> ResourceWait:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self._every_s):
            try:
                if self._started():
                    return
                free = self._available()
            except Exception:  # noqa: BLE001 - a report: never fail or hang the pass
                continue
            compute = self._pool.compute
            log.info(
                "waiting for resources: no actor has started yet; each needs %s; free now: %s CPUs, %s GPUs "
                "(an actor also waits here while it loads the model)",
                _request(compute.gpus_per_actor, compute.cpus_per_actor),
                _number(free.get("CPU", 0.0)),
                _number(free.get("GPU", 0.0)),
            )
