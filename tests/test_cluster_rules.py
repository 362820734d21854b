"""The cluster rules without a cluster: when a run spans several nodes, which paths it may not
use, how `raydiff submit` builds a job and finds its token, and its one-line errors."""

from __future__ import annotations

import shlex
import sys
import types
from pathlib import Path

import pytest

from orchestrator.cluster import rules
from orchestrator.cluster.submit import UPLOAD_EXCLUDES, auth_token, build_submission, project_requirements
from orchestrator.cluster.local_head import free_port
from orchestrator.config import ConfigError, load_config
from orchestrator.plan import Plan

ROOT = Path(__file__).resolve().parents[1]


def _plan(workers: int, cpus: float, gpus: float = 0) -> Plan:
    return Plan(device="gpu" if gpus else "cpu", device_reason="", precision="fp32", precision_reason="",
                num_workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus, micro_batch_size=1,
                zero_stage=2, zero_reason="", autocast=False, mixed_reason="")


def _node(node_id: str, cpu: float, gpu: float = 0, alive: bool = True) -> dict:
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": cpu, "GPU": gpu}}


def test_multi_node_reason():
    one = [_node("h", 4), _node("gone", 8, alive=False)]
    assert rules.multi_node_reason(one, "h", _plan(2, 0.5)) is None  # fits the driver's node
    assert "has 2 nodes" in rules.multi_node_reason([_node("h", 4), _node("w", 4)], "h", _plan(1, 1))
    why = rules.multi_node_reason([_node("h", 0)], "h", _plan(2, 1))
    assert why.startswith("the driver's node has 0 CPUs and 0 GPUs, and 2 workers need 2 CPUs and 0 GPUs")
    assert "need 8 CPUs and 4 GPUs" in rules.multi_node_reason([_node("h", 16)], "h", _plan(4, 2, 1))


def test_local_paths_and_the_job_address(monkeypatch):
    cfg = load_config(None, ["run.storage=/data/runs", "data.source=builtin"])
    assert rules.local_paths(cfg) == [("data.source", "builtin"), ("run.storage", "/data/runs")]
    s3 = load_config(None, ["run.storage=s3://b/runs", "data.source=s3://b/data"])
    assert rules.local_paths(s3) == []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert rules.with_job_address(cfg).scaling.ray_address is None
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # set for `ray job` commands: not a job's cluster
    assert rules.with_job_address(cfg).scaling.ray_address is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what Ray Jobs sets for an entrypoint
    assert rules.with_job_address(cfg).scaling.ray_address == "auto"
    pinned = load_config(None, ["scaling.ray_address=ray://head:10001"])
    assert rules.with_job_address(pinned).scaling.ray_address == "ray://head:10001"


class _FakeRay(types.ModuleType):
    """Stands in for ``ray`` inside check_cluster_paths: counts the questions asked and answers
    with a two-node cluster (a run that spans several nodes)."""

    def __init__(self):
        super().__init__("ray")
        self.calls: list[str] = []

    def nodes(self):
        self.calls.append("nodes")
        return [_node("h", 4), _node("w", 4)]

    def get_runtime_context(self):
        self.calls.append("get_runtime_context")
        return types.SimpleNamespace(get_node_id=lambda: "h")


def test_check_cluster_paths_needs_no_ray_when_nothing_is_local(monkeypatch):
    local_run = load_config(None, [])
    object_storage = load_config(None, ["scaling.ray_address=auto", "run.storage=s3://b/r", "data.source=s3://b/d"])
    shared_fs = load_config(None, ["scaling.ray_address=auto", "scaling.shared_filesystem=true"])
    local_storage = load_config(None, ["scaling.ray_address=auto", "run.storage=/data/runs", "data.source=s3://b/d"])
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    # Returns before asking Ray anything, and refuses nothing even on a two-node cluster: local
    # runs, object storage, a shared filesystem.
    for cfg in (local_run, object_storage, shared_fs):
        assert rules.check_cluster_paths(cfg, _plan(2, 1)) is None
    assert fake.calls == []
    # The same two-node cluster with a local path: Ray is asked, and the run is refused.
    with pytest.raises(ConfigError, match=r"(?s)spans several nodes \(the cluster has 2 nodes\).*"
                                          r"run.storage='/data/runs' is a local path"):
        rules.check_cluster_paths(local_storage, _plan(2, 1))
    assert "nodes" in fake.calls


def test_build_submission(tmp_path):
    sub = build_submission(str(ROOT / "jobs/cifar-unet.yaml"), ["optim.lr=1e-4", "sampling.guidance_scale=1 "],
                           working_dir=str(ROOT), submission_id="cifar-1")
    assert shlex.split(sub.entrypoint) == ["python", "-m", "orchestrator", "train", "--config", "jobs/cifar-unet.yaml",
                                           "optim.lr=1e-4", "sampling.guidance_scale=1 "]
    assert sub.submission_id == "cifar-1" and sub.spec == "jobs/cifar-unet.yaml"
    assert sub.runtime_env["working_dir"] == str(ROOT) and sub.runtime_env["excludes"] == UPLOAD_EXCLUDES
    assert {".venv", ".git", "runs/", ".gpu/"} <= set(UPLOAD_EXCLUDES) and "pip" not in sub.runtime_env


def test_build_submission_rejects_bad_input_before_uploading(tmp_path):
    with pytest.raises(ConfigError, match="run.name"):
        build_submission(str(ROOT / "jobs/cifar-unet.yaml"), ["run.name=my run"], working_dir=str(ROOT))
    with pytest.raises(ConfigError, match="optim.nope: unknown key"):
        build_submission(str(ROOT / "jobs/cifar-unet.yaml"), ["optim.nope=1"], working_dir=str(ROOT))
    outside = tmp_path / "x.yaml"
    outside.write_text("run: {name: x}\n")
    with pytest.raises(ConfigError, match="outside the working directory"):
        build_submission(str(outside), [], working_dir=str(ROOT))
    sub = build_submission(str(ROOT / "jobs/local-smoke.yaml"), [], working_dir=str(ROOT))
    assert sub.submission_id.startswith("raydiff-local-smoke-") and sub.metadata["raydiff_run"] == "local-smoke"


def test_install_deps_lists_rayless_requirements():
    reqs = project_requirements()
    assert any(r.startswith("deepspeed") for r in reqs) and any(r.startswith("diffusers") for r in reqs)
    assert not [r for r in reqs if r.split("[")[0].split("=")[0].strip().lower() == "ray"]
    assert not [r for r in reqs if "extra" in r]


def test_auth_token_precedence(monkeypatch, tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-default-file\n")
    monkeypatch.setattr(Path, "home", lambda: home)
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    assert auth_token() is None  # the default file only with RAY_AUTH_MODE=token, as Ray does
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert auth_token() == "from-default-file"
    (tmp_path / "tok").write_text("from-path\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token() == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_token() is None
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN_PATH=.* cannot be read"):
        auth_token()


def test_submit_to_an_address_where_nothing_listens_exits_2_with_the_fix(capsys, monkeypatch):
    from orchestrator.cli import main

    monkeypatch.chdir(ROOT)
    port = free_port()
    assert main(["submit", "jobs/local-smoke.yaml", "--address", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "Fix: check --address" in err
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["submit", "jobs/local-smoke.yaml"]) == 2
    assert "no cluster address" in capsys.readouterr().err


def test_a_ranged_worker_count_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"scaling.num_workers: a range of workers \[2, 8\] \(elastic training\) is not "
                                          r"supported.*Fix: a fixed number, e.g. scaling.num_workers=8"):
        load_config(None, ["scaling.num_workers=[2, 8]"])
