"""What the Ray cluster holds now, and what it can grow to.

`ray.cluster_resources()` counts live nodes only. The shipped cloud clusters start with a
head that offers no CPUs and zero workers, and their autoscaler adds workers when trials
wait for room: judged by the live nodes, no trial could ever start. So a sweep looks for
the node types the cluster's autoscaler may add, in what Ray 2.60 lets a driver see:

1. The cluster config in the GCS (`ray._private.state.state.get_cluster_config()`: node
   groups with their resources and max counts; what Ray Train and Ray Data read). Ray 2.60's
   own autoscalers do not report it (later v2 autoscalers do), so usually it is empty.
2. The autoscaler's own config file, when this driver runs on the head (as `ray job submit`
   entrypoints do): the head's monitor process is started with `--autoscaling-config=FILE`
   (`ray up` clusters: `~/ray_bootstrap_config.yaml`). A node type whose `resources` are
   left empty there is sized by the cloud provider at launch: its size is unknown here.
3. The v1 autoscaler's status in the GCS (the one `ray status` reads) naming node types
   of its own (KubeRay's groups; a cluster without an autoscaler config has only
   `node_<id>` mirrors of its live nodes): the cluster can grow, by node types this driver
   cannot see.

Otherwise the cluster is fixed: what is live is all there will be.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from organtrain.console import notice

log = logging.getLogger(__name__)

HEAD_MARKER = "node:__internal_head__"  # a resource only the head node has
_MONITORS = ("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")
_EPSILON = 1e-9  # resource amounts are floats (fractional GPUs)


@dataclass(frozen=True)
class NodeType:
    """A kind of node an autoscaler may add."""

    name: str
    # What one node offers (CPU, GPU, ...); None: not known to this driver (the cloud
    # provider fills it in from the instance type at launch).
    resources: Mapping[str, float] | None
    max_count: int | None  # the most nodes of this type; None: no limit


@dataclass(frozen=True)
class Cluster:
    """The live nodes (their total resources) and what the cluster may add to them."""

    nodes: tuple[Mapping[str, float], ...]
    node_types: tuple[NodeType, ...] = ()  # empty and growable: types not visible here
    growable: bool = False
    source: str = ""  # where the node types were read, for messages
    max_workers: int | None = None  # the autoscaler's limit on all workers; None: none


# --- arithmetic on plain numbers --------------------------------------------------------


def trial_bundle(cpus: float, gpus: float) -> dict[str, float]:
    """One trial's request as Ray resources (zero amounts left out, as Ray expects)."""
    return {name: float(amount) for name, amount in (("CPU", cpus), ("GPU", gpus)) if amount}


def node_slots(resources: Mapping[str, float], cpus: float, gpus: float) -> int:
    """How many trials fit side by side on one node: a trial never spans nodes."""
    slots = math.floor(resources.get("CPU", 0) / cpus + _EPSILON)
    if gpus:
        slots = min(slots, math.floor(resources.get("GPU", 0) / gpus + _EPSILON))
    return max(0, slots)


def slots_now(cluster: Cluster, cpus: float, gpus: float) -> int:
    return sum(node_slots(node, cpus, gpus) for node in cluster.nodes)


def slots_at_most(cluster: Cluster, cpus: float, gpus: float) -> int | None:
    """The most trials the cluster can run at once, once grown as far as it may; None
    when this driver knows no bound (a node type without a limit or of unknown size)."""
    if not cluster.growable:
        return slots_now(cluster, cpus, gpus)
    if not cluster.node_types or any(t.resources is None for t in cluster.node_types):
        return None
    # Every worker comes from a node type; the head stays as it is. Within the
    # autoscaler's limit on all workers, the node types holding the most trials first.
    head = sum(node_slots(n, cpus, gpus) for n in cluster.nodes if HEAD_MARKER in n)
    left = math.inf if cluster.max_workers is None else cluster.max_workers
    grown = head
    by_size = sorted(cluster.node_types, key=lambda t: -node_slots(t.resources, cpus, gpus))
    for node_type in by_size:
        per_node = node_slots(node_type.resources, cpus, gpus)
        if not per_node:
            continue  # holds no trial (a CPU node for GPU trials): adds nothing
        count = min(left, math.inf if node_type.max_count is None else node_type.max_count)
        if count == math.inf:
            return None
        grown += int(count) * per_node
        left -= count
    return max(grown, slots_now(cluster, cpus, gpus))


