"""Autoscaling on Ray's fake multi-node provider: a head that hosts nothing (0 CPUs), worker
nodes of 1 CPU that the real autoscaler adds and removes (local raylets), data and runs in a
local S3. Jobs go through Ray Jobs like on a cloud cluster (the code in place on every node, as
in an image).

- A run with local paths is refused once it has connected (its workers need other nodes).
- A 2-worker run makes the autoscaler add nodes; one training node is killed after the first
  checkpoint; the run restarts its workers on a replacement node, resumes from the checkpoint and
  finishes; afterwards the idle nodes are removed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from orchestrator.cluster.local_head import LocalHead
from orchestrator.data.demo import write_demo_dataset
from orchestrator.data.upload import upload
from orchestrator.storage import RunDir
from orchestrator.train.checkpoint.layout import list_checkpoints

pytestmark = pytest.mark.slow
BUCKET = "raydiff-autoscaling"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    s3_server.create_bucket(BUCKET)
    demo = write_demo_dataset(tmp_path_factory.mktemp("demo"), images_per_class=4, resolution=16)
    upload(str(demo), f"s3://{BUCKET}/shapes", shard_size=("samples", 20), s3cfg=s3_server.s3_config(),
           progress=False, out=open(os.devnull, "w"))
    head = LocalHead(
        num_cpus=0,
        worker_types={"cpu": {"resources": {"CPU": 1}, "max_workers": 2}},  # raised at the kill below
        # Long enough that the nodes that decoded the data survive until the trainer asks for them.
        idle_timeout_s=20,
        # A node that stops answering is dead after 3 missed checks a second apart (Ray's default:
        # 5 every 3 s); the lost node below is detected in about 3 s instead of 15.
        env={"RAY_AUTH_MODE": "disabled", "RAYDIFF_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
             "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"},
    ).start()
    yield head
    # Torn down, not drained: after a second the head's processes get SIGTERM, then SIGKILL (a
    # drain took 11-12 s of the suite per head; tests/test_jobs_submit.py tests the drain).
    head.stop(grace_s=1)


def _client(head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard_url)


def _submit(head, sid: str, overrides: list[str]) -> str:
    from orchestrator.cluster.submit import submit_job

    # The checkout in place (`local://`), not an uploaded working_dir: every fake node is a raylet
    # on this machine sharing one runtime-env directory, and Ray 2.60 unpacks a working_dir with
    # overwrite=True on each node's first use of it (working_dir.py create): a node added later
    # deletes and re-extracts the files that the other nodes' workers are importing from (CI saw
    # "No module named 'orchestrator.data.formats'" in a decode task as the third node came up).
    # On a real cluster every node has its own disk; the upload itself is tested on one node
    # (tests/test_jobs_submit.py).
    return submit_job(
        _client(head),
        entrypoint="python -m orchestrator train --config jobs/local-smoke.yaml " + " ".join(overrides),
        runtime_env={"working_dir": f"local://{ROOT}"},
        submission_id=sid,
    )


def _nodes(head) -> dict[str, dict]:
    from ray.util.state import list_nodes

    return {n.node_id: {"state": n.state, "cpu": n.resources_total.get("CPU", 0), "head": n.is_head_node}
            for n in list_nodes(address=head.dashboard_url, detail=True, raise_on_missing_output=False)}


def _training_nodes(head) -> set[str]:
    from ray.util.state import list_actors

    actors = list_actors(address=head.dashboard_url, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         raise_on_missing_output=False)
    return {a.node_id for a in actors}


def _edit_autoscaling_config(head, edit: Callable[[dict], None]) -> None:
    """Change the running cluster: the autoscaler reads its config again at every update."""
    config = yaml.safe_load(head.autoscaling_config.read_text())
    edit(config)
    head.autoscaling_config.write_text(yaml.safe_dump(config))


def _set_max_workers(config: dict, n: int) -> None:
    config["max_workers"] = config["available_node_types"]["cpu"]["max_workers"] = n


def _autoscaler_log(head, n: int = 60) -> str:
    """The autoscaler's decisions (launches, terminations, errors), not its per-second status."""
    path = Path(head.temp_dir) / "session_latest" / "logs" / "monitor.log"
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no autoscaler log: {e})"
    keep = ("aunch", "erminating", "Removing", "ERROR", "WARN", "Error", "lost contact", "max_workers")
    return "\n".join([line for line in lines if any(k in line for k in keep)][-n:])


def _kill_node(head, node_id: str) -> None:
    """SIGKILL the node (a fake node is a raylet on this machine): the raylet and every process it
    started, at once, as a machine that goes away takes them. (The raylet alone is not a lost
    node: its worker processes notice only later, and one trained on for 12 more seconds.)"""
    import psutil

    raylets = []
    for p in head.processes():
        try:
            if p.name() == "raylet" and f"--node_id={node_id}" in p.cmdline():
                raylets.append(p)
        except psutil.Error:
            continue  # exited meanwhile
    assert len(raylets) == 1, f"no raylet process for node {node_id}"
    node = [raylets[0], *raylets[0].children(recursive=True)]
    for p in node:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass  # exited meanwhile


