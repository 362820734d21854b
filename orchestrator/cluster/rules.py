"""What a run must satisfy on a Ray cluster: which cluster it joins, and where its files live.

A run joins a cluster when ``scaling.ray_address`` is set, or when it is the entrypoint of a Ray
Job (Ray sets ``RAY_ADDRESS`` for it). Such a run spans several nodes when, at the moment the
driver has connected,

- the cluster has more than one alive node, or
- the driver's node lacks the CPUs or GPUs for all training workers, so that other nodes, present
  or still to be added by the autoscaler, must host them.

A run that spans several nodes may not use local paths for ``run.storage`` or ``data.source``
(nor ``data.source=builtin``, which is written to the driver's disk): the workers on other nodes
would read and write their own disks. Object storage is the fix; a filesystem mounted at the
same path on every node (NFS, EFS, Lustre) is declared with ``scaling.shared_filesystem=true``.
A single-node cluster (a workstation's ``ray start --head``) may use local paths.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from orchestrator.config import ConfigError, TrainConfig
from orchestrator.plan import Plan
from orchestrator.storage import parse_uri


def with_job_address(cfg: TrainConfig) -> TrainConfig:
    """Inside a Ray Job the entrypoint joins the job's cluster even when the spec names none:
    ``ray.init`` would connect to ``RAY_ADDRESS`` anyway, and starting a local Ray there fails."""
    address = os.environ.get("RAY_ADDRESS", "")
    # An http(s) RAY_ADDRESS is a Jobs API address set for `ray job ...` commands, not a cluster
    # this process runs in (Ray Jobs sets the GCS address, host:port).
    if cfg.scaling.ray_address is not None or not address or address.startswith(("http://", "https://")):
        return cfg
    return cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"ray_address": "auto"})})


def local_paths(cfg: TrainConfig) -> list[tuple[str, str]]:
    """``(key, value)`` of every path in ``cfg`` that names this machine's disk."""
    found = []
    if cfg.data.source == "builtin" or not parse_uri(cfg.data.source).is_s3:
        found.append(("data.source", cfg.data.source))
    if not parse_uri(cfg.run.storage).is_s3:
        found.append(("run.storage", cfg.run.storage))
    return found


def multi_node_reason(nodes: Iterable[dict[str, Any]], driver_node_id: str, plan: Plan) -> str | None:
    """Why a run with ``plan`` spans several nodes of a cluster whose nodes are ``nodes`` (as
    ``ray.nodes()`` lists them), or None when it all runs on the driver's node."""
    alive = [n for n in nodes if n.get("Alive")]
    if len(alive) > 1:
        return f"the cluster has {len(alive)} nodes"
    driver = next((n for n in alive if n.get("NodeID") == driver_node_id), None)
    have = (driver or {}).get("Resources", {})
    need_cpu = plan.num_workers * plan.cpus_per_worker
    need_gpu = plan.num_workers * plan.gpus_per_worker
    if have.get("CPU", 0) < need_cpu or have.get("GPU", 0) < need_gpu:
        return (f"the driver's node has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs, and "
                f"{plan.num_workers} workers need {need_cpu:g} CPUs and {need_gpu:g} GPUs: other nodes "
                "(or nodes the autoscaler adds) will host them")
    return None


def check_cluster_paths(cfg: TrainConfig, plan: Plan) -> None:
    """Refuse local paths for a run that spans several nodes (see the module docstring).
    Call after connecting to the cluster, with the config as the user gave it."""
    if cfg.scaling.ray_address is None or cfg.scaling.shared_filesystem:
        return
    paths = local_paths(cfg)
    if not paths:
        return
    import ray

    reason = multi_node_reason(ray.nodes(), ray.get_runtime_context().get_node_id(), plan)
    if reason is None:
        return
    lines = []
    for key, value in paths:
        if value == "builtin":
            lines.append("data.source=builtin is written to the driver's disk. Fix: `raydiff data make-demo DIR`, "
                         "`raydiff data upload DIR s3://BUCKET/demo`, then data.source=s3://BUCKET/demo")
        else:
            lines.append(f"{key}={value!r} is a local path. Fix: {key}=s3://BUCKET/... (object storage)")
    raise ConfigError(
        f"this run spans several nodes ({reason}), and workers on other nodes cannot use this "
        "machine's disk:\n  " + "\n  ".join(lines)
        + "\n  (or scaling.shared_filesystem=true if these paths are one filesystem mounted on every node: NFS, EFS, Lustre)"
    )
