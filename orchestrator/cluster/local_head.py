"""A Ray head node on this machine that can be stopped without touching any other Ray.

``ray stop`` stops every Ray process of the user and ``ray.cluster_utils.AutoscalingCluster``
runs ``ray stop --force``; on a machine that several people (or test runs) share, both kill the
others' clusters. This head runs ``ray start --head --block`` in a session of its own, on free
ports, with its own temp directory, so that ``stop()`` can end exactly the processes it started:
those in its session (GCS, raylets, fake autoscaler nodes, workers) and their descendants (job
drivers run in sessions of their own).

With ``autoscaling_config`` and ``fake_cluster=True`` it is Ray's fake multi-node cluster: the
autoscaler adds and removes worker raylets on this machine as demand changes (node types from
the config; ``provider: {type: fake_multinode}``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml

from orchestrator.cluster.submit import auth_token


# Object store per node (head and fake workers): small runs need little, and /dev/shm is shared.
OBJECT_STORE_BYTES = 300 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_cluster_config(gcs_host: str, gcs_port: int, worker_types: dict[str, dict[str, Any]], *, idle_timeout_s: float = 10,
                        upscaling_speed: float = 1.0) -> dict[str, Any]:
    """An autoscaler config for Ray's fake multi-node provider: a head that hosts nothing
    (``ray start --num-cpus=0``) and the given worker types (``resources``, ``min_workers``,
    ``max_workers``). Fake nodes join the GCS at ``gcs_address``, not the default port 6379."""
    types: dict[str, Any] = {"ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0}}
    for name, t in worker_types.items():
        types[name] = {"node_config": {}, "min_workers": 0, **t}
        # Each fake node is a raylet with its own object store: keep them small.
        types[name]["resources"] = {"object_store_memory": OBJECT_STORE_BYTES, **t.get("resources", {})}
    return {
        "cluster_name": "raydiff-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in worker_types.values()),
        "upscaling_speed": upscaling_speed,
        "idle_timeout_minutes": idle_timeout_s / 60,
        # As Ray's own fake_multi_node/example.yaml: fake nodes have no SSH updaters to run.
        "provider": {"type": "fake_multinode", "gcs_address": f"{gcs_host}:{gcs_port}", "launch_multiple": True,
                     "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ray"},
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class LocalHead:
    """``with LocalHead(num_cpus=4) as head: ...`` — ``head.dashboard_url`` for Ray Jobs,
    ``head.address`` (this machine's address and the GCS port) for ``ray.init``."""

    def __init__(self, *, num_cpus: float = 4, worker_types: dict[str, dict[str, Any]] | None = None,
                 idle_timeout_s: float = 10, env: dict[str, str] | None = None, temp_root: str | None = None):
        self.num_cpus = num_cpus
        self.worker_types = worker_types
        self.idle_timeout_s = idle_timeout_s
        self.extra_env = dict(env or {})
        # Short: Ray's Unix socket paths under it must stay below 108 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rdh", dir=temp_root or "/tmp")
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        from ray._private.services import get_node_ip_address

        # Ray itself replaces a loopback node address by this machine's interface address.
        self.node_ip = get_node_ip_address()
        self.address = f"{self.node_ip}:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        self.proc: subprocess.Popen | None = None
        self.token_file = self._auth_setup()

    # -- authentication -------------------------------------------------------------------------
    def _auth_setup(self) -> str | None:
        """This head's token authentication, decided here rather than left to ``ray start``.

        Left alone, Ray 2.60 turns token authentication on for a new head whenever a token is
        lying around (``~/.ray/auth_token``, written by any earlier local ``ray.init``), while
        Ray's clients send a token only with ``RAY_AUTH_MODE=token``: a controller that started
        such a head could never talk to it. So the head always runs in an explicit mode: without
        authentication when the caller's environment says ``RAY_AUTH_MODE=disabled`` (tests on
        loopback), otherwise with a token: the caller's (``RAY_AUTH_TOKEN`` /
        ``RAY_AUTH_TOKEN_PATH``) or a new one in a file of this head's temp directory (mode 600).
        Returns that file (None: no file of ours)."""
        env = {**os.environ, **self.extra_env}
        if env.get("RAY_AUTH_MODE", "").lower() == "disabled":
            return None
        if env.get("RAY_AUTH_TOKEN", "").strip() or env.get("RAY_AUTH_TOKEN_PATH"):
            return None
        path = Path(self.temp_dir) / "auth_token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        return str(path)

    @property
    def token(self) -> str | None:
        """The token clients of this head must send (None: the head runs without authentication)."""
        if self.token_file is not None:
            return Path(self.token_file).read_text().strip()
        # The caller's explicit mode or token, read as every client reads it (None also for a head
        # adopted from a record written before heads had their own token).
        return auth_token({**os.environ, **self.extra_env})

    # -- start ----------------------------------------------------------------------------------
    def command(self) -> list[str]:
        ray_cli = str(Path(sys.executable).with_name("ray"))
        cmd = [
            ray_cli, "start", "--head", "--block", "--disable-usage-stats",
            f"--port={self.gcs_port}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus:g}", "--num-gpus=0",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
        ]
        if self.worker_types is not None:
            cfg = fake_cluster_config(self.node_ip, self.gcs_port, self.worker_types,
                                      idle_timeout_s=self.idle_timeout_s)
            self.autoscaling_config.write_text(yaml.safe_dump(cfg))
            cmd.append(f"--autoscaling-config={self.autoscaling_config}")
        return cmd

    @property
    def autoscaling_config(self) -> Path:
        """The autoscaler's config (with ``worker_types``). Ray's autoscaler reads it again at every
        update: an edit (a new idle timeout, more workers) changes the running cluster."""
        return Path(self.temp_dir) / "autoscaler.yaml"

    def environment(self) -> dict[str, str]:
        # Not another cluster's address: this head and its jobs must not join one.
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        # Job entrypoints (`raydiff ...`, `python -m orchestrator`) resolve in this environment.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.worker_types is not None:
            env["RAY_FAKE_CLUSTER"] = "1"
            env.setdefault("AUTOSCALER_UPDATE_INTERVAL_S", "1")
        env.update(self.extra_env)
        if env.get("RAY_AUTH_MODE", "").lower() != "disabled":
            env["RAY_AUTH_MODE"] = "token"  # explicit: see _auth_setup
            if self.token_file is not None:
                # Job drivers inherit the head's environment: their ray.init finds the token too.
                env["RAY_AUTH_TOKEN_PATH"] = self.token_file
                env.pop("RAY_AUTH_TOKEN", None)
        return env

    def start(self, timeout_s: float = 90) -> "LocalHead":
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command(), env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{tail}")
            if self._jobs_api_up():
                return self
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise TimeoutError(f"the Ray head did not serve {self.dashboard_url} within {timeout_s:.0f}s:\n{tail}")

    def _jobs_api_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                return r.status == 200 and "ray_version" in json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code in (401, 403)  # serving, behind token authentication
        except (OSError, ValueError):
            return False

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # -- stop -----------------------------------------------------------------------------------
    def processes(self) -> list[Any]:
        """Every live process this head started: its session and their descendants."""
        if self.proc is None:
            return []
        sid = self.proc.pid  # start_new_session: the session id is the leader's pid
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == sid:
                    found[p.pid] = p
                    for c in p.children(recursive=True):
                        found[c.pid] = c
            except (psutil.Error, OSError):
                continue
        return list(found.values())

    def stop(self, grace_s: float = 5, remove_temp: bool = True) -> None:
        """SIGTERM the head (it drains for up to 30 s on its own), then after ``grace_s`` every
        process it started, SIGKILL for those still there 5 s later. Nothing else is touched."""
        if self.proc is None:
            return
        procs = self.processes()
        if self.proc.poll() is None:
            # `ray start --block` shuts its own node's processes down on SIGTERM.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        procs += [p for p in self.processes() if p.pid not in {q.pid for q in procs}]
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        if remove_temp:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalHead":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
