"""Ray Jobs end to end: a real head (`ray start --head` on this machine, token authentication on)
runs jobs/local-smoke.yaml submitted with the real `ray job submit --working-dir .` CLI, then the
same run resubmitted with `raydiff submit`, which resumes it. Checkpoints, metrics and the sample
grid are read back from the run directory.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from orchestrator.cluster.local_head import LocalHead
from orchestrator.storage import RunDir
from orchestrator.train.checkpoint.layout import list_checkpoints

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
RAYDIFF = str(Path(sys.executable).with_name("raydiff"))
TOKEN = secrets.token_hex(16)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    cache = tmp_path_factory.mktemp("builtin-cache")
    h = LocalHead(num_cpus=3, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
                                   "RAYDIFF_CACHE_DIR": str(cache), "RAY_DEDUP_LOGS": "0"})
    h.start()
    yield h
    # Torn down, not drained: after a second the head's processes get SIGTERM, then SIGKILL (a
    # drain took 11-12 s of the suite per head; the last test below stops a head the default way).
    h.stop(grace_s=1)


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("cluster-runs")


def _client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(extra)
    return env


def _job(head, submission_id: str) -> tuple[str, str]:
    from ray.job_submission import JobSubmissionClient

    c = JobSubmissionClient(head.dashboard_url, headers={"Authorization": f"Bearer {TOKEN}"})
    return str(c.get_job_status(submission_id).value), c.get_job_logs(submission_id)


@dataclass(frozen=True)
class CliRun:
    """What the `ray job submit` run left, read right after it (a later test resumes the run)."""

    returncode: int
    output: str  # the CLI's stdout and stderr
    status: str
    logs: str
    checkpoint_steps: list[int]
    metric_steps: list[int]
    grid_size: tuple[int, int]
    uploaded: dict[str, int] | None  # path -> size in the one unpacked working-dir package, None if not one
    packages: list[Path]


@pytest.fixture(scope="module")
def cli_run(head, storage) -> CliRun:
    """jobs/local-smoke.yaml run once with the real `ray job submit --working-dir .` CLI (6 steps);
    shared by the test that checks it and the one that resumes it, so each passes alone."""
    sid = "smoke-cli-1"
    r = subprocess.run(
        [RAY, "job", "submit", "--address", head.dashboard_url, "--working-dir", ".", "--submission-id", sid,
         "--", "raydiff", "train", "--config", "jobs/local-smoke.yaml", f"run.storage={storage}"],
        cwd=ROOT, env=_client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN),
        capture_output=True, text=True, timeout=540,
    )
    status, logs = _job(head, sid)
    rundir = RunDir(str(storage / "local-smoke"))
    ok = r.returncode == 0 and status == "SUCCEEDED"
    grid = Image.open(io.BytesIO(rundir.read_bytes("samples/step_0000006.png"))).size if ok else (0, 0)
    # What --working-dir uploaded (unpacked on the head).
    pkgs = [p for p in Path(head.temp_dir).glob("session_2*/runtime_resources/working_dir_files/*") if p.is_dir()]
    uploaded = {p.relative_to(pkgs[0]).as_posix(): p.stat().st_size for p in pkgs[0].rglob("*") if p.is_file()} \
        if len(pkgs) == 1 else None
    return CliRun(r.returncode, r.stdout + r.stderr, status, logs,
                  [c.step for c in list_checkpoints(rundir)] if ok else [],
                  [m["step"] for m in rundir.metrics()] if ok else [], grid, uploaded, pkgs)


def test_ray_job_submit_cli_runs_job_spec(cli_run):
    assert cli_run.returncode == 0 and cli_run.status == "SUCCEEDED", cli_run.output[-3000:] + cli_run.logs[-3000:]
    assert "final step: 6" in cli_run.logs

    assert cli_run.checkpoint_steps == [3, 6]
    assert cli_run.metric_steps == [1, 2, 3, 4, 5, 6]
    # 3 rows (classes) x 2 columns of 16x16 with 2 px padding, upscaled 2x.
    assert cli_run.grid_size == (2 * (2 * 18 + 2), 2 * (3 * 18 + 2))

    # What --working-dir uploaded (unpacked on the head): the code and job specs, nothing of
    # .venv, .git, run directories or GPU bundles.
    assert cli_run.uploaded is not None, cli_run.packages
    files = list(cli_run.uploaded)
    assert "jobs/local-smoke.yaml" in files and "orchestrator/cli/submit.py" in files
    assert not [f for f in files if f.split("/")[0] in (".venv", ".git", "runs", ".gpu")]
    assert sum(cli_run.uploaded.values()) < 5 << 20


def test_raydiff_submit_without_token_is_refused_with_the_fix(head, monkeypatch, capsys):
    from orchestrator.cli import main

    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(ROOT)
    assert main(["submit", "jobs/local-smoke.yaml", "--address", head.dashboard_url]) == 2
    err = capsys.readouterr().err
    assert "requires token authentication and no token was given" in err and "RAY_AUTH_TOKEN" in err
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(["submit", "jobs/local-smoke.yaml", "--address", head.dashboard_url]) == 2
    assert "rejected the token sent" in capsys.readouterr().err


def test_raydiff_submit_resumes_the_run(head, storage, cli_run):
    # The run of `ray job submit` (6 steps, cli_run) continued to 9 steps.
    assert cli_run.returncode == 0 and cli_run.status == "SUCCEEDED", cli_run.output[-3000:] + cli_run.logs[-3000:]
    # The token alone (no RAY_AUTH_MODE): raydiff sends it; Ray's own CLI would not.
    r = subprocess.run(
        [RAYDIFF, "submit", "jobs/local-smoke.yaml", f"run.storage={storage}", "optim.steps=9",
         "--address", head.dashboard_url, "--submission-id", "smoke-raydiff-1", "--follow"],
        cwd=ROOT, env=_client_env(RAY_AUTH_TOKEN=TOKEN), capture_output=True, text=True, timeout=540,
    )
    status, logs = _job(head, "smoke-raydiff-1")
    assert r.returncode == 0 and status == "SUCCEEDED", (r.stdout + r.stderr)[-3000:] + logs[-3000:]
    assert r.stdout.startswith("submitted smoke-raydiff-1: run local-smoke")
    assert f"RAY_AUTH_MODE=token ray job logs --address {head.dashboard_url} --follow smoke-raydiff-1" in r.stdout
    assert "job smoke-raydiff-1 SUCCEEDED" in r.stdout and "final step: 9" in r.stdout

    rundir = RunDir(str(storage / "local-smoke"))
    assert [(e["step"], e["samples_seen"]) for e in rundir.events() if e["event"] == "resumed"] == [(6, 48)]
    assert [c.step for c in list_checkpoints(rundir)] == [6, 9]
    assert [m["step"] for m in rundir.metrics()] == list(range(1, 10))
    assert json.loads(rundir.read_text("plan.json"))["num_workers"] == 2


def test_stopping_a_local_head_leaves_other_ray_clusters_running(head):
    other = LocalHead(num_cpus=1, env={"RAY_AUTH_MODE": "disabled"}).start()
    pids = [p.pid for p in other.processes()]
    assert len(pids) > 3
    other.stop()
    import psutil

    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not Path(other.temp_dir).exists()
    # The module's head still serves and still has all of its processes.
    assert head._jobs_api_up() and head.proc.poll() is None
