"""cluster/: every config `ray up` takes validates against Ray's own autoscaler schema (as `ray up`
prepares it), and the KubeRay manifests name the ray.io/v1 kinds and fields they need."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config

from orchestrator.cluster.local_head import fake_cluster_config
from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _yamls() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(CLUSTER.glob("*.yaml"))}


def _launcher_configs() -> list[str]:
    return [n for n, docs in _yamls().items() if len(docs) == 1 and "provider" in docs[0]]


def _kuberay(kind: str) -> list[dict]:
    return [d for docs in _yamls().values() for d in docs if d.get("kind") == kind]


def test_every_yaml_in_cluster_is_a_launcher_config_or_a_kuberay_manifest():
    for name, docs in _yamls().items():
        assert docs, name
        for d in docs:
            assert "provider" in d or d.get("apiVersion") == "ray.io/v1", f"{name}: neither `ray up` config nor KubeRay"
    assert set(_launcher_configs()) == {"autoscaler-aws.yaml", "autoscaler-gcp.yaml"}


@pytest.mark.parametrize("name", ["autoscaler-aws.yaml", "autoscaler-gcp.yaml"])
def test_launcher_config_validates_against_rays_schema(name):
    raw = yaml.safe_load((CLUSTER / name).read_text())
    jsonschema.validate(raw, SCHEMA)  # as written
    validate_config(prepare_config(copy.deepcopy(raw)))  # as `ray up` fills defaults and checks it

    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"] == {"CPU": 0}  # a CPU head that trains nothing
    assert 0 < raw["idle_timeout_minutes"] <= 30
    workers = {k: v for k, v in types.items() if k != raw["head_node_type"]}
    assert all(0 == v["min_workers"] < v["max_workers"] for v in workers.values())
    assert sum(v["max_workers"] for v in workers.values()) >= raw["max_workers"] > 0

    # Spot types have an on-demand twin of the same machine with a lower priority (autoscaler v2
    # falls back to it when spot launches fail), and v2 is switched on.
    spot = {k: v for k, v in workers.items() if _is_spot(v["node_config"])}
    assert len(spot) >= 2
    for k, v in spot.items():
        twins = [w for w in workers.values() if not _is_spot(w["node_config"]) and _machine(w) == _machine(v)
                 and w.get("resources") == v.get("resources")]
        gpu = "GPU" in v.get("resources", {}) or _machine(v).startswith(("g5", "p4d", "p5"))
        if gpu:
            assert twins and all(w.get("priority", 0) < v["priority"] for w in twins), k
    assert any(_machine(v).startswith(("g5", "p4d", "p5", "a2-", "a3-")) for v in workers.values())
    head_cmd = " ".join(raw["head_start_ray_commands"])
    assert "RAY_enable_autoscaler_v2=1" in head_cmd

    # Token authentication on every node, with the token file shipped to them.
    for cmd in raw["head_start_ray_commands"][1:] + raw["worker_start_ray_commands"][1:]:
        assert re.search(r"RAY_AUTH_MODE=token (\S+=\S+ )*ray start", cmd), cmd
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # Setup installs this repository (synced by file_mounts) with its pinned dependencies.
    assert raw["file_mounts"]["~/raydiff"] == "."
    assert any("pip install" in c and "~/raydiff" in c for c in raw["setup_commands"])
    assert {".venv", ".git", "runs", ".gpu"} <= set(raw["rsync_exclude"])


def _is_spot(node_config: dict) -> bool:
    return (node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
            or node_config.get("scheduling", {}).get("provisioningModel") == "SPOT")


def _machine(node_type: dict) -> str:
    c = node_type["node_config"]
    return c.get("InstanceType") or c.get("machineType")


def test_gcp_node_types_declare_their_resources():
    raw = yaml.safe_load((CLUSTER / "autoscaler-gcp.yaml").read_text())
    for name, t in raw["available_node_types"].items():
        if name != raw["head_node_type"]:
            assert t["resources"].get("CPU", 0) > 0, name  # GCP does not report them to the autoscaler
    gpu_types = [t for t in raw["available_node_types"].values() if t["resources"].get("GPU")]
    assert {k for t in gpu_types for k in t["resources"] if k.startswith("accelerator_type:")} == {
        "accelerator_type:A100", "accelerator_type:H100"}


def test_fake_cluster_config_of_the_tests_validates_too():
    cfg = fake_cluster_config("127.0.0.1", 6379, {"cpu": {"resources": {"CPU": 1}, "max_workers": 3}})
    jsonschema.validate(cfg, SCHEMA)


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == "2.60.0", where
    assert spec["enableInTreeAutoscaling"] is True, where
    assert spec["authOptions"]["mode"] == "token", where
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0, where
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0", where
    groups = spec["workerGroupSpecs"]
    for g in [head, *groups]:
        # KubeRay's rayStartParams is a map of strings.
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), where
        (c,) = [c for c in g["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
        assert c["image"] and c["resources"]["limits"] == c["resources"]["requests"], where
    gpu = [g for g in groups if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu, f"{where}: no GPU worker group"
    for g in groups:
        assert g["groupName"] and 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] > 0, where


def test_kuberay_raycluster_autoscales_a_gpu_worker_group():
    (rc,) = _kuberay("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    _check_ray_cluster_spec(rc["spec"], "RayCluster")
    head_ports = {p["name"]: p["containerPort"] for p in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["dashboard"] == 8265  # Ray Jobs: kubectl port-forward svc/<name>-head-svc 8265


def test_kuberay_rayjob_runs_a_job_spec_that_the_image_holds():
    (job,) = _kuberay("RayJob")
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1"
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
    _check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob.rayClusterSpec")
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["raydiff", "train", "--config"]
    # The image (cluster/Dockerfile) copies the repository to this directory.
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    (target,) = re.findall(r"^COPY .* \. (\S+)$", dockerfile, flags=re.M)
    assert argv[3].startswith(target + "/")
    spec_path = ROOT / argv[3][len(target) + 1:]
    cfg = load_config(spec_path, argv[4:])
    assert cfg.scaling.ray_address == "auto" and cfg.run.storage.startswith("s3://")
    # One GPU group large enough for the spec's workers.
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["maxReplicas"]
               for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert gpus >= cfg.scaling.num_workers * cfg.scaling.gpus_per_worker
