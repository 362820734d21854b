"""The job controller against a real Ray head on 127.0.0.1 (started and stopped here), with real
processes killed: a job's driver killed with SIGKILL is resubmitted and resumes from its
checkpoint; the controller itself killed with SIGKILL and started again adopts the running job
instead of submitting it twice; a job whose data does not exist, and one whose config is invalid,
are not retried; while the run trains, a second `raydiff train` of the same run is refused by
the run's lease, which names the holder.

Recovery is measured from the run's own records (events.jsonl, metrics.jsonl) and printed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from orchestrator.cli import main as main_cli
from orchestrator.cluster.local_head import LocalHead
from orchestrator.controller.state import State
from orchestrator.storage import RunDir

pytestmark = pytest.mark.slow

STEPS = 60
NAME = "ft-main"


def _spec(storage: Path, name: str, **extra: str) -> str:
    lines = [
        f"run: {{name: {name}, storage: {storage}, evaluate: false, max_failures: 0}}",
        f"data: {{source: {extra.get('source', 'builtin')}, resolution: 16, builtin_images_per_class: 4}}",
        "model: {name: unet-tiny}",
        f"optim: {{steps: {STEPS}, batch_size: 8, warmup_steps: 2, lr: {extra.get('lr', '1e-3')}}}",
        "precision: {dtype: fp32}",
        "scaling: {device: cpu, num_workers: 1, cpus_per_worker: 0.5}",
        "checkpoint: {every_steps: 2, keep: 2}",
        "sampling: {every_steps: 1000, num_steps: 2, per_class: 1, max_rows: 2}",
        "logging: {every_steps: 1, progress: false}",
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    cache = tmp_path_factory.mktemp("builtin-cache")
    env = {"RAY_AUTH_MODE": "disabled", "RAYDIFF_CACHE_DIR": str(cache), "AWS_EC2_METADATA_DISABLED": "true"}
    h = LocalHead(num_cpus=4, env=env)
    h.start(timeout_s=180)
    h.cache_dir = cache
    try:
        yield h
    finally:
        # Torn down, not drained: after a second the head's processes get SIGTERM, then SIGKILL (a
        # drain took 11-12 s of the suite per head; tests/test_jobs_submit.py tests the drain).
        h.stop(grace_s=1)


def _wait(what: str, predicate: Callable[[], object], timeout_s: float, log: Path) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; controller log:\n{tail}")


# A second `raydiff train` with its imports paid in advance, started on a signal file: the lease
# check then comes seconds after the signal, while attempt 2 still trains, whatever the load.
_PREWARMED = """
import os, sys, time
from orchestrator.cli import main
import orchestrator.train.driver, orchestrator.data, ray.data, ray.train.torch
go = sys.argv[1]
while not os.path.exists(go):
    time.sleep(0.1)