def test_local_paths_refused_on_a_cluster_the_head_cannot_host(cluster, tmp_path):
    sid = _submit(cluster, "local-paths", [f"run.storage={tmp_path}"])
    c = _client(cluster)
    deadline = time.time() + 300
    while str(c.get_job_status(sid).value) not in TERMINAL and time.time() < deadline:
        time.sleep(2)
    logs = c.get_job_logs(sid)
    assert str(c.get_job_status(sid).value) == "FAILED", logs[-3000:]
    assert "this run spans several nodes (the driver's node has 0 CPUs" in logs
    assert "data.source=builtin is written to the driver's disk" in logs
    assert f"run.storage={str(tmp_path)!r} is a local path. Fix: run.storage=s3://" in logs
    # Refused before the run wrote anything but its lease (taken before Ray starts, released).
    written = [p.name for p in (tmp_path / "local-smoke").iterdir()] if (tmp_path / "local-smoke").exists() else []
    assert not [n for n in written if n in ("config.yaml", "plan.json", "events.jsonl") or n.startswith("checkpoint")]


def test_autoscaler_adds_nodes_replaces_a_lost_one_and_removes_idle_ones(cluster, s3_server):
    run = "autoscaled"
    s3 = [f"storage.s3.endpoint_url={s3_server.endpoint_url}", f"storage.s3.region={s3_server.region}"]
    sid = _submit(cluster, "autoscaled-1", [
        f"data.source=s3://{BUCKET}/shapes", f"run.storage=s3://{BUCKET}/runs", f"run.name={run}", *s3,
        "scaling.cpus_per_worker=1", "model.name=unet-tiny", "optim.steps=40", "checkpoint.every_steps=4", "sampling.every_steps=40"])
    c = _client(cluster)
    rundir = RunDir(f"s3://{BUCKET}/runs/{run}", s3_server.s3_config())
    seen: dict[str, dict] = {}
    peak_alive_workers = 0
    killed = None
    timeline: list[tuple] = []  # (seconds, job status, alive nodes) at every change: the failure report
    t0 = deadline = time.time()
    deadline += 480  # the run takes 60-80 s alone
    while time.time() < deadline:
        status = str(c.get_job_status(sid).value)
        nodes = _nodes(cluster)
        seen.update(nodes)
        alive = sorted(i[-2:] for i, n in nodes.items() if n["state"] == "ALIVE")
        if not timeline or timeline[-1][1:] != (status, alive):
            timeline.append((round(time.time() - t0), status, alive))
        peak_alive_workers = max(peak_alive_workers, sum(1 for n in nodes.values() if n["state"] == "ALIVE" and not n["head"]))
        if status in TERMINAL:
            break
        # Kill once the second checkpoint is written (the first is persisted and registered by
        # then) and the two training nodes are the only ones: max_workers=2 (a node launched past
        # it, seen here for a second, is terminated at the autoscaler's next update). Else the
        # workers could restart on a spare node (CI at 3bee35c); and a spare cannot be killed
        # with the training node either (CI at 15aa433, reproduced here): Ray 2.60's fake provider
        # leaves its nodes tagged "uninitialized", so a dead node counts as a pending one until it
        # is idle, and a dead spare with free CPUs in its last report covered the restarted worker
        # group's demand for ever (no node added in 860 s).
        if killed is None and any(e["event"] == "checkpoint" and e["step"] >= 8 for e in rundir.events()):
            training = _training_nodes(cluster)
            workers = {i for i, n in _nodes(cluster).items() if n["state"] == "ALIVE" and not n["head"]}
            if training and workers == training:
                killed = sorted(training)[0]
                before_kill = set(seen) | workers
                # Room for the replacement: the dead node counts toward max_workers until the
                # autoscaler drops it.
                _edit_autoscaling_config(cluster, lambda c: _set_max_workers(c, len(workers) + 1))
                _kill_node(cluster, killed)
                timeline.append((round(time.time() - t0), "killed", killed[-2:]))
        time.sleep(1)
    logs = c.get_job_logs(sid)
    print("timeline (s, job, alive nodes):", timeline)
    assert status == "SUCCEEDED", f"{timeline}\n{logs[-4000:]}\nautoscaler:\n{_autoscaler_log(cluster)}"
    assert killed is not None, f"the run finished before a node could be killed: {timeline}"

    head = [i for i, n in seen.items() if n["head"]]
    assert len(head) == 1 and seen[head[0]]["cpu"] == 0  # the head could host no training worker
    assert peak_alive_workers >= 2, timeline  # the autoscaler added a node per training worker
    assert seen[killed]["state"] == "DEAD", timeline
    replacements = set(seen) - before_kill
    assert replacements, f"no node was added after the kill: {timeline}\n{rundir.events()}"

    resumed = [e["step"] for e in rundir.events() if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0] % 4 == 0 and 4 <= resumed[0] < 40, (timeline, rundir.events())
    assert [r.step for r in list_checkpoints(rundir)][-1] == 40
    steps = [m["step"] for m in rundir.metrics()]
    assert steps[-1] == 40 and set(steps) == set(range(1, 41))

    # Idle nodes go away: back to the head alone. The 20 s that kept the decoding nodes for the
    # trainer is not needed now.
    _edit_autoscaling_config(cluster, lambda c: c.update(idle_timeout_minutes=2 / 60))
    deadline = time.time() + 120
    while time.time() < deadline:
        alive = [i for i, n in _nodes(cluster).items() if n["state"] == "ALIVE"]
        if alive == head:
            break
        time.sleep(2)
    assert alive == head, timeline