def share_per_organ(slots: int | None, organs: int) -> int | None:
    """Each organ's cap on trials at once: an equal share of the slots, at least one.
    None (no bound known): no cap."""
    if slots is None:
        return None
    return max(1, math.ceil(slots / max(1, organs)))


def fits(resources: Mapping[str, float], cpus: float, gpus: float) -> bool:
    return node_slots(resources, cpus, gpus) >= 1


def never_fits(cluster: Cluster, cpus: float, gpus: float) -> bool:
    """True only when no live node holds a trial and no node the cluster may add could:
    a node type of unknown size, or node types not visible here, may."""
    if any(fits(node, cpus, gpus) for node in cluster.nodes):
        return False
    if not cluster.growable:
        return True
    if not cluster.node_types or any(t.resources is None for t in cluster.node_types):
        return False
    return not any(fits(t.resources, cpus, gpus) for t in cluster.node_types)


def describe_node_types(cluster: Cluster) -> str:
    parts = []
    for node_type in cluster.node_types:
        known = node_type.resources is not None
        size = _amounts(node_type.resources) if known else "size set at launch"
        most = "no limit" if node_type.max_count is None else f"up to {node_type.max_count}"
        parts.append(f"{node_type.name} ({size}; {most})")
    return ", ".join(parts)


def describe_nodes(nodes: tuple[Mapping[str, float], ...]) -> str:
    if not nodes:
        return "no live node"
    largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
    return f"{len(nodes)} live node(s), the largest with {_amounts(largest)}"


def _amounts(resources: Mapping[str, float]) -> str:
    text = f"{resources.get('CPU', 0):g} CPU"
    return text + (f", {resources['GPU']:g} GPU" if resources.get("GPU") else "")


# --- what a connected driver can learn from Ray ------------------------------------------


def discover() -> Cluster:
    """The cluster this process's Ray is connected to (ray.init already called)."""
    nodes = live_nodes()
    found = _from_gcs_cluster_config(nodes) or _from_autoscaler_config_file(nodes)
    if found is not None:
        return found
    report = _autoscaler_report()
    if report is not None and _names_node_types_of_its_own(report):
        return Cluster(nodes, growable=True, source="the Ray autoscaler's status")
    return Cluster(nodes)


def live_nodes() -> tuple[dict[str, float], ...]:
    import ray

    return tuple(dict(node["Resources"]) for node in ray.nodes() if node["Alive"])


def _from_gcs_cluster_config(nodes) -> Cluster | None:
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    head = next((n for n in nodes if HEAD_MARKER in n), {})
    types = []
    for group in config.node_group_configs:
        resources = {name: float(amount) for name, amount in group.resources.items()}
        if group.max_count == 0 or not resources:
            continue
        # The head's own group (Ray Data's rule): one node, shaped like the live head.
        if group.max_count == 1 and _same_shape(resources, head):
            continue
        max_count = None if group.max_count < 0 else int(group.max_count)
        types.append(NodeType(group.name, resources, max_count))
    return Cluster(nodes, tuple(types), bool(types), "the cluster config in Ray's GCS")


def _from_autoscaler_config_file(nodes) -> Cluster | None:
    path = _autoscaler_config_path()
    if path is None:
        return None
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        log.debug("cannot read the autoscaler's config %s: %s", path, err)
        return None
    head_type = config.get("head_node_type")
    cluster_max = config.get("max_workers")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head_type:
            continue
        spec = spec or {}
        max_count = spec.get("max_workers", cluster_max)
        if max_count == 0:
            continue
        declared = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        resources = declared if "CPU" in declared else None
        types.append(NodeType(name, resources, None if max_count is None else int(max_count)))
    growable = bool(types) and cluster_max != 0
    source = f"the autoscaler's config {path}"
    return Cluster(nodes, tuple(types), growable, source, cluster_max)