sys.exit(main(sys.argv[2:]))
"""


def _events(run: RunDir, kind: str) -> list[dict]:
    try:
        return [e for e in run.events() if e.get("event") == kind]
    except (OSError, ValueError):
        return []


def _last_step(run: RunDir) -> int:
    try:
        steps = [m["step"] for m in run.metrics()]
    except (OSError, ValueError):
        return 0
    return max(steps, default=0)


def test_controller_resubmits_a_killed_driver_survives_its_own_kill_and_does_not_retry_user_errors(
        head, tmp_path, monkeypatch, capsys):
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the head runs without token authentication (loopback)

    wd, storage = tmp_path / "wd", tmp_path / "runs"
    wd.mkdir()
    (wd / "main.yaml").write_text(_spec(storage, NAME))
    (wd / "baddata.yaml").write_text(_spec(storage, "ft-baddata", source="/nonexistent/raydiff-data"))
    (wd / "badcfg.yaml").write_text(_spec(storage, "ft-badcfg", lr="nan"))
    db, log = tmp_path / "controller.db", tmp_path / "controller.log"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAYDIFF_CACHE_DIR": str(head.cache_dir)}
    cmd = [sys.executable, "-m", "orchestrator", "controller", "run", "--address", head.dashboard_url, "--db", str(db),
           "--working-dir", str(wd), "--poll-s", "1", "--backoff-s", "1", "--max-restarts", "2",
           "main.yaml", "baddata.yaml", "badcfg.yaml"]

    def start_controller() -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(cmd, cwd=wd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    run = RunDir(str(storage / NAME))
    client = JobSubmissionClient(head.dashboard_url)
    go = tmp_path / "go"
    second = subprocess.Popen([sys.executable, "-c", _PREWARMED, str(go), "train", "--config", str(wd / "main.yaml")],
                              cwd=wd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    controller = start_controller()
    try:
        # -- 1. the driver of attempt 1 is killed once it has checkpoints ------------------------
        _wait("attempt 1 to train past step 4", lambda: any(e["step"] >= 4 for e in _events(run, "checkpoint")), 420, log)
        driver = client.get_job_info(f"{NAME}-1").driver_info
        assert driver is not None
        steps_before_kill = _last_step(run)
        t_kill = time.time()
        os.kill(int(driver.pid), signal.SIGKILL)
        time.sleep(0.5)
        steps_before_kill = max(steps_before_kill, _last_step(run))  # what the dying step loop still wrote

        # -- 2. the controller resubmits; kill -9 the controller while attempt 2 runs -----------
        def attempt2_running() -> bool:
            s = State(db)
            try:
                return any(a.submission_id == f"{NAME}-2" and a.running_at for a in s.attempts(NAME))
            finally:
                s.close()

        _wait("the controller to resubmit and attempt 2 to run", attempt2_running, 180, log)
        # Attempt 1's last record: its worker may outlive the driver by a moment, and attempt 2
        # rewinds metrics.jsonl to its checkpoint when it resumes (seconds after it starts).
        steps_before_kill = max(steps_before_kill, _last_step(run))
        t_ctl_kill = time.time()
        os.killpg(controller.pid, signal.SIGKILL)
        controller.wait(30)
        assert client.get_job_status(f"{NAME}-2").value in ("PENDING", "RUNNING")
        controller = start_controller()
        adopted = _wait("the restarted controller to adopt attempt 2",
                        lambda: f"{NAME}: watching submitted submission {NAME}-2" in log.read_text(), 180, log)
        t_adopted = time.time()

        # -- 3. while attempt 2 trains, a second `raydiff train` of the run is refused -----------
        _wait("attempt 2 to take the lease", lambda: len(_events(run, "started")) >= 2, 420, log)
        go.touch()
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err[-3000:]
        assert "is being trained by another process: its lease is held by" in err
        assert f"(Ray Job submission {NAME}-2)" in err
        assert client.get_job_status(f"{NAME}-2").value == "RUNNING"  # refused while the holder trained

        assert controller.wait(600) == 1  # 1: not every job succeeded (the two bad ones)
    finally:
        for p in (controller, second):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(30)
    text = log.read_text()
    # Adopted, never submitted twice. A third submission means attempt 2 failed: its driver's
    # output says why (the head's logs go with it at teardown).
    if f"submitted {NAME}-3" in text:
        raise AssertionError(f"{text}\nattempt 2's driver:\n{client.get_job_logs(f'{NAME}-2')[-6000:]}")
    assert adopted

    state = State(db)
    main, bad_data, bad_cfg = state.get(NAME), state.get("ft-baddata"), state.get("badcfg")
    attempts = state.attempts(NAME)
    # The killed driver: infrastructure, resubmitted once; the resubmission finished the run.
    assert (main.status, main.attempts, main.restarts) == ("succeeded", 2, 1)
    assert [(a.submission_id, a.ray_status, a.kind) for a in attempts] == [
        (f"{NAME}-1", "FAILED", "infra"), (f"{NAME}-2", "SUCCEEDED", None)]
    assert "killed by SIGKILL" in attempts[0].reason
    # Data that does not exist: the user's, one attempt, the reason shown.
    assert (bad_data.status, bad_data.attempts) == ("failed", 1)
    assert state.attempts("ft-baddata")[0].kind == "user"
    assert "/nonexistent/raydiff-data does not exist" in bad_data.reason
    # An invalid config is never submitted.
    assert (bad_cfg.status, bad_cfg.attempts) == ("failed", 0)
    assert "optim.lr: must be a finite number, got nan" in bad_cfg.reason
    assert main_cli(["controller", "status", "--db", str(db), "--attempts"]) == 0
    table = capsys.readouterr().out
    assert re.search(rf"{NAME}\s+succeeded\s+2\s+1/2\s+{NAME}-2", table), table
    assert re.search(rf"{NAME}-1: FAILED \d+s, training \d+s after submission, exit (137|-9), infra: the driver was "
                     "killed by SIGKILL", table), table
    # The resubmission's "training again" time is its own first step's, read from the run's events.
    again = re.search(rf"{NAME}-2: SUCCEEDED \d+s, training (\d+)s after submission", table)
    assert again, table

    # The run: resumed from its last checkpoint at or before the kill, every step once, to the end.
    resumed = _events(run, "resumed")
    firsts = _events(run, "first_step")
    assert len(resumed) == 1 and len(firsts) == 2
    resumed_step = resumed[0]["step"]
    assert resumed_step % 2 == 0 and 2 <= resumed_step <= steps_before_kill
    assert firsts[1]["step"] == resumed_step + 1
    assert [m["step"] for m in run.metrics()] == list(range(1, STEPS + 1))
    takeovers = _events(run, "lease_taken_over")
    assert len(takeovers) == 1 and takeovers[0]["previous"]["submission_id"] == f"{NAME}-1"
    assert takeovers[0]["holder"]["submission_id"] == f"{NAME}-2"

    recovery_s = firsts[1]["time"] - t_kill
    assert int(again.group(1)) == round(firsts[1]["time"] - attempts[1].submitted_at)
    started2 = _events(run, "started")[1]["time"]
    print(f"\n[controller] after the kill: failure recorded +{attempts[0].ended_at - t_kill:.1f}s, resubmitted "
          f"+{attempts[1].submitted_at - t_kill:.1f}s, new driver took the lease and connected +{started2 - t_kill:.1f}s, "
          f"resumed +{resumed[0]['time'] - t_kill:.1f}s, first step +{recovery_s:.1f}s")
    print(f"[controller] driver kill: recovery (kill -> first step of attempt 2) {recovery_s:.1f}s; "
          f"steps lost {steps_before_kill - resumed_step} (trained to >= {steps_before_kill}, resumed at {resumed_step}); "
          f"first attempt start -> first step {firsts[0]['time'] - _events(run, 'started')[0]['time']:.1f}s")
    print(f"[controller] controller kill -9: unsupervised {t_adopted - t_ctl_kill:.1f}s (kill -> restarted controller "
          f"watching {NAME}-2); steps lost 0 (the job never stopped); attempts 2")


def test_controller_stop_stops_the_ray_job_and_it_is_not_resubmitted(head, tmp_path, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    wd, storage = tmp_path / "wd", tmp_path / "runs"
    wd.mkdir()
    (wd / "long.yaml").write_text(_spec(storage, "ft-stop").replace(f"steps: {STEPS}", "steps: 100000"))
    db, log = tmp_path / "controller.db", tmp_path / "controller.log"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAYDIFF_CACHE_DIR": str(head.cache_dir)}
    with open(log, "ab") as out:
        controller = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "controller", "run", "--address", head.dashboard_url, "--db", str(db),
             "--working-dir", str(wd), "--poll-s", "1", "--backoff-s", "1", "long.yaml"],
            cwd=wd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait("the job to run", lambda: "ft-stop: ft-stop-1 is running" in log.read_text(), 300, log)
        stop = subprocess.run([sys.executable, "-m", "orchestrator", "controller", "stop", "ft-stop", "--db", str(db)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert re.search(r"ft-stop\s+stopped\s+1\s+0/3\s+ft-stop-1", stop.stdout), stop.stdout
        assert JobSubmissionClient(head.dashboard_url).get_job_status("ft-stop-1").value == "STOPPED"
        assert controller.wait(120) == 1  # nothing left to watch; the job did not succeed
    finally:
        if controller.poll() is None:
            os.kill(controller.pid, signal.SIGKILL)
            controller.wait(30)
    assert "submitted ft-stop-2" not in log.read_text()
    state = State(db)
    job, attempts = state.get("ft-stop"), state.attempts("ft-stop")
    assert (job.status, job.reason) == ("stopped", "stopped by raydiff controller stop")
    assert [(a.submission_id, a.ray_status) for a in attempts] == [("ft-stop-1", "STOPPED")]
