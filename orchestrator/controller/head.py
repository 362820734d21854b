"""The local Ray head of ``raydiff controller run --local``.

The controller starts a ``LocalHead`` (orchestrator/cluster/local_head.py: its own session, temp
directory and free ports, stoppable without touching any other Ray on the machine) and stops it
when it ends. The head runs in a session of its own, so a controller killed with ``kill -9``
leaves it, and the jobs on it, running: the head is recorded in the controller's state, and the
next ``run --local`` adopts it (and stops it when it ends) instead of starting a second one. If
the recorded head is gone, a new one is started and the active jobs of the old one are pointed
at it; the watch loop then finds their submissions unknown there and resubmits them, and they
resume from their checkpoints.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable

import psutil

from orchestrator.cluster.local_head import LocalHead
from orchestrator.controller.state import State

META_KEY = "local_head"


class _Leader:
    """The ``ray start --block`` process of a head an earlier controller started: not our child,
    so it is reached through psutil with the few ``Popen`` methods ``LocalHead.stop`` uses."""

    def __init__(self, pid: int):
        self.pid = pid
        self._p = psutil.Process(pid)

    def poll(self) -> int | None:
        try:
            return 0 if self._p.status() == psutil.STATUS_ZOMBIE else None
        except psutil.NoSuchProcess:
            return 0

    def send_signal(self, sig: int) -> None:
        try:
            self._p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        try:
            self._p.wait(timeout)
        except psutil.TimeoutExpired:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0) from None
        except psutil.NoSuchProcess:
            pass
        return 0


def _record(head: LocalHead) -> str:
    assert head.proc is not None  # started: LocalHead.start() sets it or raises
    return json.dumps({"pid": head.proc.pid, "temp_dir": head.temp_dir, "gcs_port": head.gcs_port,
                       "dashboard_port": head.dashboard_port, "num_cpus": head.num_cpus,
                       "token_file": head.token_file})


def _adopt(rec: dict[str, Any]) -> LocalHead | None:
    """The recorded head as a ``LocalHead`` if its leader still runs and its Jobs API answers."""
    try:
        cmdline = psutil.Process(rec["pid"]).cmdline()
    except (psutil.Error, KeyError, TypeError):
        return None
    if f"--temp-dir={rec['temp_dir']}" not in cmdline:
        return None  # the pid now belongs to something else
    head = LocalHead.__new__(LocalHead)
    head.__dict__.update(
        num_cpus=rec.get("num_cpus", 0), worker_types=None, idle_timeout_s=10, extra_env={},
        temp_dir=rec["temp_dir"], gcs_port=rec["gcs_port"], dashboard_port=rec["dashboard_port"],
        address=f"127.0.0.1:{rec['gcs_port']}", dashboard_url=f"http://127.0.0.1:{rec['dashboard_port']}",
        token_file=rec.get("token_file"),
    )
    head.log_path = Path(rec["temp_dir"]) / "ray-start.log"
    head.proc = _Leader(rec["pid"])  # type: ignore[assignment]
    return head if head._jobs_api_up() else None


def start_or_adopt(state: State, *, num_cpus: float, log: Callable[[str], None]) -> LocalHead:
    raw = state.get_meta(META_KEY)
    old = json.loads(raw) if raw else None
    if old is not None:
        head = _adopt(old)
        if head is not None:
            log(f"adopted the local Ray head a previous controller started ({head.dashboard_url}, "
                f"temp dir {head.temp_dir})")
            return head
    head = LocalHead(num_cpus=num_cpus).start()
    state.set_meta(META_KEY, _record(head))
    log(f"started a local Ray head at {head.dashboard_url} (temp dir {head.temp_dir}, {num_cpus:g} CPUs)")
    if old is not None:
        moved = state.readdress(f"http://127.0.0.1:{old['dashboard_port']}", head.dashboard_url)
        if moved:
            log(f"the previous local head is gone: {moved} active job(s) move to the new one and will be resubmitted")
    return head


def stop(head: LocalHead, log: Callable[[str], None]) -> None:
    # The record stays: the next --local controller finds the head gone and moves its jobs.
    log(f"stopping the local Ray head at {head.dashboard_url}")
    head.stop()