def _autoscaler_config_path() -> Path | None:
    """The config file of this cluster's autoscaler, from its monitor's command line
    (visible when this driver runs on the head node)."""
    import ray

    port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[-1]
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(arg.endswith(_MONITORS) for arg in args[:3]):
            continue
        options = dict(arg[2:].split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)
        if options.get("gcs-address", "").rsplit(":", 1)[-1] != port:
            continue
        if "autoscaling-config" not in options:
            return None  # this cluster's autoscaler has no config: nothing to add
        path = Path(options["autoscaling-config"]).expanduser()
        if not path.is_absolute():
            try:
                path = Path(os.readlink(entry / "cwd")) / path
            except OSError:
                return None
        return path
    return None


def _autoscaler_report() -> dict | None:
    """The v1 autoscaler's last status summary (what `ray status` shows), if any."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        return json.loads(status).get("autoscaler_report") if status else None
    except Exception as err:  # a status this driver cannot read only costs the details
        log.debug("no autoscaler status: %s", err)
        return None


def _names_node_types_of_its_own(report: dict) -> bool:
    """Without a config, Ray's read-only autoscaler calls each live node `node_<id>`."""
    mapping = report.get("node_type_mapping") or {}
    return any(kind != f"node_{node}" for node, kind in mapping.items())


def _same_shape(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    return all(abs(a.get(k, 0) - b.get(k, 0)) < _EPSILON for k in ("CPU", "GPU"))


# --- waiting for the autoscaler ----------------------------------------------------------


def wait_for_room(
    cluster: Cluster, cpus: float, gpus: float, trials: int, *, every: float = 15.0
) -> None:
    """Ask the autoscaler for room for `trials` trials at once and wait until a live node
    holds one, saying what happens meanwhile. The request is withdrawn once there is room
    (or on any exit): from then on the sweep's pending trials drive the autoscaler, and a
    standing request would keep the cluster large after the sweep ends."""
    from ray.autoscaler.sdk import request_resources

    bundle = trial_bundle(cpus, gpus)
    notice(  # the sweep waits, maybe minutes: say why without -v
        log,
        "waiting for the Ray autoscaler: no live node has room for a trial (%s) yet; "
        "asked for %d trial(s) at once; it can add %s",
        _amounts(bundle), trials, describe_node_types(cluster) or "node types not visible here",
    )  # fmt: skip
    request_resources(bundles=[bundle] * max(1, trials))
    started = last = time.monotonic()
    try:
        while True:
            nodes = live_nodes()
            if any(fits(node, cpus, gpus) for node in nodes):
                notice(
                    log,
                    "the Ray cluster has room for trials after %.0f s (%s)",
                    time.monotonic() - started, describe_nodes(nodes),
                )  # fmt: skip
                return
            if time.monotonic() - last >= every:
                last = time.monotonic()
                notice(
                    log,
                    "still waiting for the Ray autoscaler (%.0f s): %s%s",
                    last - started, describe_nodes(nodes), autoscaler_activity(),
                )  # fmt: skip
            time.sleep(1.0)
    finally:
        request_resources(bundles=[])


def autoscaler_activity() -> str:
    """The autoscaler's launches and failures, for a progress line ('' if none known)."""
    return describe_activity(_autoscaler_report() or {})


def describe_activity(report: dict) -> str:
    """'; launching 2 gpu; failed to start 1 gpu; ...' from the v1 autoscaler's summary
    (its pending_launches, pending_nodes, failed_nodes, node_availability_summary)."""
    launching = Counter(report.get("pending_launches") or {})
    launching.update(entry[1] for entry in report.get("pending_nodes") or [])
    failed = Counter(entry[1] for entry in report.get("failed_nodes") or [])
    availability = (report.get("node_availability_summary") or {}).get("node_availabilities")
    unavailable = [
        f"{kind}: {(record.get('unavailable_node_information') or {}).get('description', '?')}"
        for kind, record in (availability or {}).items()
        if not record.get("is_available", True)
    ]
    text = ""
    if launching:
        text += "; launching " + ", ".join(f"{n} {kind}" for kind, n in launching.items())
    if failed:
        text += "; failed to start " + ", ".join(f"{n} {kind}" for kind, n in failed.items())
    if unavailable:
        text += "; unavailable: " + "; ".join(unavailable)
    return text
