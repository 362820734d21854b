"""``raydiff controller run --local``: the controller owns a Ray head on this machine. It stops it
on SIGTERM; a controller killed with SIGKILL leaves the head (and its jobs) running, and the next
``--local`` controller adopts that head instead of starting a second one; when the recorded head
is gone, a new head is started and the active job is resubmitted there.

Run as the README says, with RAY_AUTH_MODE unset: the first two controllers find a token in
~/.ray/auth_token (any earlier local ``ray.init`` leaves one, and Ray 2.60 then turns token
authentication on for a new head), the third finds none; the controller talks to its head
either way."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

NAME = "ft-local"


def _spec(storage: Path) -> str:
    return "\n".join([
        f"run: {{name: {NAME}, storage: {storage}, evaluate: false, max_failures: 0}}",
        "data: {source: builtin, resolution: 16, builtin_images_per_class: 4}",
        "optim: {steps: 400, batch_size: 8, warmup_steps: 2}",
        "precision: {dtype: fp32}",
        "scaling: {device: cpu, num_workers: 1, cpus_per_worker: 0.5}",
        "checkpoint: {every_steps: 2, keep: 2}",
        "logging: {every_steps: 1, progress: false}",
    ]) + "\n"


def _head_processes(temp_dir: str) -> list[psutil.Process]:
    """Processes of the head using ``temp_dir``: Ray's own (named in their command lines) and
    job drivers (working directories unpacked under it)."""
    found = []
    for p in psutil.process_iter():
        try:
            if any(temp_dir in a for a in p.cmdline()) or p.cwd().startswith(temp_dir):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=5) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        return e.code in (401, 403)  # serving, behind the head's token authentication
    except OSError:
        return False


def test_local_head_is_owned_adopted_after_kill9_and_replaced_when_gone(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "local.yaml").write_text(_spec(tmp_path / "runs"))
    db, log = tmp_path / "controller.db", tmp_path / "controller.log"
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("a-token-of-an-earlier-local-ray\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), RAYDIFF_CACHE_DIR=str(tmp_path / "cache"))
    base = [sys.executable, "-m", "orchestrator", "controller", "run", "--local", "--num-cpus", "4", "--db", str(db),
            "--working-dir", str(wd), "--poll-s", "1", "--backoff-s", "1"]
    procs: list[subprocess.Popen] = []
    heads: list[str] = []

    def start(*specs: str) -> subprocess.Popen:
        with open(log, "ab") as out:
            p = subprocess.Popen([*base, *specs], cwd=wd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        procs.append(p)
        return p

    def wait_log(pattern: str, timeout_s: float = 300) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = re.search(pattern, log.read_text())
            if m:
                return m
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {pattern!r} in the controller log:\n{log.read_text()[-4000:]}")

    try:
        # a) The controller starts a head and submits; kill -9 leaves the head running.
        c = start("local.yaml")
        m = wait_log(r"started a local Ray head at (\S+) \(temp dir (\S+),")
        url, temp_dir = m.group(1), m.group(2)
        heads.append(temp_dir)
        wait_log(rf"{NAME}: submitted {NAME}-1")
        c.send_signal(signal.SIGKILL)
        c.wait(30)
        assert _answers(url), "the head should outlive a controller killed with SIGKILL"

        # b) The next --local controller adopts that head, and stops it on SIGTERM.
        log.write_text("")
        c = start()
        wait_log(rf"adopted the local Ray head a previous controller started \({re.escape(url)}")
        wait_log(rf"{NAME}: watching submitted submission {NAME}-1")
        assert "started a local Ray head" not in log.read_text()
        t0 = time.monotonic()
        c.send_signal(signal.SIGTERM)
        assert c.wait(120) == 130  # stopped with the job still active
        print(f"\n[controller --local] SIGTERM -> head stopped and controller exited in {time.monotonic() - t0:.1f}s")
        assert "SIGTERM: stopping the controller" in log.read_text()
        assert not _answers(url)
        assert _head_processes(temp_dir) == []

        # c) The recorded head is gone: a new one is started and the job resubmitted to it (now
        # with no token lying in HOME).
        (home / ".ray" / "auth_token").unlink()
        log.write_text("")
        c = start()
        m = wait_log(r"started a local Ray head at (\S+) \(temp dir (\S+),")
        heads.append(m.group(2))
        wait_log(r"the previous local head is gone: 1 active job\(s\) move to the new one")
        wait_log(rf"{NAME}: {NAME}-1 failed \(the cluster at \S+ no longer knows submission {NAME}-1")
        wait_log(rf"{NAME}: submitted {NAME}-2 \(restart 1/3")
        c.send_signal(signal.SIGINT)  # Ctrl-C
        assert c.wait(120) == 130
        assert _head_processes(m.group(2)) == []
        status = subprocess.run([sys.executable, "-m", "orchestrator", "controller", "status", "--db", str(db)],
                                capture_output=True, text=True, timeout=300)
        assert re.search(rf"{NAME}\s+submitted\s+2\s+1/3\s+{NAME}-2", status.stdout), status.stdout
        assert "requires token authentication" not in log.read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
        for temp_dir in heads:  # whatever a failed assertion left behind, this test's heads only
            for p in _head_processes(temp_dir):
                try:
                    p.kill()
                except psutil.Error:
                    pass

